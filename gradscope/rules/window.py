"""Windows for rules: which rows to judge at a flush, and persistence tests over them.

Rules run at every flush, and a run can have many thousands of recorded rows. Recomputing every
statistic over the whole history at each flush would make a flush cost grow with the run, so rules
read only the rows they still have to judge (the new rows plus one window of look-back, from
:func:`judged_rows`), and ask the frame for statistics at those rows by name
(``ctx.frame.layer_values("rms", rows)``, ``ctx.frame.global_values("l2_norm", rows)``), which
aggregates every layer at once.

Persistence is judged per episode start (:func:`episode_windows`): a window begins at every row, and
the last ones are partial (the rows since). How many rows a start needs (:func:`episode_min_rows`)
is what makes a finding live: a full window for an episode from initialisation, the rule's
``confirm`` for one that begins mid-run, its ``min_steps`` at the last flush (``close()``, and the
provisional pass of ``report()``). :class:`Episode` follows a reported finding until it clears.

Everything here is NumPy on the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gradscope.rules.base import RuleContext
    from gradscope.stats.frame import FrameSchema

__all__ = [
    "Episode",
    "dtype_info",
    "episode_min_rows",
    "episode_windows",
    "follow_episodes",
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
    lookback = max(0, int(lookback))
    new_from = int(ctx.new_from)
    # Only the tail of the frame is read: from `lookback` rows before the first new one, further back
    # only when rows there are left out (skipped, not sampled), so a call costs what its window holds,
    # not what the run has recorded.
    # (sampled rows: one in about sample_every / every recorded rows, so the first guess reaches that far back)
    stride = -(-max(1, int(ctx.sample_every)) // max(1, int(ctx.every))) if sampled else 1
    start = max(0, new_from - lookback * stride)
    while True:
        keep = ~frame.skipped[start:]
        if sampled:
            keep &= frame.sampled[start:]
        valid = np.flatnonzero(keep) + start
        pos = int(np.searchsorted(valid, new_from))
        if pos >= lookback or start == 0:
            break
        start = max(0, start - 2 * max(lookback, new_from - start))
    lo = max(0, pos - lookback)
    return valid[lo:], pos - lo


def dtype_info(schema: FrameSchema) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the smallest normal number and the machine epsilon of its coarsest parameter dtype.

    Returns:
        ``(tiny [L], eps [L])``. Unknown dtypes count as float32.
    """
    import torch

    f32 = torch.finfo(torch.float32)
    dtypes = list(schema.dtypes or [])
    n_params = len(schema.param_names)
    # One lookup per distinct dtype name, then per-parameter arrays reduced per layer in one pass. A
    # parameter without a known floating dtype counts as float32; a layer without parameters gets
    # 0 from the reduction, float32 below.
    names, inverse = np.unique(
        np.asarray(dtypes[:n_params] + [""] * max(0, n_params - len(dtypes)), dtype=str), return_inverse=True
    )
    tiny_of, eps_of = np.zeros(len(names)), np.zeros(len(names))
    for i, name in enumerate(names):
        dt = getattr(torch, str(name), None) if name else None
        fi = torch.finfo(dt) if isinstance(dt, torch.dtype) and dt.is_floating_point else f32
        tiny_of[i], eps_of[i] = fi.tiny, fi.eps
    groups = schema.layer_groups
    has = np.ones((1, n_params), dtype=bool)
    tiny = np.nan_to_num(groups.extreme(np.maximum, tiny_of[inverse][None, :], has, 0.0)[0], nan=0.0)
    eps = np.nan_to_num(groups.extreme(np.maximum, eps_of[inverse][None, :], has, 0.0)[0], nan=0.0)
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


