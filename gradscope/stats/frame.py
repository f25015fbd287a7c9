"""Host-side history of a run: moments and activations per recorded step, and the statistics they give.

Everything here is NumPy on the host, float64. Rules and sinks read statistics through this class, by
the names users see (``frame.layer_values("rms", rows)``), so they can never trigger a device
synchronisation and never index a raw moment column.

Layer and model values aggregate exactly: a built-in statistic of a group is derived from the group's
moments (sums, minima, maxima of its parameters' moments), computed for all groups at once with one
matrix product per summed moment (a one-hot ``[P, L]`` membership matrix) and one ``reduceat`` per
extreme, never a Python loop over layers: a flush costs the same with 10 layers or 1000.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from gradscope.stats.base import MomentView, Statistic
from gradscope.stats.moments import MOMENT_INDEX, MOMENTS, SUM_MOMENTS
from gradscope.stats.registry import STATISTICS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ACTIVATION_STATISTICS", "FrameSchema", "Rows", "StatsFrame", "derive"]

#: Statistics of activation outputs, recorded on sampled steps (layer = the activation module).
ACTIVATION_STATISTICS = ("act_zero_fraction", "act_dead_fraction", "act_saturated_fraction")

GLOBAL = "*"

#: Rows of a frame: all (None), a slice, or an index array.
Rows = Union[slice, np.ndarray, None]


def derive(stat: str | Statistic, mom: np.ndarray, numel: Any) -> np.ndarray:
    """A built-in statistic from (aggregated) moments.

    Args:
        stat: a built-in statistic, or its name.
        mom: ``[..., len(MOMENTS)]`` moments.
        numel: element counts broadcastable to ``mom[..., 0]`` (NaN for an empty group).

    Returns:
        ``mom[..., 0]``-shaped float64 array.

    Raises:
        KeyError: ``stat`` is not derived from moments (a custom statistic).
    """
    s = STATISTICS.get(stat) if isinstance(stat, str) else stat
    if s.derive is None:
        raise KeyError(f"Statistic {s.name!r} is a custom statistic: it is computed per parameter, not derived.")
    view = MomentView({m: mom[..., MOMENT_INDEX[m]] for m in s.moments}, numel)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return s.derive(view)


@dataclass(frozen=True)
class _Groups:
    """Parameters grouped (into layers, or the whole model as one group), laid out for vectorised reductions.

    Attributes:
        member: one-hot ``[P, G]``: parameter ``p`` belongs to group ``g``.
        order: parameter indices, group after group (non-empty groups only).
        starts: where each non-empty group starts in ``order``.
        nonempty: indices of the groups with at least one parameter.
    """

    member: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    nonempty: np.ndarray

    @classmethod
    def of(cls, members: Sequence[Sequence[int]], n_params: int) -> _Groups:
        member = np.zeros((n_params, len(members)))
        for g, ps in enumerate(members):
            member[list(ps), g] = 1.0
        nonempty = np.array([g for g, ps in enumerate(members) if len(ps)], dtype=np.int64)
        sizes = [len(members[g]) for g in nonempty]
        order = np.array([p for g in nonempty for p in members[g]], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)
        return cls(member=member, order=order, starts=starts, nonempty=nonempty)

    def sum(self, vals: np.ndarray, has: np.ndarray) -> np.ndarray:
        """Sum of ``vals [R, P]`` over each group's parameters in ``has [R, P]``, ``[R, G]``.

        NaN and infinities come out as plain summation would give them (NaN in, or +inf and -inf
        together: NaN; +inf or -inf: that), without spreading to other groups: in the product
        ``NaN * 0`` would reach every group, so non-finite values are counted apart.
        """
        x = np.where(has, vals, 0.0)
        finite = np.isfinite(x)
        out = np.where(finite, x, 0.0) @ self.member
        if not finite.all():
            nan = (np.isnan(x).astype(np.float64) @ self.member) > 0
            pinf = ((x == np.inf).astype(np.float64) @ self.member) > 0
            ninf = ((x == -np.inf).astype(np.float64) @ self.member) > 0
            out = np.where(pinf, np.inf, out)
            out = np.where(ninf, -np.inf, out)
            out = np.where(nan | (pinf & ninf), np.nan, out)
        return out

    def extreme(self, ufunc: np.ufunc, vals: np.ndarray, has: np.ndarray, fill: float) -> np.ndarray:
        """``ufunc`` (``np.minimum``/``np.maximum``) over each group's parameters in ``has``, ``[R, G]``.

        NaN propagates; parameters without a gradient count as ``fill``; empty groups give NaN.
        """
        out = np.full((vals.shape[0], self.member.shape[1]), np.nan)
        if len(self.nonempty):
            x = np.where(has, vals, fill)[:, self.order]
            out[:, self.nonempty] = ufunc.reduceat(x, self.starts, axis=1)
        return out

    def count(self, has: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``sum(weights[p])`` over each group's parameters in ``has``, ``[R, G]`` (0 when none)."""
        return (has.astype(np.float64) * weights[None, :]) @ self.member


