"""What a rule finds: :class:`Finding`, the severities, and the verdict and exit code they add up to.

Everything that reads findings (rules, the report, sinks, views, the CI command, the pytest plugin)
imports them from here. This module imports neither torch nor numpy, so the pytest plugin can use it
in every session for free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EXIT_OK",
    "EXIT_UNHEALTHY",
    "EXIT_USAGE",
    "SEVERITIES",
    "Finding",
    "FindingList",
    "at_or_above",
    "count_errors",
    "exit_code",
    "from_jsonable",
    "jsonable",
    "selects",
    "verdict",
]

_MISSING = object()


def _clip(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Finding severities, lowest first.
SEVERITIES = ("warning", "error")

#: Exit codes of the ``gradscope`` command and its subcommands.
EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True, repr=False)
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

    def with_episode(self, last_step: int | None, resolved_step: int | None) -> Finding:
        """A copy with ``last_step`` and ``resolved_step`` replaced: what following an episode changes.

        ``dataclasses.replace(f, last_step=..., resolved_step=...)`` gives the same finding; this costs a
        fraction of it (no field introspection), which counts when a rule follows hundreds of episodes
        (the experts of a mixture-of-experts layer that a router leaves out) at every evaluation.
        """
        out = object.__new__(Finding)
        out.__dict__.update(self.__dict__)
        out.__dict__["last_step"] = last_step
        out.__dict__["resolved_step"] = resolved_step
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary (non-finite numbers as strings)."""
        # Field by field (dataclasses.asdict deep-copies the evidence, which jsonable() rebuilds anyway):
        # sinks write every finding known at each flush where one changed.
        return {
            "kind": self.kind,
            "severity": self.severity,
            "step": self.step,
            "layer": self.layer,
            "message": self.message,
            "suggestion": self.suggestion,
            "evidence": jsonable(self.evidence),
            "provisional": self.provisional,
            "last_step": self.last_step,
            "resolved_step": self.resolved_step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a key is missing or holds the wrong type; the message names the key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a finding must be a JSON object, got {type(d).__name__}")

        def need(key: str, types: tuple[type, ...], what: str, *, default: Any = _MISSING) -> Any:
            if key not in d:
                if default is _MISSING:
                    raise ValueError(f"key {key!r} is missing (expected {what})")
                return default
            value = d[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ValueError(f"key {key!r} must be {what}, got {type(value).__name__} {_clip(value)}")
            return value

        severity = need("severity", (str,), "a string")
        if severity not in SEVERITIES:
            raise ValueError(f"key 'severity' must be one of {', '.join(SEVERITIES)}, got {_clip(severity)}")
        last_step = need("last_step", (int, type(None)), "an int or null", default=None)
        resolved_step = need("resolved_step", (int, type(None)), "an int or null", default=None)
        return cls(
            kind=need("kind", (str,), "a string"),
            severity=severity,
            step=need("step", (int,), "an int"),
            layer=need("layer", (str, type(None)), "a string or null", default=None),
            message=need("message", (str,), "a string"),
            suggestion=need("suggestion", (str,), "a string", default=""),
            evidence=from_jsonable(need("evidence", (dict,), "an object", default={})),
            provisional=need("provisional", (bool,), "true or false", default=False),
            last_step=last_step,
            resolved_step=resolved_step,
        )

    def __str__(self) -> str:
        where = f" in {self.layer!r}" if self.layer is not None else ""
        return (
            f"[{self.severity}] {self.kind}{where} at step {self.step}{self.status_note()}: {self.message} "
            f"Try: {self.suggestion}"
        )

    def __repr__(self) -> str:
        # Short and rounded: a notebook showing `report.findings` should read like the text report.
        where = "model" if self.layer is None else repr(self.layer)
        numbers = _short_evidence(self.evidence)
        extra = f", {numbers}" if numbers else ""
        return f"Finding(step={self.step}, {self.severity}, {self.kind}, layer={where}{extra}{self.status_note()})"

    def _repr_html_(self) -> str:
        return _findings_html([self])

    def status_note(self) -> str:
        """``" (provisional)"``, ``" (resolved at step N)"`` or ``""``: how final the finding is."""
        notes = []
        if self.provisional:
            notes.append("provisional")
        if self.resolved_step is not None:
            notes.append(f"resolved at step {self.resolved_step}")
        return f" ({', '.join(notes)})" if notes else ""


def _round(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3g}"


_FIRST_EVIDENCE = ("stat", "value", "ratio", "threshold", "window")


def _short_evidence(evidence: dict[str, Any], limit: int = 4) -> str:
    """Up to ``limit`` plain items of ``evidence`` (the statistic, value, threshold, window first), numbers rounded."""
    keys = [k for k in _FIRST_EVIDENCE if k in evidence] + [k for k in evidence if k not in _FIRST_EVIDENCE]
    parts = []
    for key in keys:
        value = evidence[key]
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            text = _round(value)
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, str) and key == "stat":
            text = value
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            text = f"{value[0]}-{value[1]}"  # a window of steps
        else:
            continue
        parts.append(f"{key}={text}")
        if len(parts) == limit:
            break
    return ", ".join(parts)


def _escape(x: Any) -> str:
    import html

    return html.escape(str(x), quote=True)


def _findings_html(findings: Iterable[Finding]) -> str:
    """A compact HTML table of ``findings`` (every value escaped), for notebooks."""
    rows = []
    for f in findings:
        layer = "(model)" if f.layer is None else (f.layer or "(root)")
        colour = "#cf222e" if f.severity == "error" else "#9a6700"
        rows.append(
            f"<tr><td style='text-align:right'>{f.step}</td>"
            f"<td style='color:{colour};font-weight:600'>{_escape(f.severity)}</td>"
            f"<td><code>{_escape(f.kind)}</code></td><td><code>{_escape(layer)}</code></td>"
            f"<td style='text-align:left'>{_escape(f.message)}{_escape(f.status_note())}</td>"
            f"<td style='text-align:left'>{_escape(f.suggestion)}</td></tr>"
        )
    if not rows:
        return "<p>No findings.</p>"
    head = "<tr><th>step</th><th>severity</th><th>kind</th><th>layer</th><th>what</th><th>try</th></tr>"
    return f"<table class='gradscope-findings'>{head}{''.join(rows)}</table>"


class FindingList(list[Finding]):
    """A plain ``list`` of :class:`Finding` that reads well when displayed (one short line each; a table in notebooks).

    Everything a list does works unchanged (indexing, ``len``, equality with a list, ``json`` of
    ``[f.to_dict() for f in ...]``); only ``repr`` and the notebook display differ.
    """

    def __repr__(self) -> str:
        if not self:
            return "[]"
        return "[\n" + "".join(f"  {f!r},\n" for f in self) + "]"

    def _repr_html_(self) -> str:
        return _findings_html(self)


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
