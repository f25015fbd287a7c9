r"""Results of CI checks and their three renderings: JSON, JUnit XML and Markdown.

The ``gradscope check`` command and the pytest plugin both collect :class:`CheckRecord` objects (one
per health check, watched run or baseline comparison) and write them with the functions here, so a
CI job reads the same files whichever way it ran the checks.

- :func:`to_document` / :func:`write_json`: schema ``gradscope.checks``, version 1; each check carries
  its full report (:meth:`gradscope.Report.to_dict`) or baseline comparison.
- :func:`junit_xml`: one ``<testsuite>`` with one ``<testcase>`` per check; a failing check carries a
  ``<failure>`` whose text lists the findings (or the layers that moved), a broken one an ``<error>``.
- :func:`markdown`: a verdict table and the failing findings, for a CI job summary.

Text that comes from user code or files (names, messages, layer names) may hold control characters:
both renderings escape them (``\x1b`` for ESC), so an ANSI sequence can neither make the XML
unparseable nor reach a terminal that shows the Markdown.
"""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradscope._io import atomic_write_text, escape_controls, one_line
from gradscope._version import __version__
from gradscope.findings import Finding, count_errors
from gradscope.health import failing_findings, health_message
from gradscope.report import Report

if TYPE_CHECKING:
    import os

    from gradscope.baseline import ProfileComparison

__all__ = [
    "CHECKS_SCHEMA",
    "CHECKS_VERSION",
    "KINDS",
    "CheckRecord",
    "junit_xml",
    "markdown",
    "to_document",
    "write_json",
]

CHECKS_SCHEMA = "gradscope.checks"
CHECKS_VERSION = 1
#: What a record holds: a :func:`gradscope.check` run, a watched run (pytest fixture) or a baseline
#: comparison. Any of them may instead hold an ``error`` that stopped it from running.
KINDS = ("check", "watch", "baseline")


@dataclass
class CheckRecord:
    """One check, as CI sees it.

    Attributes:
        name: what was checked: a test id, or ``FILE.py:factory``.
        kind: one of :data:`KINDS`.
        fail_on: the lowest finding severity that fails this check.
        seconds: wall time of the check.
        report: the report, for ``"check"`` and ``"watch"`` records.
        comparison: the comparison, for ``"baseline"`` records.
        error: what stopped the check from running (a factory that could not be loaded...), or None.
    """

    name: str
    kind: str
    fail_on: str = "error"
    seconds: float = 0.0
    report: Report | None = None
    comparison: ProfileComparison | None = None
    error: str | None = None

    @property
    def failing(self) -> list[Finding]:
        """Findings at or above ``fail_on``."""
        return failing_findings(self.report, self.fail_on) if self.report is not None else []

    @property
    def failed(self) -> bool:
        """True when the check failed: failing findings, a baseline mismatch, or an error."""
        if self.error is not None:
            return True
        if self.comparison is not None and not self.comparison.ok:
            return True
        return bool(self.failing)

    @property
    def verdict(self) -> str:
        """The verdict in one word.

        ``"HEALTHY"``, ``"WARNINGS"`` (findings below ``fail_on`` only), ``"UNHEALTHY"``, ``"MATCHES"`` or
        ``"MOVED"`` (baseline), ``"ERROR"`` (the check could not run).
        """
        if self.error is not None:
            return "ERROR"
        if self.comparison is not None:
            return "MATCHES" if self.comparison.ok else "MOVED"
        if self.failing:
            return "UNHEALTHY"
        return "WARNINGS" if self.report is not None and self.report.findings else "HEALTHY"

    def headline(self) -> str:
        """One line: name, kind, verdict, counts, time."""
        parts = [f"{self.name} [{self.kind}] {self.verdict}"]
        if self.report is not None:
            n_err = count_errors(self.report.findings)
            parts.append(
                f"{n_err} error(s), {len(self.report.findings) - n_err} warning(s), {self.report.steps} step(s)"
            )
        if self.comparison is not None:
            parts.append(
                f"{len(self.comparison.mismatches)} of {len(self.comparison.layers)} layer(s) changed"
                if not self.comparison.ok
                else f"{len(self.comparison.layers)} layer(s) within tolerance"
            )
        parts.append(f"{self.seconds:.2f} s")
        return ", ".join(parts)

    def details(self) -> str:
        """The full text of the check: findings and per-layer table, the comparison, or the error."""
        if self.error is not None:
            return self.error
        if self.comparison is not None:
            return str(self.comparison)
        if self.report is not None:
            return health_message(self.report, self.fail_on, name=self.name) if self.failing else str(self.report)
        return ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (the report or comparison in full)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "verdict": self.verdict,
            "failed": self.failed,
            "fail_on": self.fail_on,
            "seconds": round(self.seconds, 4),
            "failing": [f.to_dict() for f in self.failing],
            "error": self.error,
            "report": self.report.to_dict() if self.report is not None else None,
            "baseline": self.comparison.to_dict() if self.comparison is not None else None,
        }


def to_document(records: list[CheckRecord], *, source: str, fail_on: str) -> dict[str, Any]:
    """All checks of a run as one JSON-able document (schema ``gradscope.checks``, version 1).

    Args:
        records: the checks.
        source: ``"cli"`` or ``"pytest"``.
        fail_on: the run's default ``fail_on``.
    """
    return {
        "schema": CHECKS_SCHEMA,
        "version": CHECKS_VERSION,
        "gradscope_version": __version__,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fail_on": fail_on,
        "ok": not any(r.failed for r in records),
        "counts": {
            "checks": len(records),
            "failed": sum(r.failed for r in records),
            "errors": sum(r.error is not None for r in records),
        },
        "seconds": round(sum(r.seconds for r in records), 4),
        "checks": [r.to_dict() for r in records],
    }