@dataclass
class FrameSchema:
    """The fixed coordinates of a frame: parameters, layers, statistics, activation modules.

    Which statistics are built-in, which moments they need and how they aggregate is read from the
    statistic objects (:class:`gradscope.stats.base.Statistic`), resolved once through the registry.
    """

    param_names: list[str]
    param_layers: list[str]
    param_leaves: list[str]
    numels: np.ndarray
    layers: list[str]
    layer_members: list[list[int]]
    stats: Sequence[str]
    custom: dict[str, str]  # name -> reduce
    sampled_stats: tuple[str, ...] = ()  # statistics taken on sampled steps only
    act_modules: list[str] = field(default_factory=list)
    act_kinds: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)  # each parameter's dtype name ("float32"), for dtype-aware floors

    def __post_init__(self) -> None:
        # Resolved once, so a registry change during a run does not move it.
        self._statistics: dict[str, Statistic] = {s: STATISTICS.get(s) for s in self.stats if s not in self.custom}

    def custom_column(self, name: str) -> int:
        """Moment-array column of a custom statistic."""
        return len(MOMENTS) + list(self.custom).index(name)

    def statistic(self, name: str) -> Statistic:
        """The statistic object behind ``name``: a collected built-in, or any registered one."""
        if name not in self._statistics:
            self._statistics[name] = STATISTICS.get(name)
        return self._statistics[name]

    @cached_property
    def held_moments(self) -> frozenset[str]:
        """Moments this frame holds: those of the built-in statistics collected."""
        return frozenset(m for s in self.stats if s not in self.custom for m in self.statistic(s).moments)

    def derivable(self, name: str) -> bool:
        """Whether ``name`` was collected, or is a built-in derived from moments the frame holds.

        Rules may so read ``rms`` from a scope that collects ``l2_norm`` only (both come from ``sumsq``).
        """
        if name in self.stats:
            return True
        if name not in STATISTICS:
            return False
        s = self.statistic(name)
        return s.builtin and set(s.moments) <= self.held_moments

    @cached_property
    def layer_groups(self) -> _Groups:
        """The parameters grouped into layers."""
        return _Groups.of(self.layer_members, len(self.param_names))

    @cached_property
    def model_group(self) -> _Groups:
        """Every parameter as one group (the ``layer == "*"`` aggregate)."""
        return _Groups.of([list(range(len(self.param_names)))], len(self.param_names))


