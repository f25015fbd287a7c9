"""Host-side history of a run: moments and activations per recorded step, and the statistics they give.

Everything here is NumPy on the host, float64. Rules and sinks read statistics through this class,
so they can never trigger a device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gradscope.stats.moments import MOMENT_INDEX, MOMENTS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ACTIVATION_STATISTICS", "FrameSchema", "StatsFrame", "derive"]

_M = MOMENT_INDEX

#: Statistics of activation outputs, recorded on sampled steps (layer = the activation module).
ACTIVATION_STATISTICS = ("act_zero_fraction", "act_dead_fraction", "act_saturated_fraction")

GLOBAL = "*"


def derive(stat: str, mom: np.ndarray, numel: np.ndarray) -> np.ndarray:
    """A built-in statistic from (aggregated) moments.

    Args:
        stat: built-in statistic name.
        mom: ``[..., len(MOMENTS)]`` moments.
        numel: element counts broadcastable to ``mom[..., 0]``.

    Returns:
        ``mom[..., 0]``-shaped float64 array.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s, ss = mom[..., _M["sum"]], mom[..., _M["sumsq"]]
        if stat == "l2_norm":
            return np.sqrt(ss)
        if stat == "rms":
            return np.sqrt(ss / numel)
        if stat == "mean":
            return s / numel
        if stat == "std":
            mean = s / numel
            # Population variance from the first two moments, clipped at 0 against rounding.
            return np.sqrt(np.maximum(ss / numel - mean * mean, 0.0))
        if stat == "abs_max":
            lo, hi = mom[..., _M["min"]], mom[..., _M["max"]]
            return np.maximum(np.abs(lo), np.abs(hi))
        if stat == "zero_fraction":
            return (numel - mom[..., _M["nnz"]]) / numel
        if stat == "nonfinite_count":
            return mom[..., _M["nonfinite"]].copy()
        if stat == "param_norm":
            return np.sqrt(mom[..., _M["psumsq"]])
        if stat == "update_ratio":
            return np.sqrt(mom[..., _M["dsumsq"]]) / np.sqrt(mom[..., _M["psumsq"]])
    raise KeyError(stat)


@dataclass
class FrameSchema:
    """The fixed coordinates of a frame: parameters, layers, statistics, activation modules."""

    param_names: list[str]
    param_layers: list[str]
    param_leaves: list[str]
    numels: np.ndarray
    layers: list[str]
    layer_members: list[list[int]]
    stats: tuple[str, ...]
    builtin: tuple[str, ...]
    custom: dict[str, str]  # name -> reduce
    sampled_stats: tuple[str, ...] = ()  # statistics taken on sampled steps only
    act_modules: list[str] = field(default_factory=list)
    act_kinds: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)  # each parameter's dtype name ("float32"), for dtype-aware floors

    def custom_column(self, name: str) -> int:
        """Moment-array column of a custom statistic."""
        return len(MOMENTS) + list(self.custom).index(name)


