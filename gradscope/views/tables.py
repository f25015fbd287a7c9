"""Tables derived from ``report.stats``: per-layer matrices, the per-layer summary, CSV export.

Everything here works from the long ``report.stats`` table alone (columns ``step, layer, param,
stat, value``), so a report read back with ``Report.from_json`` or from TensorBoard event files
gives the same tables as the live one.
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

__all__ = ["CSV_TABLES", "SUMMARY_AGGREGATES", "layer_matrix", "layer_order", "layer_summary", "to_csv"]

#: Columns of :func:`layer_summary` for each statistic, in order.
SUMMARY_AGGREGATES = ("last", "min", "max", "median")
CSV_TABLES = ("stats", "layers", "scalars")


def _layer_rows(stats: pd.DataFrame) -> pd.DataFrame:
    return stats[(stats["param"] == "*") & (stats["layer"] != "*")]


def layer_order(stats: pd.DataFrame, layers_by_depth: Sequence[str] | None = None) -> list[str]:
    """Layers of ``stats`` in depth order (input side first), then any others in order of appearance.

    Args:
        stats: the long ``report.stats`` table.
        layers_by_depth: the run's depth order (``report.meta["layers_by_depth"]``), when known.
    """
    seen = list(dict.fromkeys(_layer_rows(stats)["layer"]))
    present = set(seen)
    order = [layer for layer in (layers_by_depth or []) if layer in present]
    placed = set(order)
    return order + [layer for layer in seen if layer not in placed]


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
    rows = _layer_rows(stats)
    rows = rows[rows["stat"] == stat]
    if layers is None:
        layers = list(dict.fromkeys(rows["layer"]))
    else:
        layers = [layer for layer in layers if layer in set(rows["layer"])]
    if rows.empty or not layers:
        return np.zeros(0, dtype=np.int64), list(layers), np.zeros((0, len(layers)))
    wide = rows.pivot_table(index="step", columns="layer", values="value", aggfunc="first", dropna=False)
    wide = wide.reindex(columns=list(layers))
    return wide.index.to_numpy(dtype=np.int64), list(layers), wide.to_numpy(dtype=np.float64)


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
    agg_rows = stats[stats["param"] == "*"]
    stat_order = list(dict.fromkeys(agg_rows["stat"]))
    layers = layer_order(stats, report.meta.get("layers_by_depth"))
    if (agg_rows["layer"] == "*").any():
        layers.append("*")
    if agg_rows.empty:
        columns = pd.MultiIndex.from_product([[], list(SUMMARY_AGGREGATES)], names=["stat", "aggregate"])
        return pd.DataFrame(index=pd.Index([], name="layer"), columns=columns, dtype=float)
    ordered = agg_rows.sort_values("step", kind="stable")
    grouped = ordered.groupby(["layer", "stat"], sort=False)["value"]
    table = pd.DataFrame(
        {
            "last": grouped.apply(lambda v: v.iloc[-1]),
            "min": grouped.min(),
            "max": grouped.max(),
            "median": grouped.median(),
        }
    )
    wide = table.unstack("stat")  # columns (aggregate, stat)
    wide = wide.swaplevel(0, 1, axis=1)
    columns = pd.MultiIndex.from_product([stat_order, list(SUMMARY_AGGREGATES)], names=["stat", "aggregate"])
    wide = wide.reindex(index=layers, columns=columns)
    wide.index.name = "layer"
    return wide


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