def _reduce_custom(vals: np.ndarray, has: np.ndarray, numel: np.ndarray, groups: _Groups, how: str) -> np.ndarray:
    """A custom statistic's per-parameter values ``[R, P]`` combined per group as ``how`` says, ``[R, G]``."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if how == "mean":  # weighted by element count
            out = groups.sum(vals * numel[None, :], has) / groups.count(has, numel)
        elif how == "sum":
            out = groups.sum(vals, has)
        elif how == "max":
            out = groups.extreme(np.maximum, vals, has, -np.inf)
        elif how == "min":
            out = groups.extreme(np.minimum, vals, has, np.inf)
        elif how == "norm":
            out = np.sqrt(groups.sum(vals * vals, has))
        else:  # pragma: no cover - validated at registration
            raise ValueError(how)
    # a NaN on a present parameter (a non-finite gradient, a shard's value withheld) makes the aggregate NaN
    poisoned = groups.count(has & np.isnan(vals), np.ones(has.shape[1])) > 0
    anyp = groups.count(has, np.ones(has.shape[1])) > 0
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
        # Preallocated arrays whose first ``_n`` rows are the frame; their capacity doubles when full,
        # so appending a few rows costs O(rows), not O(history) (rows arrive every few steps when the
        # rules run live). None until the first append.
        self._data: dict[str, np.ndarray] | None = None
        self._n = 0
        self._scalar_names: list[str] = []
        self._cache: dict[str, Any] | None = None
        self.history = history
        #: Current stride (in steps) of the thinned rows; ``thin_every`` until the first doubling.
        self.stride = max(1, int(thin_every))
        self._n_thinned = 0  # rows before this index are the thinned part
        #: Rows dropped by thinning so far.
        self.dropped = 0

    # -- building -----------------------------------------------------------------------------------
    def append(self, chunk: dict[str, np.ndarray], scalar_names: list[str], *, thin: bool = True) -> None:
        """Add rows (see the class docstring for the keys); thin old rows if bounded.

        Args:
            chunk: the rows, by key (``scalars`` may have fewer columns than ``scalar_names``).
            scalar_names: every scalar name so far, in column order.
            thin: thin now when the full-resolution part exceeds ``history``. Live appends between
                flushes pass False (at most one flush of rows more; thinning costs O(history)), and
                the next flush's append thins.
        """
        k = len(chunk["steps"])
        if k == 0:
            return
        self._scalar_names = list(scalar_names)
        self._reserve(k, len(scalar_names), chunk)
        data, n = self._data, self._n
        assert data is not None  # allocated by _reserve
        for key, value in chunk.items():
            if key == "scalars":
                width = value.shape[1]
                data[key][n : n + k, :width] = value
                data[key][n : n + k, width:] = np.nan  # scalars seen late: NaN in earlier rows
            else:
                data[key][n : n + k] = value
        self._n = n + k
        self._cache = None
        if thin and self.history is not None and len(self) - self._n_thinned > self.history:
            self._thin()

    def _reserve(self, k: int, width: int, chunk: dict[str, np.ndarray]) -> None:
        """Room for ``k`` more rows and ``width`` scalar columns (capacity doubling)."""
        data, n = self._data, self._n
        if data is None:
            data = self._empty(max(k, 64), width, chunk)
        else:
            cap, cols = len(data["steps"]), data["scalars"].shape[1]
            if n + k > cap or width > cols:
                grown = self._empty(max(2 * cap, n + k) if n + k > cap else cap, max(width, cols), chunk)
                for key, arr in data.items():
                    if key == "scalars":
                        grown[key][:n, :cols] = arr[:n]
                    else:
                        grown[key][:n] = arr[:n]
                data = grown
        self._data = data

    @staticmethod
    def _empty(cap: int, width: int, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for key, value in chunk.items():
            shape = (cap, width) if key == "scalars" else (cap, *value.shape[1:])
            out[key] = np.full(shape, np.nan) if key == "scalars" else np.empty(shape, dtype=value.dtype)
        return out

    def _thin(self) -> None:
        window = self.history
        if window is None:  # an unbounded frame keeps every row
            return
        arrays = self._arrays()
        steps = arrays["steps"]
        total = len(steps)
        full_from = total - window
        old = np.arange(full_from)
        # Rows that were already thinned satisfy the current stride; newly aged rows are filtered now.
        old = old[(steps[old] - 1) % self.stride == 0]
        while len(old) > window:
            self.stride *= 2
            old = old[(steps[old] - 1) % self.stride == 0]
        keep = np.concatenate([old, np.arange(full_from, total)])
        self.dropped += total - len(keep)
        self._n_thinned = len(old)
        data = self._data
        assert data is not None  # total > window >= 0 rows were appended
        for arr in data.values():
            arr[: len(keep)] = arr[keep]  # in place: the right side is a copy
        self._n = len(keep)
        self._cache = None

    def copy(self) -> StatsFrame:
        """An independent frame with the same schema, rows and thinning state (appending to it leaves this one)."""
        other = StatsFrame(self.schema, history=self.history, thin_every=self.stride)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_data", "_cache", "_scalar_names")})
        other._data = None if self._data is None else {k: v.copy() for k, v in self._data.items()}
        other._scalar_names = list(self._scalar_names)
        other._cache = None
        return other

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
        """The frame's arrays, ``[S, ...]`` views of the preallocated ones (valid until the next append)."""
        if self._cache is None:
            if self._data is None:
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
                n, width = self._n, len(self._scalar_names)
                cache = {k: v[:n] for k, v in self._data.items()}
                cache["scalars"] = self._data["scalars"][:n, :width]
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
        if not self.schema.derivable(stat):
            raise KeyError(
                f"Statistic {stat!r} was not collected by this scope; collected: {', '.join(self.schema.stats)}."
            )

    def param_values(self, stat: str, rows: Rows = None) -> np.ndarray:
        """``stat`` per parameter, ``[S, P]``; NaN where a parameter had no gradient or the row was not sampled.

        ``rows`` restricts the computation to those rows: a slice (``slice(new_from, None)`` at a flush)
        or an index array.
        """
        self._check_stat(stat)
        rows = slice(None) if rows is None else rows
        mom = self.moments[rows]
        if stat in self.schema.custom:
            vals = mom[..., self.schema.custom_column(stat)].copy()
        else:
            vals = derive(self.schema.statistic(stat), mom, self.schema.numels[None, :])
        return np.where(self.has_grad[rows], vals, np.nan)

    def layer_values(self, stat: str, rows: Rows = None) -> np.ndarray:
        """``stat`` per layer (all of a layer's parameters together), ``[S, L]``; ``rows`` as in :meth:`param_values`.

        NaN where no parameter of the layer had a gradient, or (for a sampled statistic) the row was not
        sampled. A built-in statistic may be asked for when the frame holds its moments even if it was
        not collected under its own name (``rms`` with ``l2_norm``).
        """
        return self.layer_values_many([stat], rows)[stat]

    def layer_values_many(self, stats: Iterable[str], rows: Rows = None) -> dict[str, np.ndarray]:
        """Several statistics per layer, ``{stat: [S, L]}``, aggregating each needed moment once."""
        return self._group_values(list(stats), rows, self.schema.layer_groups)

    def global_values(self, stat: str, rows: Rows = None) -> np.ndarray:
        """``stat`` over every parameter of the model together, ``[S]``; ``rows`` as in :meth:`param_values`."""
        return self._group_values([stat], rows, self.schema.model_group)[stat][:, 0]

    def _group_values(self, stats: list[str], rows: Rows, groups: _Groups) -> dict[str, np.ndarray]:
        for stat in stats:
            self._check_stat(stat)
        sch = self.schema
        rows = slice(None) if rows is None else rows
        has, moments = self.has_grad[rows], self.moments
        out: dict[str, np.ndarray] = {}
        builtin = [sch.statistic(s) for s in stats if s not in sch.custom]
        if builtin:
            n = groups.count(has, sch.numels)
            empty = n == 0
            agg = np.full((*n.shape, len(MOMENTS)), np.nan)
            for m in sorted({m for s in builtin for m in s.moments}):
                col = moments[rows, :, MOMENT_INDEX[m]]  # one column, not a copy of every moment
                if m in SUM_MOMENTS:
                    vals = groups.sum(col, has)
                elif m == "min":
                    vals = groups.extreme(np.minimum, col, has, np.inf)
                else:
                    vals = groups.extreme(np.maximum, col, has, -np.inf)
                agg[..., MOMENT_INDEX[m]] = np.where(empty, np.nan, vals)
            numel = np.where(empty, np.nan, n)
            for s in builtin:
                out[s.name] = derive(s, agg, numel)
        for stat in stats:
            if stat in sch.custom:
                vals = moments[rows, :, sch.custom_column(stat)]
                out[stat] = _reduce_custom(vals, has, sch.numels, groups, sch.custom[stat])
        return {s: out[s] for s in stats}

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
            rows = np.flatnonzero(keep)
            sampled = self.sampled[rows]
            stats = list(sch.stats)
            per_layer = self._group_values(stats, rows, sch.layer_groups)
            per_model = self._group_values(stats, rows, sch.model_group)
            has_every = self.has_grad[rows]
            has_sampled = has_every & sampled[:, None]
            ones = np.ones(has_every.shape[1])
            layer_any_every = sch.layer_groups.count(has_every, ones) > 0
            layer_any_sampled = sch.layer_groups.count(has_sampled, ones) > 0
            for stat in stats:
                on_sampled = stat in sch.sampled_stats
                has = has_sampled if on_sampled else has_every
                layer_any = layer_any_sampled if on_sampled else layer_any_every
                add(self.param_values(stat, rows), has, sch.param_layers, sch.param_leaves, stat)
                add(per_layer[stat], layer_any, sch.layers, ["*"] * len(sch.layers), stat)
                add(per_model[stat], np.any(has, axis=1, keepdims=True), [GLOBAL], ["*"], stat)
            if sch.act_modules:
                act = self._arrays()["act"][rows]
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
