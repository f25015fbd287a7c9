"""Windows for rules: which rows to judge at a flush, and persistence tests over them.

Rules run at every flush, and a run can have many thousands of recorded rows. Recomputing every
statistic over the whole history at each flush would make a flush cost grow with the run, so rules
read only the rows they still have to judge (the new rows plus one window of look-back, from
:func:`judged_rows`), and ask the frame for statistics at those rows by name
(``ctx.frame.layer_values("rms", rows)``, ``ctx.frame.global_values("l2_norm", rows)``), which
aggregates every layer at once.

Everything here is NumPy on the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gradscope.rules.base import RuleContext
    from gradscope.stats.frame import FrameSchema

__all__ = [
    "dtype_info",
    "judged_rows",
    "persistent_windows",
    "rolling_count",
    "steps_to_rows",
    "window_rows",
]


def steps_to_rows(steps: int, every: int, minimum: int = 1) -> int:
    """How many recorded rows span ``steps`` optimizer steps when one step in ``every`` is recorded."""
    return max(minimum, -(-int(steps) // max(1, int(every))))


def judged_rows(ctx: RuleContext, lookback: int, *, sampled: bool = False) -> tuple[np.ndarray, int]:
    """Rows a windowed rule must look at in this flush.

    Skipped optimizer steps (GradScaler found inf) are never judged, so they are left out. With
    ``sampled=True`` only rows where the sampled statistics and activations were taken are kept.

    Args:
        ctx: the rule context.
        lookback: judged rows to keep before the first new one (a window's length minus one).
        sampled: keep sampled rows only.

    Returns:
        ``(rows, first_new)``: frame row indices ``[R]`` in order, and the position in ``rows`` of
        the first row added by this flush.
    """
    frame = ctx.frame
    keep = ~frame.skipped
    if sampled:
        keep = keep & frame.sampled
    valid = np.flatnonzero(keep)
    pos = int(np.searchsorted(valid, ctx.new_from))
    lo = max(0, pos - max(0, int(lookback)))
    return valid[lo:], pos - lo


def dtype_info(schema: FrameSchema) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the smallest normal number and the machine epsilon of its coarsest parameter dtype.

    Returns:
        ``(tiny [L], eps [L])``. Unknown dtypes count as float32.
    """
    import torch

    f32 = torch.finfo(torch.float32)
    tiny = np.zeros(len(schema.layers), dtype=np.float64)
    eps = np.zeros(len(schema.layers), dtype=np.float64)
    dtypes = schema.dtypes or []
    for li, members in enumerate(schema.layer_members):
        for p in members:
            dt = getattr(torch, dtypes[p], None) if p < len(dtypes) else None
            fi = torch.finfo(dt) if isinstance(dt, torch.dtype) and dt.is_floating_point else f32
            tiny[li] = max(tiny[li], fi.tiny)
            eps[li] = max(eps[li], fi.eps)
    tiny[tiny == 0] = f32.tiny
    eps[eps == 0] = f32.eps
    return tiny, eps


def rolling_count(flags: np.ndarray, length: int) -> np.ndarray:
    """``out[i] = flags[i:i+length].sum(axis=0)`` for every full window, ``[R - length + 1, ...]``."""
    f = np.asarray(flags, dtype=np.int64)
    cs = np.concatenate([np.zeros((1, *f.shape[1:]), dtype=np.int64), np.cumsum(f, axis=0)])
    if length > f.shape[0]:
        return np.zeros((0, *f.shape[1:]), dtype=np.int64)
    return cs[length:] - cs[:-length]


def window_rows(n_rows: int, window: int, *, final: bool, minimum: int) -> int:
    """The window length (in rows) to judge with: ``window``, or at the last flush of a short run, all rows.

    Returns 0 when there are too few rows to judge.
    """
    if n_rows >= window:
        return window
    if final and n_rows >= minimum:
        return n_rows
    return 0


def persistent_windows(flags: np.ndarray, length: int, min_fraction: float) -> np.ndarray:
    """Which windows hold a condition persistently, ``[R - length + 1, ...]`` bool.

    A window of ``length`` rows starting at row ``i`` holds the condition when the condition holds at
    row ``i`` itself (so a finding's step is the first step of the episode) and in at least
    ``min_fraction`` of the window's rows.
    """
    counts = rolling_count(flags, length)
    if counts.shape[0] == 0:
        return np.zeros((0, *np.shape(flags)[1:]), dtype=bool)
    need = max(1, int(np.ceil(min_fraction * length - 1e-9)))
    return (counts >= need) & np.asarray(flags, dtype=bool)[: counts.shape[0]]
