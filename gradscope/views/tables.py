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
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

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
    seen = _unique(stats["layer"][_layer_mask(stats)])
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
    import pandas as pd

    stats = report.stats
    idx = np.flatnonzero(_is(stats["param"], "*"))
    stat_codes, stat_order = pd.factorize(stats["stat"].take(idx))  # statistics in order of appearance
    layers = layer_order(stats, report.meta.get("layers_by_depth"))
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