def _aggregate(
    mom: np.ndarray, present: np.ndarray, numel: np.ndarray, members: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Moments of the concatenation of ``members``' gradients, per step: ``([S, n_moments], [S])``."""
    sub = mom[:, members, : len(MOMENTS)]
    pres = present[:, members]
    n = np.where(pres, numel[members][None, :], 0).sum(axis=1).astype(np.float64)
    out = np.empty((mom.shape[0], len(MOMENTS)))
    zero_if_absent = np.where(pres[..., None], sub, 0.0)
    for name in ("sum", "sumsq", "nnz", "nonfinite", "psumsq", "dsumsq"):
        out[:, _M[name]] = zero_if_absent[..., _M[name]].sum(axis=1)
    out[:, _M["min"]] = np.where(pres, sub[..., _M["min"]], np.inf).min(axis=1)
    out[:, _M["max"]] = np.where(pres, sub[..., _M["max"]], -np.inf).max(axis=1)
    none = n == 0
    out[none] = np.nan
    n[none] = np.nan
    return out, n


def _reduce_custom(vals: np.ndarray, present: np.ndarray, numel: np.ndarray, how: str) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(present, vals, np.nan)
        anyp = present.any(axis=1)
        if how == "mean":
            w = np.where(present, numel[None, :], 0.0)
            out = np.nansum(v * w, axis=1) / w.sum(axis=1)
        elif how == "sum":
            out = np.nansum(v, axis=1)
        elif how == "max":
            out = np.where(present, vals, -np.inf).max(axis=1)
        elif how == "min":
            out = np.where(present, vals, np.inf).min(axis=1)
        elif how == "norm":
            out = np.sqrt(np.nansum(v * v, axis=1))
        else:  # pragma: no cover - validated at registration
            raise ValueError(how)
    # a NaN on a present parameter (a non-finite gradient, a shard's value withheld) makes the aggregate NaN
    poisoned = (present & np.isnan(vals)).any(axis=1)
    return np.where(anyp & ~poisoned, out, np.nan)


class StatsFrame:
    """All recorded steps of a scope, on the host.

    Arrays (``S`` recorded steps, ``P`` parameters, ``L`` layers, ``A`` activation modules):
    ``steps [S]``, ``skipped [S]`` (the optimizer did not step, e.g. GradScaler found inf),
    ``has_grad [S, P]``, ``trainable [S, P]``, ``moments [S, P, C]``, ``sampled [S]`` (rows where the
    statistics of ``schema.sampled_stats`` and the activations were taken),
    ``act [S, A, K]``, and scalars (``loss``, ``val_loss``, user scalars) by name.

    Bounded history (``history=W``): the last ``W`` recorded rows are kept at full resolution. Older
    rows are *thinned*: only rows whose step is a multiple of a stride (counted from step 1) are
    kept, the stride starting at ``thin_every`` (the scope passes ``sample_every``, so kept rows are
    sampled rows, which carry every statistic) and doubling whenever the thinned part exceeds ``W``
    rows. The frame so never holds more than ``2 W`` rows (plus one flush), covers the whole run, and
    has full resolution where rules look (recent windows). Row indices therefore shift between
    flushes; steps do not. ``history=None`` keeps every row.

    Args:
        schema: the coordinates.
        history: rows kept at full resolution (``None``: all).
        thin_every: the first stride, in steps, of the thinned part.
    """

    def __init__(self, schema: FrameSchema, *, history: int | None = None, thin_every: int = 1) -> None:
        self.schema = schema
        self._chunks: list[dict[str, np.ndarray]] = []
        self._scalar_names: list[str] = []
        self._cache: dict[str, Any] | None = None
        self.history = history
        #: Current stride (in steps) of the thinned rows; ``thin_every`` until the first doubling.
        self.stride = max(1, int(thin_every))
        self._n_thinned = 0  # rows before this index are the thinned part
        #: Rows dropped by thinning so far.
        self.dropped = 0

    # -- building -----------------------------------------------------------------------------------
    def append(self, chunk: dict[str, np.ndarray], scalar_names: list[str]) -> None:
        """Add one flush worth of rows (see the class docstring for the keys); thin old rows if bounded."""
        if len(chunk["steps"]) == 0:
            return
        self._chunks.append(chunk)
        self._scalar_names = list(scalar_names)
        self._cache = None
        if self.history is not None and len(self) - self._n_thinned > self.history:
            self._thin()

    def _thin(self) -> None:
        arrays = self._arrays()
        steps = arrays["steps"]
        total = len(steps)
        full_from = total - int(self.history)  # type: ignore[arg-type]
        old = np.arange(full_from)
        # Rows that were already thinned satisfy the current stride; newly aged rows are filtered now.
        old = old[(steps[old] - 1) % self.stride == 0]
        while len(old) > int(self.history):  # type: ignore[arg-type]
            self.stride *= 2
            old = old[(steps[old] - 1) % self.stride == 0]
        keep = np.concatenate([old, np.arange(full_from, total)])
        self.dropped += total - len(keep)
        self._n_thinned = len(old)
        cache = {k: v[keep] for k, v in arrays.items()}
        self._chunks = [cache]
        self._cache = cache

    @property
    def full_from_step(self) -> int | None:
        """First step of the full-resolution window (earlier rows are thinned); None when empty."""
        steps = self.steps
        return int(steps[self._n_thinned]) if len(steps) > self._n_thinned else None

    def history_info(self) -> dict[str, Any]:
        """How much of the run the frame holds: for ``report.meta["history"]``."""
        return {
            "window": self.history,
            "rows": len(self),
            "full_from_step": self.full_from_step,
            "thinned_rows": self._n_thinned,
            "thinned_stride": self.stride if self._n_thinned or self.dropped else None,
            "dropped_rows": self.dropped,
        }

    def _arrays(self) -> dict[str, Any]:
        if self._cache is None:
            if not self._chunks:
                P, C = len(self.schema.param_names), len(MOMENTS) + len(self.schema.custom)
                A, K = len(self.schema.act_modules), len(ACTIVATION_STATISTICS)
                self._cache = {
                    "steps": np.zeros(0, dtype=np.int64),
                    "skipped": np.zeros(0, dtype=bool),
                    "has_grad": np.zeros((0, P), dtype=bool),
                    "trainable": np.zeros((0, P), dtype=bool),
                    "moments": np.zeros((0, P, C)),
                    "sampled": np.zeros(0, dtype=bool),
                    "act": np.zeros((0, A, K)),
                    "scalars": np.zeros((0, len(self._scalar_names))),
                }
            else:
                width = len(self._scalar_names)
                cache = {k: np.concatenate([c[k] for c in self._chunks]) for k in self._chunks[0] if k != "scalars"}
                # Scalars seen late get NaN in earlier rows.
                padded = []
                for c in self._chunks:
                    sc = c["scalars"]
                    if sc.shape[1] < width:
                        sc = np.concatenate([sc, np.full((sc.shape[0], width - sc.shape[1]), np.nan)], axis=1)
                    padded.append(sc[:, :width])
                cache["scalars"] = np.concatenate(padded)
                self._chunks = [cache]
                self._cache = cache
        return self._cache

    # -- coordinates ---------------------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        """Step number of each recorded row, ``[S]``."""
        return self._arrays()["steps"]

    @property
    def skipped(self) -> np.ndarray:
        """Rows whose optimizer step did not happen, ``[S]``."""
        return self._arrays()["skipped"]

    @property
    def has_grad(self) -> np.ndarray:
        """Whether each parameter had a gradient at each row, ``[S, P]``."""
        return self._arrays()["has_grad"]

    @property
    def trainable(self) -> np.ndarray:
        """Whether each parameter required a gradient at each row, ``[S, P]``."""
        return self._arrays()["trainable"]

    @property
    def moments(self) -> np.ndarray:
        """Raw moments and custom statistics, ``[S, P, C]``."""
        return self._arrays()["moments"]

    @property
    def sampled(self) -> np.ndarray:
        """Rows where the sampled statistics and activations were taken, ``[S]``."""
        return self._arrays()["sampled"]

    @property
    def scalar_names(self) -> list[str]:
        """Names of the scalars passed to ``scope.step`` (``loss``, ``val_loss``, ...)."""
        return list(self._scalar_names)

    def __len__(self) -> int:
        return len(self.steps)

    # -- values ----------------------------------------------------------------------------------------
    def _check_stat(self, stat: str) -> None:
        if stat not in self.schema.stats:
            raise KeyError(
                f"Statistic {stat!r} was not collected by this scope; collected: {', '.join(self.schema.stats)}."
            )

    def param_values(self, stat: str, rows: slice | None = None) -> np.ndarray:
        """``stat`` per parameter, ``[S, P]``; NaN where a parameter had no gradient or the row was not sampled.

        ``rows`` restricts the computation to those rows (``slice(new_from, None)`` at a flush).
        """
        self._check_stat(stat)
        rows = slice(None) if rows is None else rows
        mom = self.moments[rows]
        if stat in self.schema.custom:
            vals = mom[..., self.schema.custom_column(stat)].copy()
        else:
            vals = derive(stat, mom, self.schema.numels[None, :])
        return np.where(self.has_grad[rows], vals, np.nan)

    def layer_values(self, stat: str, rows: slice | None = None) -> np.ndarray:
        """``stat`` per layer (all of a layer's parameters together), ``[S, L]``; ``rows`` as in :meth:`param_values`."""
        self._check_stat(stat)
        rows = slice(None) if rows is None else rows
        return (
            np.stack([self._group_values(stat, members, rows) for members in self.schema.layer_members], axis=1)
            if self.schema.layer_members
            else np.zeros((len(self.steps[rows]), 0))
        )

    def layer_values_many(self, stats: list[str], rows: slice | None = None) -> dict[str, np.ndarray]:
        """Several statistics per layer, ``{stat: [S, L]}``, aggregating each layer's moments once."""
        rows = slice(None) if rows is None else rows
        for stat in stats:
            self._check_stat(stat)
        out = {s: self.layer_values(s, rows) for s in stats if s in self.schema.custom}
        builtin = [s for s in stats if s not in self.schema.custom]
        if builtin:
            mom, has = self.moments[rows], self.has_grad[rows]
            aggs = [_aggregate(mom, has, self.schema.numels, m) for m in self.schema.layer_members]
            for stat in builtin:
                out[stat] = (
                    np.stack([derive(stat, agg, n) for agg, n in aggs], axis=1)
                    if aggs
                    else np.zeros((len(self.steps[rows]), 0))
                )
        return {s: out[s] for s in stats}

    def global_values(self, stat: str, rows: slice | None = None) -> np.ndarray:
        """``stat`` over every parameter of the model together, ``[S]``; ``rows`` as in :meth:`param_values`."""
        self._check_stat(stat)
        rows = slice(None) if rows is None else rows
        return self._group_values(stat, list(range(len(self.schema.param_names))), rows)

    def _group_values(self, stat: str, members: list[int], rows: slice = slice(None)) -> np.ndarray:
        if stat in self.schema.custom:
            col = self.schema.custom_column(stat)
            return _reduce_custom(
                self.moments[rows, members, col],
                self.has_grad[rows][:, members],
                self.schema.numels[members],
                self.schema.custom[stat],
            )
        agg, n = _aggregate(self.moments[rows], self.has_grad[rows], self.schema.numels, members)
        return derive(stat, agg, n)

    def act_values(self, stat: str) -> np.ndarray:
        """Activation statistic per activation module, ``[S, A]`` (NaN on rows not sampled)."""
        k = ACTIVATION_STATISTICS.index(stat)
        return self._arrays()["act"][:, :, k]

    def scalar(self, name: str) -> np.ndarray:
        """A scalar passed to ``scope.step`` (``loss``, ``val_loss``...), ``[S]``; NaN where not passed."""
        if name not in self._scalar_names:
            return np.full(len(self), np.nan)
        return self._arrays()["scalars"][:, self._scalar_names.index(name)]

    # -- tables ----------------------------------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per (step, layer, param, stat) with columns step, layer, param, stat, value.

        ``param == "*"`` rows aggregate a layer; ``layer == "*"`` rows aggregate the whole model.
        Activation statistics sit on the activation module's row with ``param == "*"``. Rows of skipped
        optimizer steps are left out (see ``Report.skipped_steps``).
        """
        import pandas as pd

        sch = self.schema
        keep = ~self.skipped
        steps = self.steps[keep]
        S = len(steps)
        parts: list[pd.DataFrame] = []

        def add(values: np.ndarray, mask: np.ndarray, layers: list[str], params: list[str], stat: str) -> None:
            # values, mask: [S, N] over N (layer, param) pairs
            idx_s, idx_n = np.nonzero(mask)
            if len(idx_s) == 0:
                return
            parts.append(
                pd.DataFrame(
                    {
                        "step": steps[idx_s].astype(np.int64),
                        "layer": np.asarray(layers, dtype=object)[idx_n],
                        "param": np.asarray(params, dtype=object)[idx_n],
                        "stat": stat,
                        "value": values[idx_s, idx_n],
                    }
                )
            )

        if S:
            sampled = self.sampled[keep]
            for stat in sch.stats:
                has = self.has_grad[keep]
                if stat in sch.sampled_stats:
                    has = has & sampled[:, None]
                layer_any = np.stack([has[:, m].any(axis=1) for m in sch.layer_members], axis=1)
                add(self.param_values(stat)[keep], has, sch.param_layers, sch.param_leaves, stat)
                add(self.layer_values(stat)[keep], layer_any, sch.layers, ["*"] * len(sch.layers), stat)
                add(self.global_values(stat)[keep][:, None], has.any(axis=1)[:, None], [GLOBAL], ["*"], stat)
            if sch.act_modules:
                act = self._arrays()["act"][keep]
                for k, stat in enumerate(ACTIVATION_STATISTICS):
                    vals = act[:, :, k]
                    mask = sampled[:, None] & ~np.isnan(vals)
                    add(vals, mask, sch.act_modules, ["*"] * len(sch.act_modules), stat)
        if not parts:
            return pd.DataFrame(
                {
                    "step": pd.Series(dtype="int64"),
                    "layer": pd.Series(dtype=object),
                    "param": pd.Series(dtype=object),
                    "stat": pd.Series(dtype=object),
                    "value": pd.Series(dtype="float64"),
                }
            )
        df = pd.concat(parts, ignore_index=True)
        order = {s: i for i, s in enumerate((*sch.stats, *ACTIVATION_STATISTICS))}
        df["_o"] = df["stat"].map(order)
        df = df.sort_values(["step", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)
        return df

    def scalars_dataframe(self) -> pd.DataFrame:
        """Wide table of the scalars passed to ``scope.step``: index ``step``, one column per name."""
        import pandas as pd

        data = {name: self.scalar(name) for name in self._scalar_names}
        return pd.DataFrame(data, index=pd.Index(self.steps, name="step"))
