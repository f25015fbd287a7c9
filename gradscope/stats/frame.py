"""Host-side history of a run: moments and activations per recorded step, and the statistics they give.

Everything here is NumPy on the host, float64. Rules and sinks read statistics through this class, by
the names users see (``frame.layer_values("rms", rows)``), so they can never trigger a device
synchronisation and never index a raw moment column.

Layer and model values aggregate exactly: a built-in statistic of a group is derived from the group's
moments (sums, minima, maxima of its parameters' moments), computed for all groups at once with one
``reduceat`` per kind of moment (the sums together, the minima, the maxima) over the parameters
sorted by group, never a Python loop over layers and never a dense parameters x layers matrix: a
flush costs O(rows x parameters), the same per parameter with 10 layers or 5000.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from gradscope.stats.base import MomentView, Statistic
from gradscope.stats.moments import MOMENT_INDEX, MOMENTS
from gradscope.stats.registry import STATISTICS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ACTIVATION_STATISTICS", "THIN_SLACK", "FrameSchema", "Rows", "StatsFrame", "derive", "empty_long_table"]

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

    Every reduction is one ``ufunc.reduceat`` over the parameters sorted group after group, so it costs
    O(rows x parameters) whatever the number of groups (a dense one-hot ``[P, G]`` product would cost
    O(rows x parameters x groups) and its matrix alone O(parameters x groups) memory).

    Attributes:
        n_groups: number of groups ``G`` (empty ones included).
        order: parameter indices, group after group (non-empty groups only; a parameter may appear
            in several groups).
        starts: where each non-empty group starts in ``order``, strictly increasing.
        nonempty: indices of the groups with at least one parameter.
        identity: ``order`` is ``0..P-1`` (no gather needed).
    """

    n_groups: int
    order: np.ndarray
    starts: np.ndarray
    nonempty: np.ndarray
    identity: bool

    @classmethod
    def of(cls, members: Sequence[Sequence[int]], n_params: int) -> _Groups:
        sizes = np.fromiter((len(ps) for ps in members), dtype=np.int64, count=len(members))
        nonempty = np.flatnonzero(sizes).astype(np.int64)
        order = (
            np.concatenate([np.asarray(members[int(g)], dtype=np.int64) for g in nonempty])
            if len(nonempty)
            else np.zeros(0, np.int64)
        )
        starts = np.concatenate([[0], np.cumsum(sizes[nonempty])[:-1]]).astype(np.int64)[: len(nonempty)]
        identity = len(order) == n_params and bool(np.array_equal(order, np.arange(n_params)))
        return cls(n_groups=len(members), order=order, starts=starts, nonempty=nonempty, identity=identity)

    def _reduce(self, ufunc: np.ufunc, x: np.ndarray, empty: float) -> np.ndarray:
        """``ufunc.reduceat`` of ``x [R, P, ...]`` over each group, ``[R, G, ...]`` (``empty`` for empty groups)."""
        if len(self.nonempty) == self.n_groups and self.identity:
            if not len(self.starts):
                return np.zeros((x.shape[0], 0, *x.shape[2:]))
            return ufunc.reduceat(x, self.starts, axis=1)
        out = np.full((x.shape[0], self.n_groups, *x.shape[2:]), empty)
        if len(self.nonempty):
            xs = x if self.identity else x[:, self.order]
            out[:, self.nonempty] = ufunc.reduceat(xs, self.starts, axis=1)
        return out

    def sum(self, vals: np.ndarray, has: np.ndarray) -> np.ndarray:
        """Sum of ``vals [R, P]`` over each group's parameters in ``has [R, P]``, ``[R, G]`` (0 when none).

        NaN and infinities come out as plain summation gives them (NaN in, or +inf and -inf together:
        NaN; +inf or -inf: that), and stay within their group.
        """
        with np.errstate(invalid="ignore", over="ignore"):
            return self._reduce(np.add, np.where(has, vals, 0.0), 0.0)

    def extreme(self, ufunc: np.ufunc, vals: np.ndarray, has: np.ndarray, fill: float) -> np.ndarray:
        """``ufunc`` (``np.minimum``/``np.maximum``) over each group's parameters in ``has``, ``[R, G]``.

        NaN propagates; parameters without a gradient count as ``fill``; empty groups give NaN.
        """
        with np.errstate(invalid="ignore"):
            return self._reduce(ufunc, np.where(has, vals, fill), np.nan)

    def count(self, has: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``sum(weights[p])`` over each group's parameters in ``has``, ``[R, G]`` (0 when none)."""
        return self._reduce(np.add, np.where(has, np.asarray(weights, dtype=np.float64)[None, :], 0.0), 0.0)

    def moments(self, mom: np.ndarray, has: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """The moments ``names`` of ``mom [R, P, k]`` (in that order) aggregated over each group, ``[R, G, k]``.

        Sums over the parameters in ``has`` for the summed moments, minima and maxima for ``min`` and
        ``max`` (as :meth:`sum` and :meth:`extreme`): one reduction per kind of moment, whatever ``k``.
        A group without a parameter in ``has`` comes out 0 for a sum and NaN for a minimum or maximum.
        """
        out = np.empty((mom.shape[0], self.n_groups, len(names)))
        present = has[:, :, None]
        kinds = (
            ("sum", np.add, 0.0, 0.0),
            ("min", np.minimum, np.inf, np.nan),
            ("max", np.maximum, -np.inf, np.nan),
        )
        with np.errstate(invalid="ignore", over="ignore"):
            for kind, ufunc, fill, empty in kinds:
                cols = [i for i, m in enumerate(names) if (m if m in ("min", "max") else "sum") == kind]
                if not cols:
                    continue
                part = mom if len(cols) == len(names) else mom[:, :, cols]
                out[:, :, cols] = self._reduce(ufunc, np.where(present, part, fill), empty)
        return out

    def any(self, has: np.ndarray) -> np.ndarray:
        """Whether any of each group's parameters is in ``has [R, P]``, ``[R, G]`` bool."""
        return self._reduce(np.logical_or, np.asarray(has, dtype=bool), False).astype(bool)


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


def empty_long_table() -> pd.DataFrame:
    """The long statistics table with no rows: its five columns and their types."""
    import pandas as pd

    return pd.DataFrame(
        {
            "step": pd.Series(dtype="int64"),
            "layer": pd.Series(dtype=object),
            "param": pd.Series(dtype=object),
            "stat": pd.Series(dtype=object),
            "value": pd.Series(dtype="float64"),
        }
    )


def _labels(names: np.ndarray, codes: np.ndarray) -> Any:
    """``names[codes]`` as the column pandas would infer from those strings, built without one string per row.

    With pandas' pyarrow-backed string dtype (pandas 3), the column is decoded from a dictionary array
    of the few distinct names (converting millions of Python strings costs seconds); otherwise it is
    the plain object array, as before.
    """
    import pandas as pd

    expected = pd.Series(names[:1]).dtype
    if getattr(expected, "storage", None) == "pyarrow":
        import pyarrow as pa

        uniques, inverse = np.unique(names.astype(str), return_inverse=True)
        dictionary = pa.DictionaryArray.from_arrays(pa.array(inverse.astype(np.int32)[codes]), pa.array(uniques))
        column = dictionary.cast(pa.large_string()).to_pandas()
        if column.dtype == expected:
            return column
    return names[codes]


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
    poisoned = groups.any(has & np.isnan(vals))
    anyp = groups.any(has)
    return np.where(anyp & ~poisoned, out, np.nan)


def _move_rows(arr: np.ndarray, start: int, stop: int, to: int) -> None:
    """``arr[to : to + stop - start] = arr[start:stop]`` for ``to <= start``, without a temporary copy.

    NumPy copies an overlapping right side into a new buffer first: for the full-resolution window of
    a large frame that is tens of MB allocated (and page-faulted) per thinning. Rows of a C-contiguous
    array are one block of memory, and ``memmove`` copes with the overlap.
    """
    if to == start or stop <= start:
        return
    if arr.flags.c_contiguous:
        row = arr.strides[0]
        base = arr.ctypes.data
        ctypes.memmove(base + to * row, base + start * row, (stop - start) * row)
    else:  # (the frame allocates its arrays C-contiguous)
        arr[to : to + stop - start] = arr[start:stop]


#: How far past ``history`` (a share of it) the full-resolution part of a bounded frame grows before it is
#: thinned back to ``history``: each thinning moves every row kept, so thinning at every flush would cost
#: O(history) per flush; at half, a row is moved about twice over its life in the window.
THIN_SLACK = 0.5

#: A bounded frame allocates the rows it can hold at once when they take at most this many bytes
#: (reserved address space: the pages are written, and counted, as rows arrive); larger ones grow by doubling.
PREALLOCATE_BYTES = 256 * 2**20


class StatsFrame:
    """All recorded steps of a scope, on the host.

    Arrays (``S`` recorded steps, ``P`` parameters, ``L`` layers, ``A`` activation modules):
    ``steps [S]``, ``skipped [S]`` (the optimizer did not step, e.g. GradScaler found inf),
    ``has_grad [S, P]``, ``trainable [S, P]``, ``moments [S, P, C]``, ``sampled [S]`` (rows where the
    statistics of ``schema.sampled_stats`` and the activations were taken),
    ``act [S, A, K]``, and scalars (``loss``, ``val_loss``, user scalars) by name.

    Bounded history (``history=W``): at least the last ``W`` recorded rows are kept at full
    resolution. Older rows are *thinned*: only rows whose step is a multiple of a stride (counted
    from step 1) are kept, the stride starting at ``thin_every`` (the scope passes ``sample_every``,
    so kept rows are sampled rows, which carry every statistic) and doubling whenever the thinned
    part exceeds ``W / 2`` rows. Thinning moves every row it keeps, so it waits until the
    full-resolution part has grown :data:`THIN_SLACK` x ``W`` rows past ``W`` (a flush of a long run
    would otherwise move the whole frame for a few aged rows: 14 ms per flush on 258 tensors), then
    cuts it back to ``W``. The frame so never holds more than ``2 W`` rows (plus one flush), covers
    the whole run, and has full resolution where rules look (recent windows). Row indices therefore
    shift between flushes; steps do not. ``history=None`` keeps every row.

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
        # rows the full-resolution part may hold past ``history`` before it is thinned back to it
        self._slack = 0 if history is None else int(history * THIN_SLACK)
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
        if thin and self.history is not None and len(self) - self._n_thinned > self.history + self._slack:
            self._thin()

    def _reserve(self, k: int, width: int, chunk: dict[str, np.ndarray]) -> None:
        """Room for ``k`` more rows and ``width`` scalar columns (capacity doubling)."""
        data, n = self._data, self._n
        if data is None:
            data = self._empty(self._first_capacity(k, chunk), width, chunk)
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

    def _first_capacity(self, k: int, chunk: dict[str, np.ndarray]) -> int:
        """Rows to allocate at the first append.

        A bounded frame holds at most about ``2 * history`` rows (half the history thinned, the
        full-resolution part up to ``history`` plus :data:`THIN_SLACK`, and a flush's rows before its
        append thins): allocated at once, while that stays under :data:`PREALLOCATE_BYTES`, so that no
        append copies the frame to grow it (a 258-tensor model's frame of 1,024 rows is 17 MB to copy,
        14 ms in one flush). The memory is only reserved: pages are touched as rows arrive.
        """
        small = max(k, 64)
        if self.history is None:
            return small
        bounded = 2 * self.history + max(k, 256)
        row_bytes = sum(v[:1].nbytes for v in chunk.values() if len(v))
        return bounded if bounded * row_bytes <= PREALLOCATE_BYTES else small

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
        while len(old) > window - window // 2:
            self.stride *= 2
            old = old[(steps[old] - 1) % self.stride == 0]
        # The thinned rows that stay where they are (all of them unless the stride doubled) are not copied.
        moved = int(np.argmin(old == np.arange(len(old)))) if len(old) and old[-1] != len(old) - 1 else len(old)
        n_old, kept = len(old), len(old) + total - full_from
        self.dropped += total - kept
        self._n_thinned = n_old
        data = self._data
        assert data is not None  # total > window >= 0 rows were appended
        for arr in data.values():
            if moved < n_old:
                arr[moved:n_old] = arr[old[moved:]]  # the right side is a copy
            _move_rows(arr, full_from, total, n_old)
        self._n = kept
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

    def global_values_many(self, stats: Iterable[str], rows: Rows = None) -> dict[str, np.ndarray]:
        """Several statistics over every parameter of the model together, ``{stat: [S]}``, aggregating each moment once."""
        return {s: v[:, 0] for s, v in self._group_values(list(stats), rows, self.schema.model_group).items()}

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
            names = sorted({m for s in builtin for m in s.moments}, key=MOMENT_INDEX.__getitem__)
            index = [MOMENT_INDEX[m] for m in names]
            # the moments wanted, every kind aggregated in one reduction (not one per moment)
            mom = moments[rows]
            part = (
                mom[:, :, index[0] : index[-1] + 1]
                if index == list(range(index[0], index[-1] + 1))
                else mom[..., index]
            )
            agg = groups.moments(part, has, names)
            agg[empty] = np.nan
            numel = np.where(empty, np.nan, n)
            columns = {m: agg[..., i] for i, m in enumerate(names)}
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                for s in builtin:
                    assert s.derive is not None  # built-in statistics derive from moments
                    out[s.name] = s.derive(MomentView({m: columns[m] for m in s.moments}, numel))
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
        rows = np.flatnonzero(~self.skipped)
        stats = list(sch.stats)
        act_stats = list(ACTIVATION_STATISTICS) if sch.act_modules else []
        P, L, A = len(sch.param_names), len(sch.layers), len(sch.act_modules)
        # Columns of one step's block, in the table's order: per statistic its parameters, its layers,
        # the model; then per activation statistic its modules. Row-major order over (row, column) is
        # so the table's order (by step, then statistic, then entity): no sort, no concatenation of
        # per-statistic tables.
        layer_names = np.asarray([*sch.param_layers, *sch.layers, GLOBAL], dtype=object)
        param_names = np.asarray([*sch.param_leaves, *["*"] * L, "*"], dtype=object)
        n_cols = len(stats) * (P + L + 1) + len(act_stats) * A
        col_layer = np.concatenate(
            [np.tile(layer_names, len(stats)), np.tile(np.asarray(sch.act_modules, dtype=object), len(act_stats))]
        )
        col_param = np.concatenate([np.tile(param_names, len(stats)), np.full(len(act_stats) * A, "*", dtype=object)])
        col_stat = np.repeat(
            np.asarray([*stats, *act_stats], dtype=object), [P + L + 1] * len(stats) + [A] * len(act_stats)
        )
        # Row blocks bound the dense [rows, columns] scratch to a few million cells.
        block = max(1, 4_000_000 // max(1, n_cols))
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (step, column, value)
        for lo in range(0, len(rows), block):
            r = rows[lo : lo + block]
            values, mask = self._long_block(r, stats, act_stats)
            idx_s, idx_c = np.nonzero(mask)
            pieces.append((self.steps[r][idx_s], idx_c, values[idx_s, idx_c]))
        if not pieces or not sum(len(p[0]) for p in pieces):
            return empty_long_table()
        cols = np.concatenate([p[1] for p in pieces])
        return pd.DataFrame(
            {
                "step": np.concatenate([p[0] for p in pieces]).astype(np.int64, copy=False),
                "layer": _labels(col_layer, cols),
                "param": _labels(col_param, cols),
                "stat": _labels(col_stat, cols),
                "value": np.concatenate([p[2] for p in pieces]).astype(np.float64, copy=False),
            }
        )

    def _long_block(self, rows: np.ndarray, stats: list[str], act_stats: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Values and presence of the long table's columns (see :meth:`to_dataframe`) at ``rows``, ``[R, n_cols]``."""
        sch = self.schema
        per_layer = self._group_values(stats, rows, sch.layer_groups)
        per_model = self._group_values(stats, rows, sch.model_group)
        masks_of = self._presence(rows)
        values: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for stat in stats:
            has, layer_any, model_any = masks_of[stat in sch.sampled_stats]
            values += [self.param_values(stat, rows), per_layer[stat], per_model[stat]]
            masks += [has, layer_any, model_any]
        if act_stats:
            act = self._arrays()["act"][rows]
            sampled = self.sampled[rows]
            for k in range(len(act_stats)):
                vals = act[:, :, k]
                values.append(vals)
                masks.append(sampled[:, None] & ~np.isnan(vals))
        return np.concatenate(values, axis=1), np.concatenate(masks, axis=1)

    def _presence(self, rows: np.ndarray) -> dict[bool, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Which entries of the long table exist at ``rows``: ``{sampled statistic?: (params, layers, model)}``.

        A parameter's entry exists where it had a gradient (and, for a statistic of
        ``schema.sampled_stats``, the row was sampled); a layer's where any of its parameters' does; the
        model's where any parameter's does. ``[R, P]``, ``[R, L]``, ``[R, 1]`` bool.
        """
        sch = self.schema
        has_every = self.has_grad[rows]
        every = (has_every, sch.layer_groups.any(has_every), np.any(has_every, axis=1, keepdims=True))
        if not sch.sampled_stats:
            return {False: every, True: every}
        has_sampled = has_every & self.sampled[rows][:, None]
        sampled = (has_sampled, sch.layer_groups.any(has_sampled), np.any(has_sampled, axis=1, keepdims=True))
        return {False: every, True: sampled}

    def aggregate_block(
        self, stat: str, *, values: bool = True
    ) -> tuple[np.ndarray, list[str], np.ndarray | None, np.ndarray]:
        """The ``param == "*"`` entries of :meth:`to_dataframe` for one statistic, as matrices.

        Every row that is not skipped, whether or not ``stat`` has an entry there: ``(steps [R], names
        [E], values [R, E], present [R, E])``, where the names are the layers then ``"*"`` (the model)
        for a gradient statistic, the activation modules for an activation statistic, and ``present``
        says which entries the long table holds (their values may be NaN: a non-finite gradient). The
        same values as the table, without building it: the views of a live report read these.
        ``values=False`` skips the aggregation (``values`` is None): which entries exist is cheap.
        """
        sch = self.schema
        rows = np.flatnonzero(~self.skipped)
        steps = self.steps[rows]
        if stat in ACTIVATION_STATISTICS:
            if not sch.act_modules:
                return steps, [], np.zeros((len(rows), 0)), np.zeros((len(rows), 0), dtype=bool)
            vals = self._arrays()["act"][rows][:, :, ACTIVATION_STATISTICS.index(stat)]
            return steps, list(sch.act_modules), vals, self.sampled[rows][:, None] & ~np.isnan(vals)
        self._check_stat(stat)
        _, layer_any, model_any = self._presence(rows)[stat in sch.sampled_stats]
        present = np.concatenate([layer_any, model_any], axis=1)
        if not values:
            return steps, [*sch.layers, GLOBAL], None, present
        return steps, [*sch.layers, GLOBAL], self.aggregate_values(stat, rows), present

    def aggregate_values(self, stat: str, rows: np.ndarray) -> np.ndarray:
        """The values of :meth:`aggregate_block` at frame rows ``rows`` only, ``[len(rows), E]``."""
        if stat in ACTIVATION_STATISTICS:
            return self._arrays()["act"][rows][:, :, ACTIVATION_STATISTICS.index(stat)]
        sch = self.schema
        return np.concatenate(
            [
                self._group_values([stat], rows, sch.layer_groups)[stat],
                self._group_values([stat], rows, sch.model_group)[stat],
            ],
            axis=1,
        )

    def scalars_dataframe(self) -> pd.DataFrame:
        """Wide table of the scalars passed to ``scope.step``: index ``step``, one column per name."""
        import pandas as pd

        data = {name: self.scalar(name) for name in self._scalar_names}
        return pd.DataFrame(data, index=pd.Index(self.steps, name="step"))
