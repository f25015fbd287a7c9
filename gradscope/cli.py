"""The ``gradscope`` command.

Exit codes, for every subcommand: 0 healthy (or every gradient agrees), 1 unhealthy, 2 usage or load
error. ``main(argv)`` returns the code so tests can call it without a subprocess.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from gradscope._version import __version__
from gradscope.errors import ConfigurationError
from gradscope.findings import EXIT_USAGE

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


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
    for module_name in ("gradscope.check_command", "gradscope.reference.cli", "gradscope.sinks.report_command"):
        module = __import__(module_name, fromlist=["add_parser"])
        adders.append(module.add_parser)
    return adders


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"gradscope {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