def write_json(records: list[CheckRecord], path: str | os.PathLike[str], *, source: str, fail_on: str = "error") -> str:
    """Write :func:`to_document` to ``path`` atomically; returns the text."""
    text = json.dumps(to_document(records, source=source, fail_on=fail_on), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return text


def _failure_summary(r: CheckRecord) -> str:
    if r.comparison is not None:
        return r.comparison.summary()
    kinds = ", ".join(dict.fromkeys(f"{f.kind} in {f.layer!r}" if f.layer else f.kind for f in r.failing))
    return f"{len(r.failing)} finding(s) at or above {r.fail_on!r}: {kinds}"


def junit_xml(records: list[CheckRecord], *, suite: str = "gradscope") -> str:
    """A JUnit XML document: one ``<testsuite>``, one ``<testcase>`` per check.

    A failed check has a ``<failure>`` (``type`` = the first failing finding's kind, or
    ``baseline``), whose ``message`` is a one-line summary and whose text is the full report; a check
    that could not run has an ``<error>``. Findings below ``fail_on`` go to ``<system-out>``.
    """
    failures = sum(r.failed and r.error is None for r in records)
    errors = sum(r.error is not None for r in records)
    total_time = f"{sum(r.seconds for r in records):.3f}"
    root = ET.Element(
        "testsuites",
        {
            "name": suite,
            "tests": str(len(records)),
            "failures": str(failures),
            "errors": str(errors),
            "time": total_time,
        },
    )
    ts = ET.SubElement(
        root,
        "testsuite",
        {
            "name": suite,
            "tests": str(len(records)),
            "failures": str(failures),
            "errors": str(errors),
            "skipped": "0",
            "time": total_time,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        },
    )
    props = ET.SubElement(ts, "properties")
    ET.SubElement(props, "property", {"name": "gradscope_version", "value": __version__})
    x = escape_controls  # XML 1.0 cannot hold most control characters, not even as character references
    for r in records:
        tc = ET.SubElement(
            ts, "testcase", {"classname": f"gradscope.{x(r.kind)}", "name": x(r.name), "time": f"{r.seconds:.3f}"}
        )
        if r.error is not None:
            message = r.error.splitlines()[0] if r.error.strip() else ""
            el = ET.SubElement(tc, "error", {"type": "error", "message": x(message)})
            el.text = x(r.error)
        elif r.failed:
            kind = "baseline" if r.comparison is not None else r.failing[0].kind
            el = ET.SubElement(tc, "failure", {"type": x(kind), "message": x(_failure_summary(r))})
            el.text = x(r.details())
        else:
            out = ET.SubElement(tc, "system-out")
            out.text = x(r.details())
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _md(text: str) -> str:
    """Escape text for a Markdown table cell or list item (one line, control characters escaped)."""
    return one_line(str(text)).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _code(text: str) -> str:
    """``text`` as an inline code span that its own backticks cannot close, on one line."""
    body = one_line(str(text)).replace("|", "\\|")  # a table cell ends at "|" even inside a code span
    fence = "`" * (max((len(run) for run in re.findall("`+", body)), default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def _fenced(text: str) -> list[str]:
    """``text`` as a fenced code block, with a fence longer than any backtick run inside it."""
    body = escape_controls(text)
    fence = "`" * max(3, max((len(run) for run in re.findall("`+", body)), default=0) + 1)
    return [fence, body, fence]


def markdown(records: list[CheckRecord], *, title: str = "gradscope") -> str:
    """A Markdown summary: a verdict line, a table of checks, and the failing findings of each.

    Meant for a CI job summary (append it to the file your CI system displays).
    """
    failed = [r for r in records if r.failed]
    icon = {"HEALTHY": "✅", "MATCHES": "✅", "WARNINGS": "⚠️", "UNHEALTHY": "❌", "MOVED": "❌", "ERROR": "💥"}
    head = (
        f"## {title}: {len(failed)} of {len(records)} check(s) failed"
        if failed
        else f"## {title}: all {len(records)} check(s) passed"
    )
    lines = [head, "", "| check | kind | verdict | findings | time |", "|---|---|---|---|---|"]
    for r in records:
        if r.report is not None:
            n_err = count_errors(r.report.findings)
            found = f"{n_err} error(s), {len(r.report.findings) - n_err} warning(s)"
        elif r.comparison is not None:
            found = f"{len(r.comparison.mismatches)} layer(s) changed"
        else:
            found = "-"
        lines.append(
            f"| {_code(r.name)} | {r.kind} | {icon[r.verdict]} {r.verdict.lower()} | {found} | {r.seconds:.2f} s |"
        )
    for r in records:
        if not (r.failed or (r.report is not None and r.report.findings)):
            continue
        lines += ["", f"### {icon[r.verdict]} {_code(r.name)}", ""]
        if r.error is not None:
            lines.append(f"- **error**: {_md(r.error)}")
        if r.comparison is not None:
            lines.append(f"- {_md(r.comparison.summary())}")
            lines += [
                f"  - {_code(lc.layer or '(root)')} ({_md(lc.status)}): {_md(lc.message)}"
                for lc in r.comparison.mismatches
            ]
        if r.report is not None:
            for f in r.report.findings:
                where = f" in {_code(f.layer)}" if f.layer is not None else ""
                lines.append(
                    f"- **{_md(f.severity)}** {_code(f.kind)}{where} at step {_md(str(f.step))}: {_md(f.message)} "
                    f"*Try:* {_md(f.suggestion)}"
                )
            lines += ["", "<details><summary>report</summary>", "", *_fenced(str(r.report)), "", "</details>"]
    return "\n".join(lines) + "\n"
