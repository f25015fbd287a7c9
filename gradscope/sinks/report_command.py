"""``gradscope report RUN``: summarise a finished run as a self-contained HTML page and text.

``RUN`` is a JSON report (``report.to_json(path)``), a TensorBoard run folder (``watch(log_dir=...)``),
a log dir holding one run, or an event file. Exit code 0: healthy (no finding of severity error);
1: unhealthy; 2: usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gradscope.findings import EXIT_USAGE, exit_code

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the ``gradscope`` command."""
    p = subparsers.add_parser(
        "report",
        help="summarise a finished run (JSON report or TensorBoard log dir) as HTML and text",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a JSON report, a TensorBoard run folder or log dir, or an event file")
    p.add_argument(
        "-o",
        "--output",
        metavar="HTML",
        help="where to write the HTML page (default: gradscope-report.html in the run folder, or next to the JSON)",
    )
    p.add_argument("--no-html", action="store_true", help="print the text summary only")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON (e.g. to convert a TensorBoard run)")
    p.add_argument(
        "--run-name", dest="run_name", metavar="NAME", help="with a log dir of several runs: the one to read"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr while reading event files (default: when stderr is a terminal)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the text summary")
    p.set_defaults(func=run)
    return p


def _default_output(source: Path) -> Path:
    if source.is_dir():
        return source / "gradscope-report.html"
    if "events.out.tfevents" in source.name:
        return source.parent / "gradscope-report.html"
    return source.with_suffix(".html")


def run(args: argparse.Namespace) -> int:
    """Read the run, write the outputs, print the summary; return the exit code."""
    from gradscope.sinks.reader import RunReadError, read_report

    source = Path(args.run)
    try:
        report = read_report(source, run=args.run_name, progress=args.progress)
    except RunReadError as exc:
        print(f"gradscope report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"gradscope report: error: cannot read {str(source)!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if not args.no_html:
            from gradscope.views.html import write_html

            out = Path(args.output) if args.output else _default_output(source)
            write_html(report, out, source=str(source))
        if args.json:
            report.to_json(args.json)
    except OSError as exc:
        print(f"gradscope report: error: cannot write the output: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        print(report)
    if not args.no_html:
        print(f"HTML report: {out}", file=sys.stderr)
    return exit_code(report.findings)
