"""What a rule finds: :class:`Finding`, the severities, and the verdict and exit code they add up to.

Everything that reads findings (rules, the report, sinks, views, the CI command, the pytest plugin)
imports them from here. This module imports neither torch nor numpy, so the pytest plugin can use it
in every session for free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "EXIT_OK",
    "EXIT_UNHEALTHY",
    "EXIT_USAGE",
    "SEVERITIES",
    "Finding",
    "at_or_above",
    "count_errors",
    "exit_code",
    "from_jsonable",
    "jsonable",
    "selects",
    "verdict",
]

#: Finding severities, lowest first.
SEVERITIES = ("warning", "error")

#: Exit codes of the ``gradscope`` command and its subcommands.
EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Finding:
    """One diagnosis.

    Attributes:
        kind: the rule that fired (``"vanishing_gradients"``...).
        severity: ``"warning"`` or ``"error"``.
        step: the first step where it was seen (counted from 1 per ``scope.step()``).
        layer: module path where it originates, or None for a model-level finding (the loss).
        message: a full sentence: what, where, and the evidence.
        suggestion: what to try.
        evidence: the numbers behind it (statistic, value, threshold, window...).
        provisional: True while the finding rests on fewer steps than the rule's window (a partial
            window at the end of what was recorded so far): later steps can still withdraw it. Only
            ``report()`` during a run shows provisional findings; outputs written during the run
            (TensorBoard, ``report_path``) hold confirmed ones only.
        last_step: the last step at which the condition was seen to hold (the episode so far); None
            when the rule does not track episodes.
        resolved_step: the first step from which the condition no longer held (the episode ended);
            None while it holds or when the rule does not track episodes.
    """

    kind: str
    severity: str
    step: int
    layer: str | None
    message: str
    suggestion: str
    evidence: dict[str, Any] = field(default_factory=dict)
    provisional: bool = False
    last_step: int | None = None
    resolved_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary (non-finite numbers as strings)."""
        d = asdict(self)
        d["evidence"] = jsonable(d["evidence"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict`."""
        return cls(
            kind=d["kind"],
            severity=d["severity"],
            step=int(d["step"]),
            layer=d.get("layer"),
            message=d["message"],
            suggestion=d.get("suggestion", ""),
            evidence=from_jsonable(d.get("evidence", {})),
            provisional=bool(d.get("provisional", False)),
            last_step=None if d.get("last_step") is None else int(d["last_step"]),
            resolved_step=None if d.get("resolved_step") is None else int(d["resolved_step"]),
        )

    def __str__(self) -> str:
        where = f" in {self.layer!r}" if self.layer is not None else ""
        return (
            f"[{self.severity}] {self.kind}{where} at step {self.step}{self.status_note()}: {self.message} "
            f"Try: {self.suggestion}"
        )

    def status_note(self) -> str:
        """``" (provisional)"``, ``" (resolved at step N)"`` or ``""``: how final the finding is."""
        notes = []
        if self.provisional:
            notes.append("provisional")
        if self.resolved_step is not None:
            notes.append(f"resolved at step {self.resolved_step}")
        return f" ({', '.join(notes)})" if notes else ""


def selects(stop_on: frozenset[str] | None, finding: Finding) -> bool:
    """Whether ``finding`` is one that ``stop_on`` names: a severity (that or higher) or a kind.

    ``stop_on`` is normalised by :class:`gradscope.options.WatchOptions`: a set of severities from
    :data:`SEVERITIES` and rule kinds; None selects nothing.
    """
    if not stop_on:
        return False
    if finding.kind in stop_on:
        return True
    return any(s in SEVERITIES and SEVERITIES.index(finding.severity) >= SEVERITIES.index(s) for s in stop_on)


def count_errors(findings: Iterable[Finding]) -> int:
    """How many findings have severity ``"error"``."""
    return sum(f.severity == "error" for f in findings)


def verdict(findings: Iterable[Finding]) -> str:
    """``"healthy"`` (no finding), ``"warnings"`` (warnings only) or ``"unhealthy"`` (an error)."""
    found = list(findings)
    if not found:
        return "healthy"
    return "unhealthy" if count_errors(found) else "warnings"


def at_or_above(findings: Iterable[Finding], fail_on: str) -> list[Finding]:
    """The findings whose severity is ``fail_on`` or higher (``fail_on`` must be in :data:`SEVERITIES`)."""
    level = SEVERITIES.index(fail_on)
    return [f for f in findings if SEVERITIES.index(f.severity) >= level]


def exit_code(findings: Iterable[Finding], fail_on: str = "error") -> int:
    """:data:`EXIT_UNHEALTHY` when a finding is at or above ``fail_on``, else :data:`EXIT_OK`."""
    return EXIT_UNHEALTHY if at_or_above(findings, fail_on) else EXIT_OK


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON: NumPy values become Python ones, non-finite floats the strings nan/inf/-inf."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bool, str, int)) or x is None:
        return x
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    tolist = getattr(x, "tolist", None)  # NumPy scalars and arrays
    if callable(tolist):
        return jsonable(tolist())
    return x


def from_jsonable(x: Any) -> Any:
    """Inverse of :func:`jsonable` for the non-finite floats."""
    if isinstance(x, dict):
        return {k: from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_jsonable(v) for v in x]
    if x in ("nan", "inf", "-inf"):
        return float(x)
    return x
