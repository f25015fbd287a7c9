"""Scalar records: what a flush adds, as ``(step, tag, value)``, ready for any tracker.

A sink for TensorBoard, a CSV file, MLflow or a Lightning logger wants the same thing from a flush:
the numbers of the new steps, each under its tag (:mod:`gradscope.sinks.tags`). This module turns the
frame's new rows into those records once per flush, with NumPy over whole blocks of values; sinks
read them with :meth:`gradscope.sinks.SinkUpdate.records_by_step` (one group per step) or
:meth:`gradscope.sinks.SinkUpdate.records` (flat), never by walking frame rows themselves.

What a flush yields, per new step:

* every selected statistic of each layer (``gradscope/<stat>/<layer>``) and of the whole model
  (``gradscope/<stat>/_model``), and per parameter (``gradscope/<stat>/<layer>/<param>``) on request;
* the activation statistics of each activation module (``gradscope/act_.../<module>``);
* the scalars passed to ``scope.step`` (``gradscope/scalar/<name>``).

Values and steps are those of ``report.stats`` and ``report.scalars``, with three omissions: NaN
values (a gradient holding NaN has NaN norms; ``nonfinite_count`` shows it), everything but the
scalars of a skipped optimizer step (GradScaler found inf), and statistics taken on sampled steps
only (``schema.sampled_stats``, the activation statistics) on the other steps. A step with nothing
left has no group.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.sinks import tags as T
from gradscope.stats.frame import ACTIVATION_STATISTICS

if TYPE_CHECKING:
    from gradscope.stats.frame import StatsFrame

__all__ = ["Record", "StepRecords", "check_stat_selection", "scalar_records", "stat_selection"]


@dataclass(frozen=True)
class Record:
    """One scalar: ``value`` of ``tag`` at ``step`` (counted from 1 per ``scope.step()``)."""

    step: int
    tag: str
    value: float


@dataclass(frozen=True)
class StepRecords:
    """Every scalar record of one step.

    Attributes:
        step: the step, counted from 1 per ``scope.step()``.
        values: tag -> value (Python floats, never NaN), statistics first (per statistic: the layers,
            the model, then the parameters), then activation statistics, then scalars. Shared by the
            sinks of a flush: copy it before handing it to code that may change it.
    """

    step: int
    values: dict[str, float]

    def records(self) -> Iterator[Record]:
        """The step's values as :class:`Record` objects, in the order of :attr:`values`."""
        for tag, value in self.values.items():
            yield Record(self.step, tag, value)


def stat_selection(owner: str, stats: Sequence[str] | None) -> tuple[str, ...] | None:
    """Check a sink's ``stats=`` argument at construction: None (every statistic) or a list of names.

    Args:
        owner: the sink's class name, for the message.
        stats: the argument.

    Raises:
        ConfigurationError: for anything but None or a sequence of strings.
    """
    if stats is None:
        return None
    if isinstance(stats, str) or not all(isinstance(x, str) for x in stats):
        raise ConfigurationError(
            f"Expected `stats` of {owner} to be a list of statistic names or None (all), but got {stats!r}."
        )
    return tuple(stats)


def check_stat_selection(owner: str, stats: tuple[str, ...] | None, collected: Sequence[str]) -> None:
    """At ``open``: every name of a sink's ``stats=`` must be collected by the scope (or be an activation statistic).

    Args:
        owner: the sink's class name, for the message.
        stats: the selection (None: everything).
        collected: the statistics the scope collects (``ScopeInfo.stats``).

    Raises:
        ConfigurationError: naming the unknown statistics and the choices.
    """
    if stats is None:
        return
    known = (*collected, *ACTIVATION_STATISTICS)
    unknown = [s for s in stats if s not in known]
    if unknown:
        raise ConfigurationError(
            f"{owner}(stats=...) names {', '.join(map(repr, unknown))}, which this scope does not collect. "
            f"Choose among: {', '.join(known)}."
        )


def scalar_records(
    frame: StatsFrame, start: int, *, stats: Sequence[str] | None = None, per_param: bool = False
) -> list[StepRecords]:
    """The scalar records of rows ``frame.steps[start:]``, one :class:`StepRecords` per step that has any.

    Every block of values (a statistic over the layers, over the parameters...) is masked with NumPy
    as a whole; Python touches each step once, not each value.

    Args:
        frame: the scope's frame.
        start: first new row.
        stats: statistics (gradient and activation) to include; None: all. Scalars are always included.
        per_param: also one record per parameter and statistic.

    Returns:
        The groups in step order (see the module docstring for what is included).
    """
    n = len(frame) - start
    if n <= 0:
        return []
    rows = slice(start, None)
    sch = frame.schema
    keep = ~frame.skipped[rows][:, None]  # [n, 1]: the optimizer stepped
    sampled = frame.sampled[rows][:, None]
    has = frame.has_grad[rows]
    everywhere = np.ones((n, 1), dtype=bool)
    values: list[np.ndarray] = []  # blocks [n, K]
    masks: list[np.ndarray] = []
    tags: list[str] = []

    def add(block: np.ndarray, mask: np.ndarray, block_tags: list[str]) -> None:
        values.append(block)
        masks.append(np.broadcast_to(mask, block.shape))
        tags.extend(block_tags)

    chosen = [s for s in sch.stats if stats is None or s in stats]
    if chosen:
        members = sch.layer_members
        layer_any = (
            np.stack([has[:, m].any(axis=1) for m in members], axis=1) if members else np.zeros((n, 0), dtype=bool)
        )
        model_any = has.any(axis=1, keepdims=True)
        per_layer = frame.layer_values_many(chosen, rows)
        param_tags = list(zip(sch.param_layers, sch.param_leaves))
        for stat in chosen:
            when = keep & (sampled if stat in sch.sampled_stats else everywhere)
            add(per_layer[stat], layer_any & when, [T.stat_tag(stat, layer) for layer in sch.layers])
            add(frame.global_values(stat, rows)[:, None], model_any & when, [T.stat_tag(stat, "*")])
            if per_param:
                add(
                    frame.param_values(stat, rows),
                    has & when,
                    [T.stat_tag(stat, layer, leaf) for layer, leaf in param_tags],
                )
    if sch.act_modules:
        for stat in ACTIVATION_STATISTICS:
            if stats is None or stat in stats:
                add(frame.act_values(stat)[rows], keep & sampled, [T.stat_tag(stat, m) for m in sch.act_modules])
    for name in frame.scalar_names:
        add(frame.scalar(name)[rows][:, None], everywhere, [T.scalar_tag(name)])  # kept on skipped steps too
    if not values:
        return []
    block = np.concatenate(values, axis=1).astype(np.float64, copy=False)
    # NaN values are left out: TensorBoard cannot chart them, and trackers reject or mangle them.
    mask: np.ndarray = np.concatenate(masks, axis=1) & ~np.isnan(block)
    tag_array = np.asarray(tags, dtype=object)
    steps = frame.steps[rows].tolist()
    out: list[StepRecords] = []
    for r in np.flatnonzero(mask.any(axis=1)).tolist():
        m = mask[r]
        out.append(StepRecords(int(steps[r]), dict(zip(tag_array[m].tolist(), block[r, m].tolist()))))
    return out