def episode_min_rows(
    steps: np.ndarray, flags: np.ndarray, *, final: bool, window: int, confirm: int, minimum: int, init_steps: int
) -> np.ndarray:
    """The fewest rows an episode starting at each row needs to be judged, shaped like ``flags``.

    * At the last flush (``final``, also the provisional pass of ``report()``): ``minimum`` (the rule's
      ``min_steps`` / ``min_samples``) for every start, so a condition that began fewer than a window
      before the end is judged on the rows since.
    * At an ordinary flush, an episode that begins after the run's first ``init_steps`` steps (mid-run,
      not an initialisation transient): ``confirm``. It begins at a row where the condition holds and
      did not hold at the judged row before (the first judged row never counts: its past is unknown),
      so the rows of an episode that began at initialisation are never confirmed early.
    * Otherwise (an episode from initialisation, at an ordinary flush): a full ``window``.

    Args:
        steps: step numbers of the judged rows ``[R]``.
        flags: ``[R, ...]`` the condition per row.
        final: the last flush.
        window: the rule's window, in rows.
        confirm: the rows that confirm a mid-run episode (at most ``window``).
        minimum: the rows judged at the end of a run.
        init_steps: episodes whose first step is at or below this are from initialisation.
    """
    f = np.asarray(flags, dtype=bool)
    if final:
        return np.full(f.shape, min(int(minimum), int(window)), dtype=np.int64)
    onset = np.zeros_like(f)
    onset[1:] = f[1:] & ~f[:-1]
    late = (np.asarray(steps) > init_steps).reshape(-1, *(1,) * (f.ndim - 1))
    return np.where(onset & late, min(int(confirm), int(window)), int(window)).astype(np.int64)


