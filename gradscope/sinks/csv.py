"""CSV output: every scalar record as a ``step,tag,value`` row, appended at each flush.

::

    scope = gradscope.watch(model, optimizer=opt, sinks=[CSVSink("runs/exp1/gradscope.csv")])

Two files, both complete on disk after each flush (a run that dies keeps what was flushed):

* ``path``: a header ``step,tag,value``, then one row per record (:mod:`gradscope.sinks.records`):
  the values and steps of ``report.stats`` (layer aggregates and the model; parameters with
  ``per_param=True``) and ``report.scalars``, full float64 precision, NaN values left out.
* the findings, one JSON object per line (``Finding.to_dict()``; ``Finding.from_dict`` reads it
  back), appended at the flush that found them: ``findings_path``, by default beside ``path`` with
  the suffix ``.findings.jsonl`` (``gradscope.csv`` -> ``gradscope.findings.jsonl``). Created empty at
  the start, so an empty file means no finding so far.

Both files are created (truncated) when the scope opens.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gradscope._validate import boolean
from gradscope.errors import ConfigurationError
from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate
from gradscope.sinks.records import check_stat_selection, stat_selection
from gradscope.sinks.registry import register_sink

if TYPE_CHECKING:
    from gradscope.report import Report

__all__ = ["CSV_HEADER", "CSVSink"]

#: The first row of the records file.
CSV_HEADER = ("step", "tag", "value")


@register_sink("csv")
class CSVSink(Sink):
    """Writes the scalar records to a CSV file and the findings to a JSON-lines file beside it.

    Args:
        path: the CSV file (its folder is created).
        findings_path: the findings file; None: ``path`` with the suffix ``.findings.jsonl``.
        stats: the statistics written (gradient and activation); None: every one the scope collects.
        per_param: also one row per parameter (``gradscope/<stat>/<layer>/<param>``).

    Raises:
        ConfigurationError: for an invalid option; at ``open``, for a statistic the scope does not
            collect.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        findings_path: str | os.PathLike[str] | None = None,
        stats: Sequence[str] | None = None,
        per_param: bool = False,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigurationError(f"Expected `path` of CSVSink to be a file path, but got {path!r}.")
        if findings_path is not None and not isinstance(findings_path, (str, os.PathLike)):
            raise ConfigurationError(
                f"Expected `findings_path` of CSVSink to be a file path or None, but got {findings_path!r}."
            )
        self.path = Path(path)
        self.findings_path = (
            Path(findings_path) if findings_path is not None else self.path.with_suffix(".findings.jsonl")
        )
        if self.findings_path == self.path:
            raise ConfigurationError(
                f"CSVSink: `findings_path` and `path` are both {str(self.path)!r}; give the findings another file."
            )
        self.stats = stat_selection("CSVSink", stats)
        self.per_param = boolean("per_param", per_param)
        self._rows: IO[str] | None = None
        self._findings: IO[str] | None = None
        self._writer: Any = None  # a csv.writer (its type is private to the csv module)
        self._closed = False

    def open(self, info: ScopeInfo) -> None:
        """Check ``stats``; create both files (the CSV with its header)."""
        check_stat_selection("CSVSink", self.stats, info.stats)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.findings_path.parent.mkdir(parents=True, exist_ok=True)
        self._rows = open(self.path, "w", newline="", encoding="utf-8")  # held until close()
        self._findings = open(self.findings_path, "w", encoding="utf-8")  # held until close()
        self._writer = csv.writer(self._rows)
        self._writer.writerow(CSV_HEADER)
        self._rows.flush()

    def write(self, update: SinkUpdate) -> None:
        """Append the new records and findings, then flush both files."""
        if self._closed or self._writer is None or self._rows is None or self._findings is None:
            return
        # csv writes a float as repr(): the shortest text that reads back as the same float64
        self._writer.writerows(
            (r.step, r.tag, r.value) for r in update.records(stats=self.stats, per_param=self.per_param)
        )
        self._rows.flush()
        for f in update.findings:
            self._findings.write(json.dumps(f.to_dict(), allow_nan=False) + "\n")
        self._findings.flush()

    def close(self, report: Report) -> None:
        """Close both files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for fh in (self._rows, self._findings):
            if fh is not None:
                fh.close()
