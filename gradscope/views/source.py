"""What a view reads from a report: a structural type, so views never import :mod:`gradscope.report`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from gradscope.findings import Finding

__all__ = ["ReportData"]


class ReportData(Protocol):
    """The read-only face of :class:`gradscope.report.Report` that plots, tables and HTML use."""

    findings: list[Finding]
    skipped_steps: list[int]
    frozen: list[str]
    meta: dict[str, Any]
    errors: list[str]

    @property
    def stats(self) -> pd.DataFrame:
        """Long-format statistics (step, layer, param, stat, value)."""

    @property
    def scalars(self) -> pd.DataFrame:
        """The scalars passed to ``scope.step``, indexed by step."""

    @property
    def steps(self) -> int:
        """The number of ``scope.step()`` calls seen."""

    @property
    def ok(self) -> bool:
        """False if any finding is an error."""