def episode_windows(
    flags: np.ndarray, window: int, min_fraction: float, min_rows: np.ndarray | int
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows start a persistent episode, trailing partial windows included.

    A window starts at every row ``i`` and spans ``length[i] = min(window, R - i)`` rows, so the last
    ``window - 1`` starts have partial windows (the rows since). Row ``i`` starts an episode when the
    condition holds at row ``i`` itself (a finding's step is the first step of its episode), in at
    least ``min_fraction`` of the window's rows, and the window has at least ``min_rows[i]`` rows (see
    :func:`episode_min_rows`). With ``min_rows == window`` this is :func:`persistent_windows` padded
    with False.

    Args:
        flags: ``[R, ...]`` the condition per row.
        window: the window, in rows.
        min_fraction: the fraction of a window's rows that must hold the condition.
        min_rows: the fewest rows a window starting at each row needs: one number, ``[R]``, or
            shaped like ``flags`` (from :func:`episode_min_rows`).

    Returns:
        ``(held [R, ...] bool, length [R] int)``.
    """
    f = np.asarray(flags, dtype=bool)
    r = f.shape[0]
    extra = (1,) * (f.ndim - 1)
    length, need, ends = _window_shape(r, int(window), float(min_fraction))
    cs = np.zeros((r + 1, *f.shape[1:]), dtype=np.int64)
    np.cumsum(f, axis=0, dtype=np.int64, out=cs[1:])
    counts = cs[ends] - cs[:r]
    min_rows = np.asarray(min_rows, dtype=np.int64)
    if min_rows.ndim == 1:
        min_rows = min_rows.reshape(-1, *extra)
    held = f & (counts >= need.reshape(-1, *extra)) & (length.reshape(-1, *extra) >= min_rows)
    return held, length.copy()


@functools.lru_cache(maxsize=256)
def _window_shape(r: int, window: int, min_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For windows starting at each of ``r`` rows: ``length [r]``, rows needed ``need [r]``, ``end [r]`` (exclusive).

    Depends on the sizes alone, and rules ask for the same few sizes at every evaluation (read-only
    arrays, shared).
    """
    length = np.minimum(window, r - np.arange(r)).astype(np.int64)
    need = np.maximum(1, np.ceil(min_fraction * length - 1e-9)).astype(np.int64)
    ends = np.arange(r) + length
    for arr in (length, need, ends):
        arr.setflags(write=False)
    return length, need, ends


@dataclass
class Episode:
    """The episode behind a reported finding: its last step so far and, once over, where it ended.

    A rule keeps one per finding it reported and calls :meth:`follow` at each flush with the
    condition on the judged rows; it reports ``last`` and ``resolved`` to the engine as the finding's
    ``last_step`` and ``resolved_step`` (see :meth:`gradscope.rules.base.Rule.check`).

    Attributes:
        last: the last step at which the condition held.
        resolved: the first step from which it no longer held, once it has not held for the rule's
            clearing span; None while it holds (or since it came back).
        after: the first recorded step after ``last`` seen so far (None when none was seen yet).
    """

    last: int
    resolved: int | None = None
    after: int | None = None

    def follow(self, steps: np.ndarray, flags: np.ndarray, clear_steps: int) -> bool:
        """Update from the judged rows' ``steps [R]`` and condition ``flags [R]``; True when it changed.

        The condition coming back after a resolution re-opens the episode (``resolved`` back to None).
        It is resolved once the rows after its last step span at least ``clear_steps`` steps.
        """
        before = (self.last, self.resolved)
        steps = np.asarray(steps)
        held = steps[np.asarray(flags, dtype=bool) & (steps > self.last)]
        if len(held):
            self.last, self.resolved, self.after = int(held.max()), None, None
        later = steps[steps > self.last]
        if len(later):
            self.after = int(later[0]) if self.after is None else min(self.after, int(later[0]))
            if self.resolved is None and int(later[-1]) - self.last >= clear_steps:
                self.resolved = self.after
        return (self.last, self.resolved) != before


def follow_episodes(episodes: list[Episode], steps: np.ndarray, flags: np.ndarray, clear_steps: int) -> np.ndarray:
    """:meth:`Episode.follow` of many episodes at once (one per column of ``flags``), in a fixed number of array operations.

    Args:
        episodes: the episodes, updated in place.
        steps: step numbers of the judged rows ``[R]``, increasing.
        flags: ``[R, E]`` the condition of each episode per row.
        clear_steps: as in :meth:`Episode.follow`.

    Returns:
        ``changed [E]`` bool: whether each episode's ``(last, resolved)`` changed.
    """
    n = len(episodes)
    if n == 0 or len(steps) == 0:
        return np.zeros(n, dtype=bool)
    steps = np.asarray(steps, dtype=np.int64)
    last = np.fromiter((e.last for e in episodes), dtype=np.int64, count=n)
    has_res = np.fromiter((e.resolved is not None for e in episodes), dtype=bool, count=n)
    res = np.fromiter((e.resolved if e.resolved is not None else 0 for e in episodes), dtype=np.int64, count=n)
    has_after = np.fromiter((e.after is not None for e in episodes), dtype=bool, count=n)
    after = np.fromiter((e.after if e.after is not None else 0 for e in episodes), dtype=np.int64, count=n)
    col = steps[:, None]
    held = np.asarray(flags, dtype=bool) & (col > last)
    any_held = held.any(axis=0)
    r = len(steps)
    new_last = np.where(any_held, steps[r - 1 - np.argmax(held[::-1], axis=0)], last)  # the last held row
    new_has_res = has_res & ~any_held
    has_after = has_after & ~any_held
    later = col > new_last
    any_later = later.any(axis=0)
    first_later = steps[np.argmax(later, axis=0)]
    after = np.where(any_later, np.where(has_after, np.minimum(after, first_later), first_later), after)
    has_after |= any_later
    resolve = any_later & ~new_has_res & (steps[-1] - new_last >= clear_steps)
    new_res = np.where(resolve, after, res)
    new_has_res |= resolve
    changed = (new_last != last) | (new_has_res != has_res) | (new_has_res & (new_res != res))
    for i, e in enumerate(episodes):
        e.last = int(new_last[i])
        e.resolved = int(new_res[i]) if new_has_res[i] else None
        e.after = int(after[i]) if has_after[i] else None
    return changed
