"""What every ``ramnet`` subcommand shares: bad arguments end with one line naming the fix."""

from __future__ import annotations

import argparse
import functools
import sys


def reports_errors(name: str, also: tuple[type[BaseException], ...] = ()):
    """Decorate a ``cmd_*(args) -> int``: a ``ValueError`` (bad arguments or configuration), or one of
    the exception types in ``also``, ends the command with ``ramnet NAME: error: ...`` on stderr and
    status 2 instead of a traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except (ValueError, *also) as err:
                print(f"ramnet {name}: error: {err}", file=sys.stderr)
                return 2

        return run

    return wrap
