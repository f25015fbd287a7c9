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

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.sinks import tags as T
from gradscope.stats.frame import ACTIVATION_STATISTICS

if TYPE_CHECKING:
    from gradscope.stats.frame import FrameSchema, StatsFrame

__all__ = [
    "Record",
    "StepRecords",
    "StepRow",
    "check_stat_selection",
    "records_of",
    "scalar_records",
    "scalar_rows",
    "stat_selection",
]


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


#: Tag lists per (schema, selection), so a flush builds no tag string: ``id(schema)`` -> (weak
#: reference to the schema, {key: tags}). A schema lives as long as its scope; the weak reference
#: tells a reused ``id`` from the same schema.
_TAG_CACHE: dict[int, tuple[weakref.ref[FrameSchema], dict[tuple[object, ...], list[str]]]] = {}


def _column_tags(
    sch: FrameSchema, chosen: tuple[str, ...], acts: tuple[str, ...], scalars: tuple[str, ...], per_param: bool
) -> list[str]:
    """The tags of the columns :func:`scalar_records` concatenates, in its order; built once per selection."""
    entry = _TAG_CACHE.get(id(sch))
    if entry is None or entry[0]() is not sch:
        for dead in [k for k, (ref, _) in _TAG_CACHE.items() if ref() is None]:  # drop dead schemas
            del _TAG_CACHE[dead]
        entry = _TAG_CACHE[id(sch)] = (weakref.ref(sch), {})
    key = (chosen, acts, scalars, per_param)
    tags = entry[1].get(key)
    if tags is None:
        tags = []
        for stat in chosen:
            tags.extend(T.stat_tag(stat, layer) for layer in sch.layers)
            tags.append(T.stat_tag(stat, "*"))
            if per_param:
                tags.extend(T.stat_tag(stat, layer, leaf) for layer, leaf in zip(sch.param_layers, sch.param_leaves))
        for stat in acts:
            tags.extend(T.stat_tag(stat, m) for m in sch.act_modules)
        tags.extend(T.scalar_tag(name) for name in scalars)
        entry[1][key] = tags
    return tags


@dataclass(frozen=True)
class StepRow:
    """The scalar records of one step as arrays: what :class:`StepRecords` holds, without the dict.

    Attributes:
        step: the step.
        tags: the tags, in the order of :attr:`StepRecords.values`; rows of a flush with the same
            kept columns share one tuple (compare with ``is`` to group them).
        values: ``[len(tags)]`` float64, never NaN.
    """

    step: int
    tags: tuple[str, ...]
    values: np.ndarray


def scalar_records(
    frame: StatsFrame, start: int, *, stats: Sequence[str] | None = None, per_param: bool = False
) -> list[StepRecords]:
    """The scalar records of rows ``frame.steps[start:]``, one :class:`StepRecords` per step that has any.

    Every block of values (a statistic over the layers, over the parameters...) is masked with NumPy
    as a whole, the tags are built once per scope and selection, and Python touches each step once,
    not each value.

    Args:
        frame: the scope's frame.
        start: first new row.
        stats: statistics (gradient and activation) to include; None: all. Scalars are always included.
        per_param: also one record per parameter and statistic.

    Returns:
        The groups in step order (see the module docstring for what is included).
    """
    return records_of(scalar_rows(frame, start, stats=stats, per_param=per_param))


def records_of(rows: Sequence[StepRow]) -> list[StepRecords]:
    """:class:`StepRecords` of :func:`scalar_rows` (Python floats under their tags)."""
    return [StepRecords(r.step, dict(zip(r.tags, r.values.tolist()))) for r in rows]


def scalar_rows(
    frame: StatsFrame, start: int, *, stats: Sequence[str] | None = None, per_param: bool = False
) -> list[StepRow]:
    """What :func:`scalar_records` gives, as one :class:`StepRow` per step (tags and a float64 array).

    For writers that encode values in bulk (TensorBoard's event files): no dict per step, and the
    rows of one pattern of kept columns share their tags.
    """
    n = len(frame) - start
    if n <= 0:
        return []
    rows = slice(start, None)
    sch = frame.schema
    keep = ~frame.skipped[rows][:, None]  # [n, 1]: the optimizer stepped
    keep_sampled = keep & frame.sampled[rows][:, None]
    has = frame.has_grad[rows]
    values: list[np.ndarray] = []  # blocks [n, K], in the order of _column_tags
    masks: list[np.ndarray] = []

    def add(block: np.ndarray, mask: np.ndarray) -> None:
        values.append(block)
        masks.append(mask)  # [n, K], [n, 1] or [1, 1]: broadcast when copied into the whole mask

    chosen = tuple(s for s in sch.stats if stats is None or s in stats)
    if chosen:
        layer_any = sch.layer_groups.any(has)  # [n, L]: a layer had a gradient
        model_any = has.any(axis=1, keepdims=True)
        per_layer = frame.layer_values_many(chosen, rows)
        per_model = frame.global_values_many(chosen, rows)
        masked: dict[bool, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # sampled? -> the three masks
        for stat in chosen:
            sampled_only = stat in sch.sampled_stats
            if sampled_only not in masked:
                when = keep_sampled if sampled_only else keep
                masked[sampled_only] = (layer_any & when, model_any & when, has & when if per_param else has)
            layer_mask, model_mask, param_mask = masked[sampled_only]
            add(per_layer[stat], layer_mask)
            add(per_model[stat][:, None], model_mask)
            if per_param:
                add(frame.param_values(stat, rows), param_mask)
    acts: tuple[str, ...] = ()
    if sch.act_modules:
        acts = tuple(s for s in ACTIVATION_STATISTICS if stats is None or s in stats)
        for stat in acts:
            add(frame.act_values(stat)[rows], keep_sampled)
    scalars = tuple(frame.scalar_names)
    for name in scalars:
        add(frame.scalar(name)[rows][:, None], np.ones((1, 1), dtype=bool))  # kept on skipped steps too
    if not values:
        return []
    tags = tuple(_column_tags(sch, chosen, acts, scalars, per_param))
    block = np.concatenate(values, axis=1).astype(np.float64, copy=False)
    mask = np.empty(block.shape, dtype=bool)
    col = 0
    for part, part_mask in zip(values, masks):
        mask[:, col : col + part.shape[1]] = part_mask
        col += part.shape[1]
    # NaN values are left out: TensorBoard cannot chart them, and trackers reject or mangle them.
    mask &= ~np.isnan(block)
    # Rows share a few patterns of kept columns (sampled or not, every layer with a gradient or not):
    # each pattern's tags are picked once, and its rows' values taken as one block.
    packed = np.packbits(mask, axis=1)
    width = packed.shape[1]
    raw = packed.tobytes()
    patterns: dict[bytes, list[int]] = {}
    for r in range(n):
        patterns.setdefault(raw[r * width : (r + 1) * width], []).append(r)
    steps = frame.steps[rows].tolist()
    by_row: list[StepRow | None] = [None] * n
    for members in patterns.values():
        cols = np.flatnonzero(mask[members[0]])
        if not len(cols):
            continue
        kept = tags if len(cols) == len(tags) else tuple(tags[c] for c in cols.tolist())
        chunk = block[np.ix_(np.asarray(members), cols)]
        for k, r in enumerate(members):
            by_row[r] = StepRow(int(steps[r]), kept, chunk[k])
    return [g for g in by_row if g is not None]
