"""The ``gradscope`` command (also ``python -m gradscope``).

Exit codes, for every subcommand: 0 healthy (or every gradient agrees), 1 unhealthy, 2 usage or load
error: a bad flag, an unreadable input, a factory that cannot be loaded or fails (``sys.exit`` inside
it included), or any other error that stopped the command; 130 when interrupted (Ctrl-C). Errors are
one line on stderr, never a traceback (set the environment variable ``GRADSCOPE_TRACEBACK=1`` to see
the traceback of an unexpected error). ``main(argv)`` returns the code so tests can call it without a
subprocess.

Adding a subcommand: a module with ``add_parser(subparsers)`` that sets ``func(args) -> int`` on its
parser, named in :data:`SUBCOMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from gradscope._io import echo, escape_controls, one_line
from gradscope._version import __version__
from gradscope.errors import ConfigurationError
from gradscope.findings import EXIT_USAGE

__all__ = ["EXIT_INTERRUPTED", "SUBCOMMAND_MODULES", "main"]

#: Modules that each add one or more subcommands through ``add_parser(subparsers)``.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "gradscope.check_command",
    "gradscope.reference.cli",
    "gradscope.sinks.report_command",
    "gradscope.diff",
)
#: Exit code after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
_TRACEBACK_ENV = "GRADSCOPE_TRACEBACK"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {escape_controls(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand adds itself from the module that implements it."""
    parser = _Parser(prog="gradscope", description="Gradient diagnostics for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"gradscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _subcommands():
        add(sub)
    return parser


def _subcommands() -> list:
    adders: list = []
    # Each module owns its subcommand: `add_parser(subparsers)` sets `func(args) -> int`.
    for module_name in SUBCOMMAND_MODULES:
        module = __import__(module_name, fromlist=["add_parser"])
        adders.append(module.add_parser)
    return adders


def _exit_text(code: object) -> str:
    return "sys.exit()" if code is None else f"sys.exit({code!r})"


def _silence_stdout() -> None:
    # Point the broken stdout at /dev/null so that the flush at interpreter exit does not complain.
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    command = f"gradscope {args.command}"
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        echo(f"{command}: error: {exc}", err=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        echo(f"{command}: interrupted", err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read the output went away (`gradscope report RUN | head`): stop quietly.
        _silence_stdout()
        return EXIT_USAGE
    except SystemExit as exc:
        # Only user code (a factory, a model, a loss) calls sys.exit under a subcommand: an exit 0
        # there must not read as "healthy" to CI.
        echo(
            f"{command}: error: user code called {_exit_text(exc.code)} before the command finished; "
            "nothing was checked.",
            err=True,
        )
        return EXIT_USAGE
    except Exception as exc:
        if os.environ.get(_TRACEBACK_ENV, "") not in ("", "0"):
            raise
        echo(
            f"{command}: error: {type(exc).__name__}: {one_line(str(exc))[:500]} "
            f"(set {_TRACEBACK_ENV}=1 for the traceback)",
            err=True,
        )
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
