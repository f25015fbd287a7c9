"""Tables derived from ``report.stats``: per-layer matrices, the per-layer summary, CSV export.

Everything here works from the long ``report.stats`` table alone (columns ``step, layer, param,
stat, value``), so a report read back with ``Report.from_json`` or from TensorBoard event files
gives the same tables as the live one. The table has one row per (step, layer or parameter,
statistic), millions for a long run of a large model, so every function here works on whole
columns (factorised codes, one scatter into a matrix, one grouped reduction), never per layer or per
row in Python: the cost is linear in the table's length, whatever the number of layers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from gradscope.stats.frame import StatsFrame
    from gradscope.views.source import ReportData as Report

__all__ = [
    "CSV_TABLES",
    "SUMMARY_AGGREGATES",
    "gradient_layers",
    "layer_matrix",
    "layer_order",
    "layer_statistics",
    "layer_summary",
    "to_csv",
]

#: Columns of :func:`layer_summary` for each statistic, in order.
SUMMARY_AGGREGATES = ("last", "min", "max", "median")
CSV_TABLES = ("stats", "layers", "scalars")


def _is(column: pd.Series, value: str) -> np.ndarray:
    """``column == value`` as a NumPy bool array (one vectorised comparison)."""
    return np.asarray((column == value).to_numpy(dtype=bool, na_value=False), dtype=bool)


def _layer_mask(stats: pd.DataFrame) -> np.ndarray:
    """Rows of layer aggregates (``param == "*"``, ``layer != "*"``), ``[N]`` bool."""
    return _is(stats["param"], "*") & ~_is(stats["layer"], "*")


def _unique(column: pd.Series) -> list[str]:
    """The distinct values of a column in order of appearance (hash-based: never a Python loop over rows)."""
    return list(column.unique())


def layer_order(stats: pd.DataFrame, layers_by_depth: Sequence[str] | None = None) -> list[str]:
    """Layers of ``stats`` in depth order (input side first), then any others in order of appearance.

    Args:
        stats: the long ``report.stats`` table.
        layers_by_depth: the run's depth order (``report.meta["layers_by_depth"]``), when known.
    """
    return _by_depth(_unique(stats["layer"][_layer_mask(stats)]), layers_by_depth)


def _by_depth(seen: list[str], layers_by_depth: Sequence[str] | None) -> list[str]:
    """``seen`` (layers in order of appearance) with those of ``layers_by_depth`` first, in its order."""
    present = set(seen)
    order = [layer for layer in (layers_by_depth or []) if layer in present]
    placed = set(order)
    return order + [layer for layer in seen if layer not in placed]


def layer_statistics(stats: pd.DataFrame) -> list[str]:
    """The statistics ``stats`` holds per layer (layer aggregate rows), in order of appearance."""
    return _unique(stats["stat"][_layer_mask(stats)])


def gradient_layers(stats: pd.DataFrame, layers_by_depth: Sequence[str] | None = None) -> list[str]:
    """Layers with gradient statistics (activation modules have only ``act_*`` rows), in :func:`layer_order`.

    Args:
        stats: the long ``report.stats`` table.
        layers_by_depth: the run's depth order (``report.meta["layers_by_depth"]``), when known.
    """
    grad = _layer_mask(stats) & ~np.asarray(stats["stat"].str.startswith("act_").to_numpy(dtype=bool), dtype=bool)
    present = set(_unique(stats["layer"][grad]))
    return [layer for layer in layer_order(stats, layers_by_depth) if layer in present]


def layer_matrix(
    stats: pd.DataFrame, stat: str, layers: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """One statistic of every layer as a matrix.

    Args:
        stats: the long ``report.stats`` table.
        stat: statistic name.
        layers: the layers (columns) wanted, in order; default: every layer with that statistic.

    Returns:
        ``(steps [S], layers [L], values [S, L])``: the steps where ``stat`` was recorded, and NaN
        where a layer has no value at a step.
    """
    import pandas as pd

    idx = np.flatnonzero(_is(stats["stat"], stat) & _layer_mask(stats))
    codes, uniques = pd.factorize(stats["layer"].take(idx))  # layers in order of appearance
    present = list(uniques)
    if layers is None:
        layers = present
    else:
        have = set(present)
        layers = [layer for layer in layers if layer in have]
    if not len(idx) or not layers:
        return np.zeros(0, dtype=np.int64), list(layers), np.zeros((0, len(layers)))
    steps, step_codes = np.unique(stats["step"].to_numpy(dtype=np.int64)[idx], return_inverse=True)
    column = {layer: j for j, layer in enumerate(layers)}
    col_of = np.array([column.get(layer, -1) for layer in present], dtype=np.int64)[codes]
    values = stats["value"].to_numpy(dtype=np.float64)[idx]
    # The first non-NaN value of each (step, layer), as a pivot with aggfunc="first" would take it.
    keep = (col_of >= 0) & ~np.isnan(values)
    cell = step_codes[keep] * len(layers) + col_of[keep]
    cell, first = np.unique(cell, return_index=True)
    out = np.full(len(steps) * len(layers), np.nan)
    out[cell] = values[keep][first]
    return steps, list(layers), out.reshape(len(steps), len(layers))


def layer_summary(report: Report) -> pd.DataFrame:
    """One row per layer: the last, smallest, largest and median value of each statistic.

    Rows are the layers in depth order (input side first), then activation modules, then ``"*"``,
    the whole model. Columns are a ``(stat, aggregate)`` MultiIndex, aggregates
    ``last, min, max, median``; ``last`` is the value at the layer's last recorded step, and the
    others skip NaN. Statistics taken on sampled steps only are summarised over those steps.

    Args:
        report: a :class:`gradscope.Report` (live, or read back from JSON or TensorBoard).

    Returns:
        A ``pandas.DataFrame`` indexed by ``layer``.
    """
    return aggregates(report).summary(report.meta.get("layers_by_depth"))


def _summary_of_table(stats: pd.DataFrame, layers_by_depth: Sequence[str] | None) -> pd.DataFrame:
    """:func:`layer_summary` from the long table (a report read back from JSON or event files)."""
    import pandas as pd

    idx = np.flatnonzero(_is(stats["param"], "*"))
    stat_codes, stat_order = pd.factorize(stats["stat"].take(idx))  # statistics in order of appearance
    layers = layer_order(stats, layers_by_depth)
    layer_codes, layer_uniques = pd.factorize(stats["layer"].take(idx))
    if "*" in set(layer_uniques):
        layers.append("*")
    columns = pd.MultiIndex.from_product([list(stat_order), list(SUMMARY_AGGREGATES)], names=["stat", "aggregate"])
    if not len(idx):
        return pd.DataFrame(index=pd.Index([], name="layer"), columns=columns, dtype=float)
    n_stats, n_aggs = len(stat_order), len(SUMMARY_AGGREGATES)
    key = layer_codes.astype(np.int64) * n_stats + stat_codes  # one (layer, stat) group per key
    steps = stats["step"].to_numpy(dtype=np.int64)[idx]
    values = stats["value"].to_numpy(dtype=np.float64)[idx]
    n_keys = len(layer_uniques) * n_stats
    agg = np.full((n_keys, n_aggs), np.nan)
    # last: the value at the group's last row by step (stable: the later row of a tied step), NaN included
    by_step = np.lexsort((steps, key))
    ends = np.flatnonzero(np.r_[key[by_step][1:] != key[by_step][:-1], True])
    agg[key[by_step][ends], 0] = values[by_step][ends]
    # min, max, median over the group's non-NaN values (NaN when it has none)
    valid = ~np.isnan(values)
    k, v = key[valid], values[valid]
    by_value = np.lexsort((v, k))
    k, v = k[by_value], v[by_value]
    count = np.bincount(k, minlength=n_keys)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    has = np.flatnonzero(count)
    lo, hi = start[has], start[has] + count[has] - 1
    agg[has, 1] = v[lo]
    agg[has, 2] = v[hi]
    agg[has, 3] = (v[start[has] + (count[has] - 1) // 2] + v[start[has] + count[has] // 2]) / 2
    # rows: the layers in report order; columns: (stat, aggregate)
    row_of = {layer: i for i, layer in enumerate(layer_uniques)}
    rows = np.array([row_of.get(layer, -1) for layer in layers], dtype=np.int64)
    cube = agg.reshape(len(layer_uniques), n_stats * n_aggs)
    table = np.where(rows[:, None] >= 0, cube[np.maximum(rows, 0)], np.nan) if len(rows) else cube[:0]
    return pd.DataFrame(table, index=pd.Index(layers, name="layer"), columns=columns)


# -- the layer rows of a report (``param == "*"``), from its frame or from its table ----------------------
class _TableAggregates:
    """The layer rows of a report's long table (a report read back from JSON or event files)."""

    def __init__(self, stats: pd.DataFrame) -> None:
        self.stats = stats

    @property
    def empty(self) -> bool:
        return bool(self.stats.empty)

    def last_step(self) -> int:
        return int(self.stats["step"].max())

    def order(self, layers_by_depth: Sequence[str] | None) -> list[str]:
        return layer_order(self.stats, layers_by_depth)

    def statistics(self) -> list[str]:
        return layer_statistics(self.stats)

    def gradient_layers(self, layers_by_depth: Sequence[str] | None) -> list[str]:
        return gradient_layers(self.stats, layers_by_depth)

    def matrix(self, stat: str, layers: Sequence[str] | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
        return layer_matrix(self.stats, stat, layers)

    def model(self, stat: str, steps: np.ndarray) -> np.ndarray | None:
        stats = self.stats
        whole = stats[(stats["layer"] == "*") & (stats["stat"] == stat)].set_index("step")["value"]
        return whole.reindex(steps).to_numpy(dtype=np.float64) if len(whole) else None

    def summary(self, layers_by_depth: Sequence[str] | None, stats: Sequence[str] | None = None) -> pd.DataFrame:
        summary = _summary_of_table(self.stats, layers_by_depth)
        if stats is None:
            return summary
        return summary.loc[:, [c for c in summary.columns if c[0] in set(stats)]]

    def latest(self, stats: Sequence[str]) -> pd.DataFrame:
        import pandas as pd

        summary = self.summary(None, stats)
        summary = summary[summary.index != "*"]
        return pd.DataFrame({s: summary[(s, "last")] for s in stats if (s, "last") in summary.columns})


class _FrameAggregates:
    """The same answers as :class:`_TableAggregates`, read from the run's frame without building the table.

    ``report.stats`` of a long run of a large model has millions of rows, and building it takes
    seconds; a live report's text, summary and plots need only the layer and model aggregates, which
    :meth:`StatsFrame.aggregate_block` gives as ``[steps, layers]`` matrices. "Order of appearance" is
    the table's: rows by step, then columns by statistic (the frame's order, activation statistics
    last), then parameters, layers, the model; so the first entry of each layer or statistic is found
    from each block's first present row and its column.
    """

    def __init__(self, frame: StatsFrame) -> None:
        from gradscope.stats.frame import ACTIVATION_STATISTICS

        sch = frame.schema
        self.frame = frame
        self.act_stats = list(ACTIVATION_STATISTICS) if sch.act_modules else []
        self.stats = [*sch.stats, *self.act_stats]
        P, L, A = len(sch.param_names), len(sch.layers), len(sch.act_modules)
        # the table column of each block's first entry (the first layer, or the first activation module)
        self._col0 = {stat: i * (P + L + 1) + P for i, stat in enumerate(sch.stats)}
        self._col0.update({stat: len(sch.stats) * (P + L + 1) + k * A for k, stat in enumerate(self.act_stats)})
        self._width = len(sch.stats) * (P + L + 1) + len(self.act_stats) * A
        self._blocks: dict[str, tuple[np.ndarray, list[str], np.ndarray | None, np.ndarray]] = {}
        self._present: dict[Any, tuple[np.ndarray, list[str], np.ndarray]] = {}

    def block(self, stat: str) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        """``frame.aggregate_block(stat)``, once per statistic."""
        if stat not in self._blocks:
            self._blocks[stat] = self.frame.aggregate_block(stat)
        steps, names, values, present = self._blocks[stat]
        assert values is not None
        return steps, names, values, present

    def presence(self, stat: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(steps, names, present)`` of ``stat`` without its values (gradient statistics share them)."""
        if stat in self._blocks:
            steps, names, _, present = self._blocks[stat]
            return steps, names, present
        key = stat if stat in self.act_stats else stat in self.frame.schema.sampled_stats
        if key not in self._present:
            steps, names, _, present = self.frame.aggregate_block(stat, values=False)
            self._present[key] = (steps, names, present)
        return self._present[key]

    def _firsts(self, stat: str, *, model: bool) -> tuple[list[str], np.ndarray]:
        """The entities of ``stat`` (the model too when ``model``) and where each first appears (-1: never)."""
        _, names, present = self.presence(stat)
        if not model and names and names[-1] == "*" and stat not in self.act_stats:
            names, present = names[:-1], present[:, :-1]
        if not len(present):
            return names, np.full(len(names), -1, dtype=np.int64)
        seen = present.any(axis=0)
        key = np.argmax(present, axis=0).astype(np.int64) * self._width + self._col0[stat] + np.arange(len(names))
        return names, np.where(seen, key, -1)

    def _appearance(self, stats: Sequence[str], *, model: bool = False) -> dict[str, int]:
        """Each entity of ``stats`` present at least once, with the key of its first entry (smaller: earlier)."""
        first: dict[str, int] = {}
        for stat in stats:
            names, keys = self._firsts(stat, model=model)
            for j in np.flatnonzero(keys >= 0):
                name, key = names[j], int(keys[j])
                if name not in first or key < first[name]:
                    first[name] = key
        return first

    def _stat_appearance(self, *, model: bool) -> list[str]:
        firsts = {}
        for stat in self.stats:
            keys = self._firsts(stat, model=model)[1]
            if (keys >= 0).any():
                firsts[stat] = int(keys[keys >= 0].min())
        return sorted(firsts, key=firsts.__getitem__)

    @property
    def empty(self) -> bool:
        return not any(self.presence(stat)[2].any() for stat in self.stats)

    def last_step(self) -> int:
        blocks = map(self.presence, self.stats)
        return max(int(steps[present.any(axis=1)].max()) for steps, _, present in blocks if present.any())

    def order(self, layers_by_depth: Sequence[str] | None) -> list[str]:
        first = self._appearance(self.stats)
        return _by_depth(sorted(first, key=first.__getitem__), layers_by_depth)

    def statistics(self) -> list[str]:
        return self._stat_appearance(model=False)

    def gradient_layers(self, layers_by_depth: Sequence[str] | None) -> list[str]:
        grad = self._appearance([s for s in self.stats if not s.startswith("act_")])
        return [layer for layer in self.order(layers_by_depth) if layer in grad]

    def matrix(self, stat: str, layers: Sequence[str] | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
        if stat not in self.stats:
            return np.zeros(0, dtype=np.int64), [], np.zeros((0, 0))
        names, keys = self._firsts(stat, model=False)
        seen = np.flatnonzero(keys >= 0)
        present_names = [names[j] for j in seen[np.argsort(keys[seen], kind="stable")]]
        if layers is None:
            layers = present_names
        else:
            have = set(present_names)
            layers = [layer for layer in layers if layer in have]
        steps, _, values, present = self.block(stat)
        present = present[:, : len(names)]
        rows = present.any(axis=1)
        if not rows.any() or not layers:
            return np.zeros(0, dtype=np.int64), list(layers), np.zeros((0, len(layers)))
        col = {name: j for j, name in enumerate(names)}
        cols = np.array([col[layer] for layer in layers], dtype=np.int64)
        out = np.where(present[rows][:, cols], values[rows][:, cols], np.nan)
        return steps[rows].astype(np.int64), list(layers), out

    def model(self, stat: str, steps: np.ndarray) -> np.ndarray | None:
        if stat not in self.stats or stat in self.act_stats:
            return None
        if not self.presence(stat)[2][:, -1].any():
            return None
        at, _, values, present = self.block(stat)
        series = np.where(present[:, -1], values[:, -1], np.nan)
        pos = np.searchsorted(at, steps)
        ok = (pos < len(at)) & (at[np.minimum(pos, len(at) - 1)] == steps)
        return np.where(ok, series[np.minimum(pos, len(at) - 1)], np.nan)

    def latest(self, stats: Sequence[str]) -> pd.DataFrame:
        """Each layer's last value of each of ``stats`` (the ``last`` of :meth:`summary`), read at those rows only."""
        import pandas as pd

        columns = {}
        layers = [layer for layer in self.summary_rows(None) if layer != "*"]
        row_of = {layer: i for i, layer in enumerate(layers)}
        known = set(self._stat_appearance(model=True))
        for stat in [s for s in stats if s in known]:
            _, names, present = self.presence(stat)
            out = np.full(len(layers), np.nan)
            seen = present.any(axis=0)
            if seen.any():
                last = len(present) - 1 - np.argmax(present[::-1], axis=0)
                at = np.unique(last[seen])  # the few rows the last values sit on
                values = self.frame.aggregate_values(stat, np.flatnonzero(~self.frame.skipped)[at])
                cell = values[np.minimum(np.searchsorted(at, last), len(at) - 1), np.arange(len(names))]
                for j in np.flatnonzero(seen):
                    if names[j] in row_of:
                        out[row_of[names[j]]] = cell[j]
            columns[stat] = out
        return pd.DataFrame(columns, index=pd.Index(layers, name="layer"))

    def summary_rows(self, layers_by_depth: Sequence[str] | None) -> list[str]:
        """The rows of :meth:`summary`: the layers in :meth:`order`, then ``"*"`` when the model has entries."""
        layers = self.order(layers_by_depth)
        if any(self.presence(s)[2][:, -1].any() for s in self.stats if s not in self.act_stats):
            layers.append("*")
        return layers

    def summary(self, layers_by_depth: Sequence[str] | None, stats: Sequence[str] | None = None) -> pd.DataFrame:
        import pandas as pd

        every = self._stat_appearance(model=True)
        stat_order = every if stats is None else [s for s in every if s in set(stats)]  # only these are aggregated
        layers = self.summary_rows(layers_by_depth)
        columns = pd.MultiIndex.from_product([stat_order, list(SUMMARY_AGGREGATES)], names=["stat", "aggregate"])
        if not every:
            return pd.DataFrame(index=pd.Index([], name="layer"), columns=columns, dtype=float)
        row_of = {layer: i for i, layer in enumerate(layers)}
        table = np.full((len(layers), len(stat_order), len(SUMMARY_AGGREGATES)), np.nan)
        for k, stat in enumerate(stat_order):
            _, names, values, present = self.block(stat)
            agg = _column_aggregates(values, present)
            rows = np.array([row_of.get(name, -1) for name in names], dtype=np.int64)
            keep = rows >= 0
            table[rows[keep], k] = agg[keep]
        return pd.DataFrame(table.reshape(len(layers), -1), index=pd.Index(layers, name="layer"), columns=columns)


def _column_aggregates(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The summary's aggregates of each column of ``values [R, E]`` over its ``present`` rows, ``[E, 4]``.

    The last value (NaN included), and the smallest, largest and median non-NaN one (NaN when none),
    as :func:`_summary_of_table` takes them.
    """
    n_rows, n_cols = values.shape
    out = np.full((n_cols, len(SUMMARY_AGGREGATES)), np.nan)
    if not n_rows or not n_cols:
        return out
    any_present = present.any(axis=0)
    last = n_rows - 1 - np.argmax(present[::-1], axis=0)
    out[any_present, 0] = values[last, np.arange(n_cols)][any_present]
    valid = present & ~np.isnan(values)
    ordered = np.sort(np.where(valid, values, np.nan), axis=0)  # NaN sorts last
    count = valid.sum(axis=0)
    has = np.flatnonzero(count)
    c = count[has]
    out[has, 1] = ordered[0, has]
    out[has, 2] = ordered[c - 1, has]
    out[has, 3] = (ordered[(c - 1) // 2, has] + ordered[c // 2, has]) / 2
    return out


def aggregates(report: Report) -> _TableAggregates | _FrameAggregates:
    """The layer rows of ``report``: from its frame when it has one (a live or closed run), else its table."""
    frame = getattr(report, "_frame", None)
    if frame is None or getattr(report, "_stats", None) is not None:
        return _TableAggregates(report.stats)
    # the views of one report share the matrices; a live frame that grew since gets new ones
    key = (id(frame), len(frame), int(frame.steps[-1]) if len(frame) else 0, frame.dropped)
    held = getattr(report, "_aggregates", None)
    if held is None or held[0] != key:
        held = (key, _FrameAggregates(frame))
        try:
            report._aggregates = held  # type: ignore[attr-defined]  # reason: a cache on the report object
        except AttributeError:  # a report-like object that takes no attributes
            pass
    return held[1]


def to_csv(report: Report, path: Union[str, os.PathLike[str]], *, table: str = "stats") -> Path:
    """Write one of the report's tables as CSV.

    Args:
        report: the report.
        path: file to write (folders are created).
        table: ``"stats"`` (the long ``report.stats``), ``"layers"`` (:func:`layer_summary`, columns
            named ``<stat>_<aggregate>``) or ``"scalars"`` (``report.scalars``, one column per scalar).

    Returns:
        The path written.
    """
    if table not in CSV_TABLES:
        raise ValueError(f"Expected `table` to be one of {', '.join(CSV_TABLES)}, but got {table!r}.")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if table == "stats":
        report.stats.to_csv(target, index=False)
    elif table == "layers":
        summary = layer_summary(report)
        summary.columns = [f"{stat}_{agg}" for stat, agg in summary.columns]
        summary.to_csv(target)
    else:
        report.scalars.to_csv(target)
    return target
