"""``gradscope report RUN``: summarise a finished run as a self-contained HTML page and text.

``RUN`` is a JSON report (``report.to_json(path)``), a TensorBoard run folder (``watch(log_dir=...)``),
a log dir holding one run, or an event file. Exit code 0: healthy (no finding of severity error);
1: unhealthy; 2: usage error or unreadable input (a damaged or hostile file is reported in one line,
never with a traceback). Text from the run is printed with its control characters escaped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gradscope._io import echo, one_line
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
    p.add_argument(
        "run",
        type=_nonempty,
        metavar="RUN",
        help="a JSON report, a TensorBoard run folder or log dir, or an event file",
    )
    p.add_argument(
        "-o",
        "--output",
        type=_nonempty,
        metavar="HTML",
        help="where to write the HTML page (default: gradscope-report.html in the run folder, or next to the JSON)",
    )
    p.add_argument("--no-html", action="store_true", help="print the text summary only")
    p.add_argument(
        "--json",
        type=_nonempty,
        metavar="PATH",
        help="also write the report as JSON (e.g. to convert a TensorBoard run)",
    )
    p.add_argument(
        "--run-name",
        dest="run_name",
        type=_nonempty,
        metavar="NAME",
        help="with a log dir of several runs: the one to read",
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


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("Expected a path, but got an empty string.")
    return text


def _error(message: str) -> int:
    echo(f"gradscope report: error: {message}", err=True)
    return EXIT_USAGE


def _reason(exc: BaseException) -> str:
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text[:300]}{' ...' if len(text) > 300 else ''}"


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
        return _error(one_line(str(exc)))
    except OSError as exc:
        return _error(f"cannot read {str(source)!r}: {exc}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        # A damaged or crafted file (wrong types, deep nesting, corrupt records): a load error, exit 2.
        return _error(f"cannot read {str(source)!r}: it is damaged or not a gradscope run ({_reason(exc)}).")
    out: Path | None = None
    try:
        # Render everything before writing anything, so a report that cannot be rendered leaves no
        # partial outputs and exits 2.
        text = str(report) if not args.quiet else ""
        code = exit_code(report.findings)
        if not args.no_html:
            from gradscope.views.html import write_html

            out = Path(args.output) if args.output else _default_output(source)
            write_html(report, out, source=str(source))
        if args.json:
            report.to_json(args.json)
    except OSError as exc:
        return _error(f"cannot write the output: {exc}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        return _error(f"cannot render the report of {str(source)!r}: its data is damaged ({_reason(exc)}).")
    if not args.quiet:
        echo(text)
    if out is not None:
        echo(f"HTML report: {out}", err=True)
    return code
