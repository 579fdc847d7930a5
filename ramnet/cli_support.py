"""What every ``ramnet`` subcommand shares: bad arguments end with one line naming the fix."""

from __future__ import annotations

import argparse
import difflib
import functools
import re
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


_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class Parser(argparse.ArgumentParser):
    """The parser of ``ramnet`` and of each of its subcommands (``add_subparsers`` makes its subparsers
    of the same class): no abbreviations (``--model`` is not ``--models``), and an unknown ``--option``
    is refused by the (sub)command it was given to, naming it and, where one is close, the real option;
    ``unknown_option_hint(option, value, close)`` may say more (``value``: the token after it, or after
    ``=``; ``close``: the known option nearest to it, or None), or return None for the usual message."""

    def __init__(self, *args, unknown_option_hint=None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.unknown_option_hint = unknown_option_hint

    def parse_known_args(self, args=None, namespace=None):
        self._refuse_unknown_options(list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)

    def _refuse_unknown_options(self, args: list[str]) -> None:
        """Scans this parser's own tokens (up to a subcommand's name, or ``--``) for unknown options, before
        argparse can misread their values (as a subcommand's name, or as a positional argument)."""
        commands = {name for action in self._actions if isinstance(action, argparse._SubParsersAction)
                    for name in action.choices}
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--" or (token in commands):
                return
            if token[:1] not in self.prefix_chars or token == "-" or _NEGATIVE_NUMBER.match(token):
                i += 1
                continue
            name, has_value, inline = token.partition("=")
            action = self._option_string_actions.get(name)
            if action is None:
                value = inline if has_value else (args[i + 1] if i + 1 < len(args) and args[i + 1][:1] not in self.prefix_chars else None)
                self.error(self._unknown_option_message(name, value))
            if action.nargs is None and not has_value:
                i += 2  # the option's value, whatever it looks like
            elif action.nargs in (0, None):
                i += 1
            else:  # an option of several values: leave the rest to argparse
                return

    def _unknown_option_message(self, option: str, value: str | None) -> str:
        known = [s for s in self._option_string_actions if s.startswith(self.prefix_chars[0] * 2)]
        close = difflib.get_close_matches(option.replace("_", "-"), known, n=1, cutoff=0.6)
        close = close[0] if close else None
        hint = self.unknown_option_hint(option, value, close) if self.unknown_option_hint else None
        if hint is None:
            hint = f"did you mean {close}?" if close else f"`{self.prog} -h` lists the options"
        return f"unknown option {option}; {hint}"
