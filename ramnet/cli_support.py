"""What every ``ramnet`` subcommand shares: bad arguments end with one line naming the fix."""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import re
import sys

LOGGER = "ramnet"  # the commands' own messages: logging.getLogger("ramnet.<module>")


def main_process() -> bool:
    """Whether this is the process that speaks: the only one, or torchrun's rank 0."""
    return os.environ.get("RANK", "0") == "0"


def add_verbosity(parser: argparse.ArgumentParser, quiet_help: str = "warnings and errors only") -> None:
    """``-v/--verbose`` (debug messages too) and ``-q/--quiet``, into ``args.verbosity`` (1, -1; 0 without)."""
    parser.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=0,
                        help="say more: debug messages too")
    parser.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, help=quiet_help)


class _TqdmHandler(logging.Handler):
    """Writes through tqdm, so that a message does not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


def configure_logging(verbosity: int = 0) -> None:
    """The ``ramnet`` logger's level from ``verbosity`` (-1: warnings, 0: info, 1: debug), on stderr
    (``_Formatter``). Processes other than torchrun's rank 0
    say only warnings and errors, so that a message is printed once."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if not main_process():
        level = max(level, logging.WARNING)
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
        logger.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)


class _Formatter(logging.Formatter):
    """Information as it is (progress lines); ``ramnet: warning: ...`` and ``ramnet: error: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.WARNING:
            return record.getMessage()
        return f"ramnet: {record.levelname.lower()}: {record.getMessage()}"


def reports_errors(name: str, also: tuple[type[BaseException], ...] = ()):
    """Decorate a ``cmd_*(args) -> int``: a ``ValueError`` (bad arguments or configuration), or one of
    the exception types in ``also``, ends the command with ``ramnet NAME: error: ...`` on stderr and
    status 2 instead of a traceback (printed by one process: rank 0 under torchrun)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except (ValueError, *also) as err:
                if main_process():  # under torchrun every rank fails alike: one message
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
