"""Pieces shared by the built-in rules: per-row values cached per frame, layer gradient scales by depth, messages."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.ma  # (np.median imports it on its first call: 10-20 ms inside a training step, not at import)

if TYPE_CHECKING:
    from gradscope.rules.base import RuleContext
    from gradscope.stats.frame import StatsFrame

__all__ = [
    "FrameRows",
    "fmt",
    "frame_rows",
    "global_values_many",
    "later_max",
    "layer_label",
    "layer_rms_by_depth",
    "nanmedian",
    "steps_label",
]


#: Rows whose cached values survive a thinning of the frame (the newest; rules read back a window).
_KEEP_ON_MOVE = 512


class _Table:
    """Values of one derivation per frame row (``done`` says which rows hold them), capacity-doubling."""

    __slots__ = ("arrays", "done")

    def __init__(self, capacity: int) -> None:
        self.done = np.zeros(capacity, dtype=bool)
        self.arrays: dict[str, np.ndarray] = {}

    def resize(self, capacity: int) -> None:
        n = min(len(self.done), capacity)
        done = np.zeros(capacity, dtype=bool)
        done[:n] = self.done[:n]
        self.done = done
        for name, arr in self.arrays.items():
            grown = np.empty((capacity, *arr.shape[1:]), dtype=arr.dtype)
            grown[:n] = arr[:n]
            self.arrays[name] = grown

    def remap(self, lo: int, pos: np.ndarray, match: np.ndarray, capacity: int) -> None:
        """Rows ``lo + i`` of the new layout are old rows ``pos[i]`` where ``match[i]``; the others are not computed."""
        n = lo + len(pos)
        done = np.zeros(capacity, dtype=bool)
        done[lo:n] = self.done[pos] & match
        self.done = done
        for name, arr in self.arrays.items():
            moved = np.empty((capacity, *arr.shape[1:]), dtype=arr.dtype)
            moved[lo:n] = arr[pos]
            self.arrays[name] = moved


class FrameRows:
    """Values derived from single rows of one frame, computed once per row and shared by every rule.

    Rules run at every flush and live between flushes, each over its recent window of rows (the new
    rows plus a look-back). What a rule derives from one row alone (per-layer gradient RMS, the
    global norm, a ratio to the layers after it) does not change once the row is recorded (rows are
    appended, never rewritten), so it is computed for the rows not seen before and read back for the
    look-back: the cost of a call follows the rows added, not the window, and one aggregation of the
    frame's moments serves all the gradient rules. Tables are aligned with the frame's rows; when the
    frame thins old rows (``history=``), the rows still there are moved to their new index, by step.

    The cache lives outside the rules (one per frame, :func:`frame_rows`), so a rule's state stays
    small and deep-copyable (``report()`` judges on copies of the rules) and a copy reads the same
    values. A value is a function of its row alone, so whoever computes it first, a rule, its copy,
    a provisional pass, gets the same numbers.
    """

    def __init__(self) -> None:
        self._n = 0  # frame rows the layout covers
        self._steps = np.zeros(0, dtype=np.int64)  # their steps (the layout's key when rows move)
        self._dropped = 0  # the frame's thinning counter when the layout was made
        self._tables: dict[Hashable, _Table] = {}
        self._consts: dict[Hashable, Any] = {}

    def _sync(self, frame: StatsFrame) -> None:
        steps = frame.steps
        n, old = len(steps), self._n
        if n == old and frame.dropped == self._dropped and (n == 0 or steps[n - 1] == self._steps[n - 1]):
            return
        capacity = len(self._steps)
        moved = old and (frame.dropped != self._dropped or n < old or steps[old - 1] != self._steps[old - 1])
        if moved:
            # Rows were thinned (or the frame is not the one seen): keep the values of the newest rows
            # still there, those the rules read back (their windows); older ones are recomputed if
            # ever asked for. So a thinning costs what a window holds, not what the history holds.
            before = self._steps[:old]
            lo = max(0, n - _KEEP_ON_MOVE)
            pos = np.minimum(np.searchsorted(before, steps[lo:]), old - 1)
            match = before[pos] == steps[lo:]
            capacity = max(64, 2 * n)
            for table in self._tables.values():
                table.remap(lo, pos, match, capacity)
            self._steps = np.zeros(capacity, dtype=np.int64)
        elif n > capacity:
            capacity = max(64, 2 * n)
            for table in self._tables.values():
                table.resize(capacity)
            grown = np.zeros(capacity, dtype=np.int64)
            grown[:old] = self._steps[:old]
            self._steps = grown
        lo = 0 if moved else old
        self._steps[lo:n] = steps[lo:]
        if not moved:
            for table in self._tables.values():
                table.done[old:n] = False  # new rows: not computed yet
        self._n, self._dropped = n, frame.dropped

    def get(
        self,
        frame: StatsFrame,
        key: Hashable,
        compute: Callable[[np.ndarray], dict[str, np.ndarray]],
        rows: np.ndarray,
        names: tuple[str, ...] | None = None,
    ) -> dict[str, np.ndarray]:
        """The values ``compute`` derives, at ``rows`` (frame row indices ``[R]``), computing only rows not seen.

        Args:
            frame: the frame (the one this cache belongs to).
            key: names the derivation: everything it depends on besides the row (thresholds, layer order).
            compute: ``compute(rows) -> {name: [len(rows), ...]}``, values of each row from that row alone.
            rows: the rows wanted.
            names: the values wanted (all when None): each one read back is an array operation.

        Returns:
            ``{name: [R, ...]}`` (copies).
        """
        self._sync(frame)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = _Table(len(self._steps))
        missing = rows[~table.done[rows]]
        if len(missing):
            values = compute(missing)
            for name, value in values.items():
                arr = table.arrays.get(name)
                if arr is None:
                    arr = table.arrays[name] = np.zeros((len(table.done), *value.shape[1:]), dtype=value.dtype)
                arr[missing] = value
            table.done[missing] = True
        arrays = table.arrays
        return {name: arrays[name][rows] for name in (arrays if names is None else names)}

    def const(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """A value derived from the frame's schema alone (masks, index arrays), made once."""
        if key not in self._consts:
            self._consts[key] = make()
        return self._consts[key]


