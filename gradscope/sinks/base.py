"""The Sink contract: where statistics and findings go at each flush.

A sink gets a :class:`SinkUpdate` at every flush. Most sinks need only its records (``step``,
``tag``, ``value``; see :mod:`gradscope.sinks.records`) and its findings, so a sink for another
tracker is a few lines::

    from gradscope.sinks import Sink

    class PrintSink(Sink):
        def write(self, update):
            for r in update.records():
                print(r.step, r.tag, r.value)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradscope.sinks.records import Record, StepRecords, StepRow, records_of, scalar_rows

if TYPE_CHECKING:
    from torch import Tensor

    from gradscope.capture.layout import ParamInfo, ParamLayout
    from gradscope.findings import Finding
    from gradscope.report import Report
    from gradscope.stats.frame import StatsFrame

__all__ = ["Record", "ScopeInfo", "Sink", "SinkUpdate", "StepRecords"]


@dataclass
class ScopeInfo:
    """What a sink learns when the scope opens."""

    layout: ParamLayout
    model_name: str
    stats: tuple[str, ...]
    every: int
    activation_modules: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SinkUpdate:
    """One flush: rows ``frame.steps[new_from:]`` are new, and so are ``findings``.

    The same update goes to every sink of the scope; its records are computed at the first request
    and shared (per selection of ``stats`` and ``per_param``).

    Attributes:
        frame: all recorded rows (host arrays).
        new_from: first new row.
        findings: findings first reported at this flush.
        layers_by_depth: layer keys in forward order (input side first).
        final: True at ``close()``.
        updated: findings reported at an earlier flush whose episode changed since (a new
            ``last_step`` or ``resolved_step``), in their new state.
    """

    frame: StatsFrame
    new_from: int
    findings: list[Finding]
    layers_by_depth: list[str]
    final: bool = False
    updated: list[Finding] = field(default_factory=list)
    _records: dict[tuple[tuple[str, ...] | None, bool], list[StepRecords]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _rows: dict[tuple[tuple[str, ...] | None, bool], list[StepRow]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def rows_by_step(self, *, stats: Sequence[str] | None = None, per_param: bool = False) -> list[StepRow]:
        """:meth:`records_by_step` as arrays: one :class:`~gradscope.sinks.records.StepRow` per step.

        For writers that encode values in bulk; the same steps, tags and values, computed once per
        flush and selection for every sink.
        """
        key = (None if stats is None else tuple(stats), bool(per_param))
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = scalar_rows(self.frame, self.new_from, stats=key[0], per_param=key[1])
        return rows

    def records_by_step(self, *, stats: Sequence[str] | None = None, per_param: bool = False) -> list[StepRecords]:
        """The scalar records of the new rows, one group per step, in step order.

        Every collected statistic per layer and for the model, the activation statistics, and the
        scalars passed to ``scope.step``; NaN values, skipped optimizer steps (but for their scalars)
        and sampled statistics on other steps are left out. Tags are those of
        :mod:`gradscope.sinks.tags`; see :mod:`gradscope.sinks.records`.

        Args:
            stats: statistics to include (gradient and activation); None: all. Scalars always are.
            per_param: also one record per parameter (``gradscope/<stat>/<layer>/<param>``).
        """
        key = (None if stats is None else tuple(stats), bool(per_param))
        groups = self._records.get(key)
        if groups is None:
            groups = self._records[key] = records_of(self.rows_by_step(stats=key[0], per_param=key[1]))
        return groups

    def records(self, *, stats: Sequence[str] | None = None, per_param: bool = False) -> Iterator[Record]:
        """The records of :meth:`records_by_step`, one :class:`Record` per value, step by step."""
        for group in self.records_by_step(stats=stats, per_param=per_param):
            yield from group.records()


class Sink(ABC):
    """Base class of outputs. Register subclasses with ``@gradscope.register_sink(name)``.

    ``write`` receives each flush; read what is new with ``update.records()`` (or
    ``update.records_by_step()``) and ``update.findings``, and leave the output on disk when it
    returns: the process may die before the next flush. Optional dependencies are imported inside the
    sink, with an error naming the package to install. ``close()`` must be safe to call twice.
    """

    def open(self, info: ScopeInfo) -> None:  # noqa: B027 - optional hook
        """Called once when the scope is built."""

    def on_step(self, step: int, grads: list[tuple[ParamInfo, Tensor]]) -> None:  # noqa: B027 - optional hook
        """Called at each recorded step with the gradients the optimizer uses.

        Runs on the hot path: device work only, never a host sync (see DESIGN section 8). ``grads`` is
        empty at a step where :meth:`wants_grads` said no.
        """

    def wants_grads(self, step: int) -> bool:
        """Whether :meth:`on_step` reads the gradients at ``step`` (default: always).

        The list of (parameter, gradient) pairs is built in Python, one pair per tensor, every step; a
        sink that reads it only now and then (histograms every few hundred steps) says so here, and
        gets an empty list at the other steps, so a model with hundreds of tensors does not pay for it.
        """
        return True

    @abstractmethod
    def write(self, update: SinkUpdate) -> None:
        """Write what is new at a flush."""

    def close(self, report: Report) -> None:  # noqa: B027 - optional hook
        """Write the final verdict and release files (idempotent)."""
