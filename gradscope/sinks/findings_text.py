"""Findings as text for trackers: markdown for TensorBoard's Text dashboard and artifacts, rows for tables.

Shared by the TensorBoard, metrics-logger, MLflow and W&B sinks, so every tracker words a finding the
same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradscope.findings import Finding

__all__ = [
    "FINDINGS_COLUMNS",
    "FindingsLedger",
    "finding_markdown",
    "finding_row",
    "findings_counts",
    "findings_table",
    "update_markdown",
]

#: Columns of :func:`finding_row`, for trackers that take tables.
FINDINGS_COLUMNS = ("step", "severity", "kind", "layer", "status", "message", "suggestion")


def _where(f: Finding) -> str:
    return f"`{f.layer or '(root)'}`" if f.layer is not None else "the model"


def finding_markdown(f: Finding, reported: int | None = None) -> str:
    """One finding as markdown; ``reported``: the step it was written at, when later than its first step."""
    when = f"\n\n*First seen at step {f.step}, reported at step {reported}.*" if reported not in (None, f.step) else ""
    return (
        f"**{f.severity}: {f.kind}** in {_where(f)} at step {f.step}{f.status_note()}\n\n{f.message}\n\n"
        f"*Try:* {f.suggestion}{when}"
    )


def update_markdown(f: Finding) -> str:
    """A finding reported before whose episode changed: it ended, or it holds again."""
    if f.resolved_step is not None:
        change = f"no longer holds from step {f.resolved_step}"
    else:
        change = f"holds again (last seen at step {f.last_step})"
    return f"**{f.severity}: {f.kind}** in {_where(f)}, first seen at step {f.step}: {change}."


def findings_table(findings: Sequence[Finding]) -> list[str]:
    """The lines of a markdown table: step (and status), severity, kind, layer."""
    lines = ["| step | severity | kind | layer |", "|---:|---|---|---|"]
    for f in findings:
        layer = "(model)" if f.layer is None else (f.layer or "(root)")
        lines.append(f"| {f.step}{f.status_note()} | {f.severity} | {f.kind} | `{layer}` |")
    return lines


def finding_row(f: Finding) -> list[Any]:
    """One finding as a table row of :data:`FINDINGS_COLUMNS`."""
    layer = "(model)" if f.layer is None else (f.layer or "(root)")
    status = f.status_note().strip(" ()") or "confirmed"
    return [f.step, f.severity, f.kind, layer, status, f.message, f.suggestion]


def findings_counts(findings: Sequence[Finding], prefix: str = "gradscope/findings") -> dict[str, float]:
    """``{prefix/count, prefix/errors, prefix/warnings}``: how many findings, for trackers without text."""
    errors = sum(f.severity == "error" for f in findings)
    return {
        f"{prefix}/count": float(len(findings)),
        f"{prefix}/errors": float(errors),
        f"{prefix}/warnings": float(len(findings) - errors),
    }


class FindingsLedger:
    """The findings a sink has written, in their last written state, one per ``(kind, layer)``.

    :meth:`take` turns a flush's new findings and episode updates into what is worth writing now:
    the findings first reported, the ones whose episode ended or started again, and (at the end) any
    other change, so that a sink's last record agrees with the final report.
    """

    def __init__(self) -> None:
        self.known: dict[tuple[str, str | None], Finding] = {}

    def take(
        self, new: Sequence[Finding], updated: Sequence[Finding], *, final: bool = False
    ) -> tuple[list[Finding], list[Finding], bool]:
        """``(fresh, changed, any)``: first reported now; episode ended or resumed; whether anything changed.

        Args:
            new: findings first reported at this flush.
            updated: findings whose episode changed (their new state); may repeat ``new`` ones.
            final: also count any other difference (a later ``last_step``) as a change.
        """
        new_keys = {(f.kind, f.layer) for f in new}
        latest = {(f.kind, f.layer): f for f in updated}
        fresh = [latest.get((f.kind, f.layer), f) for f in new if (f.kind, f.layer) not in self.known]
        changed, restated = [], []
        for key, f in latest.items():
            known = self.known.get(key)
            if key in new_keys or known is None or known == f:
                continue
            if known.resolved_step != f.resolved_step:
                changed.append(f)
            elif final:
                restated.append(f)
        for f in (*fresh, *changed, *restated):
            self.known[(f.kind, f.layer)] = f
        return fresh, changed, bool(fresh or changed or restated)

    def everything(self) -> list[Finding]:
        """Every finding written so far, in its latest state, by first step."""
        return sorted(self.known.values(), key=lambda f: f.step)

    def take_report(self, findings: Sequence[Finding]) -> tuple[list[Finding], list[Finding], bool]:
        """:meth:`take` for the final report's findings (confirmed ones): what no flush passed on."""
        confirmed = [f for f in findings if not f.provisional]
        return self.take(
            [f for f in confirmed if (f.kind, f.layer) not in self.known],
            [f for f in confirmed if (f.kind, f.layer) in self.known],
            final=True,
        )