def global_values_many(frame: StatsFrame, stats: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Several statistics over the whole model at ``rows``, ``{stat: [R]}``, aggregating each moment once.

    What ``frame.layer_values_many`` is to ``frame.layer_values``, for ``frame.global_values``: the
    same numbers, from one aggregation (read through the frame's own aggregation, so rules still never
    index a raw moment column).
    """
    return frame.global_values_many(stats, rows)


_FRAME_ROWS: weakref.WeakKeyDictionary[StatsFrame, FrameRows] = weakref.WeakKeyDictionary()


def frame_rows(frame: StatsFrame) -> FrameRows:
    """The :class:`FrameRows` cache of ``frame`` (made on first use, gone with the frame)."""
    cache = _FRAME_ROWS.get(frame)
    if cache is None:
        cache = _FRAME_ROWS[frame] = FrameRows()
    return cache


def layer_rms_by_depth(ctx: RuleContext, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Gradient RMS of every layer at ``rows``, in forward order.

    Returns:
        ``(rms [R, L], nonfinite [R, L], names [L])``: RMS over all the layer's entries that had a
        gradient (NaN where none had), the number of non-finite gradient entries, and layer keys.
        Without ``nonfinite_count`` collected, a layer whose RMS is not finite (or that had no
        gradient) counts one non-finite entry.
    """
    frame = ctx.frame
    order = list(ctx.forward_order)
    if "nonfinite_count" in frame.schema.stats:
        values = frame.layer_values_many(["rms", "nonfinite_count"], rows)
        rms, nonfinite = values["rms"][:, order], values["nonfinite_count"][:, order]
    else:
        rms = frame.layer_values("rms", rows)[:, order]
        nonfinite = np.where(np.isfinite(rms), 0.0, 1.0)
    names = [frame.schema.layers[i] for i in order]
    return rms, np.nan_to_num(nonfinite, nan=0.0), names


def nanmedian(values: Any, axis: int | None = None) -> Any:
    """``np.nanmedian`` without the RuntimeWarning for all-NaN slices (they give NaN, which we handle)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(values, axis=axis)


def later_max(values: np.ndarray) -> np.ndarray:
    """``out[:, i] = nanmax(values[:, i+1:])`` (NaN for the last column or when all later are NaN)."""
    r, n = values.shape
    out = np.full((r, n), np.nan)
    if n < 2:
        return out
    filled = np.where(np.isnan(values), -np.inf, values)
    rev = np.maximum.accumulate(filled[:, ::-1], axis=1)[:, ::-1]  # rev[:, i] = max(values[:, i:])
    out[:, :-1] = rev[:, 1:]
    out[out == -np.inf] = np.nan
    return out


def fmt(x: Any) -> str:
    """A number for a message: 3 significant digits, scientific when small or large."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.2e}"
    return f"{v:.3g}"


def layer_label(name: str) -> str:
    """A layer key quoted for a message (the root module's own parameters are ``(root)``)."""
    return repr(name) if name else "(root)"


def steps_label(first: int, last: int) -> str:
    """``"step 5"`` or ``"steps 5-24"``."""
    return f"step {first}" if first == last else f"steps {first}-{last}"
