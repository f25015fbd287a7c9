"""Rules about the loss curves passed to ``scope.step(loss=..., val_loss=...)``: stalled and overfitting.

Both are robust to noise: they compare medians of groups of steps, and measure noise from the curve
itself (median absolute deviation of its second differences, which cancel a local trend), so a noisy
mini-batch loss that goes up on some steps never fires by itself.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import fmt, frame_rows, steps_label
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule
from gradscope.rules.window import Episode, steps_to_rows, window_rows

if TYPE_CHECKING:
    from gradscope.stats.frame import StatsFrame

__all__ = ["LossNotDecreasing", "Overfitting"]

# Standard error of a median of n normal samples is about 1.2533 sigma / sqrt(n).
_MEDIAN_SE = 1.2533


def _noise(values: np.ndarray) -> float:
    """Per-step noise of a curve, robust to its trend.

    Second differences cancel any locally linear trend; for white noise of standard deviation sigma
    they have standard deviation sigma * sqrt(6). The median absolute deviation (x 1.4826) makes it
    robust to outliers and kinks.
    """
    d = np.diff(values, n=2)
    if len(d) == 0:
        return 0.0
    return float(1.4826 * _median(np.abs(d - _median(d))) / np.sqrt(6.0))


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D array, the same float, without its overhead (these arrays are short)."""
    s = np.sort(values)
    n = len(s)
    if n == 0 or np.isnan(s[-1]):
        return float("nan")
    return float((s[(n - 1) // 2] + s[n // 2]) / 2)


def _row_medians(rows: np.ndarray, counts: np.ndarray | None = None, *, is_sorted: bool = False) -> np.ndarray:
    """Median of each row of ``rows`` ``[R, W]`` (of its first ``counts[r]`` values when given, NaN after them).

    The mean of the two middle values of the sorted row, as ``np.median`` computes it, so a window
    judged here gives the float a loop of ``np.median`` calls gives; NaN for a row with no value.
    """
    r, width = rows.shape
    if width == 0:
        return np.full(r, np.nan)
    s = rows if is_sorted else np.sort(rows, axis=1)
    if counts is None:  # full rows (the common case): two columns
        return (s[:, (width - 1) // 2] + s[:, width // 2]) / 2
    n = np.asarray(counts)
    idx = np.arange(r)
    lo, hi = np.maximum(n - 1, 0) // 2, np.minimum(np.maximum(n, 1) // 2, width - 1)
    return np.where(n > 0, (s[idx, lo] + s[idx, hi]) / 2, np.nan)


def _row_noise(rows: np.ndarray) -> np.ndarray:
    """:func:`_noise` of each row of ``rows`` ``[R, W]``, all at once."""
    d = np.diff(rows, n=2, axis=1)
    if d.shape[1] == 0:
        return np.zeros(len(rows))
    mad = _row_medians(np.abs(d - _row_medians(d)[:, None]))
    return 1.4826 * mad / np.sqrt(6.0)


def _first_flat_prefix(post: np.ndarray, lo: int, z: float, dec: float, persist: int = 1) -> int | None:
    """The shortest prefix of ``post`` (``lo`` losses or more) from which a decrease stays not established.

    ``persist``: that prefix and the ``persist - 1`` longer ones must all be flat, and the returned
    ``p`` is the longest of them (the step at which the stall is established): one short prefix whose
    decrease is not yet established is not a stall when more losses establish it (a converging loss,
    falling slowly and noisily, looks flat over its first few dozen steps).

    For each prefix of ``p`` losses: ``a`` and ``b`` the medians of its first and last ``p // 2``, ``s``
    its noise (:func:`_noise`); a decrease is established when ``(a - b) - z * se > dec * |a|`` with
    ``se = 1.2533 * s * sqrt(2 / (p // 2))``. All prefixes at once (rows of one sorted array); ``p``,
    or None when every prefix from ``lo`` on is still falling (or there is none).
    """
    n = len(post)
    if lo > n:
        return None
    p = np.arange(lo, n + 1)
    h = p // 2
    col = np.arange(n)[None, :]
    in_h = col < h[:, None]
    a = _row_medians(np.sort(np.where(in_h, post[None, :], np.nan), axis=1), h, is_sorted=True)
    last = post[np.minimum((p - h)[:, None] + col, n - 1)]
    b = _row_medians(np.sort(np.where(in_h, last, np.nan), axis=1), h, is_sorted=True)
    d = np.diff(post, n=2)
    nd = np.maximum(p - 2, 0)
    in_d = np.arange(len(d))[None, :] < nd[:, None]
    md = _row_medians(np.sort(np.where(in_d, d[None, :], np.nan), axis=1), nd, is_sorted=True)
    dev = np.where(in_d, np.abs(d[None, :] - md[:, None]), np.nan)
    mad = _row_medians(np.sort(dev, axis=1), nd, is_sorted=True)
    sigma = np.where(nd > 0, 1.4826 * mad / np.sqrt(6.0), 0.0)
    falling = (a - b) - z * (_MEDIAN_SE * sigma * np.sqrt(2.0 / np.maximum(h, 1))) > dec * np.abs(a)
    if persist <= 1:
        flat = np.flatnonzero(~falling)
        return int(p[flat[0]]) if len(flat) else None
    # runs of `persist` flat prefixes in a row: the first one that completes
    run = np.convolve((~falling).astype(np.int64), np.ones(persist, dtype=np.int64), mode="valid")
    done = np.flatnonzero(run == persist)
    return int(p[done[0] + persist - 1]) if len(done) else None


def _update_ratio(frame: StatsFrame, rows: np.ndarray) -> np.ndarray:
    """The model's update-to-weight ratio at ``rows`` ``[R]``, computed once per row (the frame's row cache)."""
    if not len(rows):
        return np.zeros(0)
    return frame_rows(frame).get(
        frame, ("loss", "global", "update_ratio"), lambda r: {"v": frame.global_values("update_ratio", r)}, rows
    )["v"]


@register_rule("loss_not_decreasing")
class LossNotDecreasing(Rule):
    """The training loss makes no progress: the data rule out a meaningful decrease, in a window and since the start.

    Definition: take a window of ``window`` steps of recorded, finite training losses; ``a`` and ``b``
    are the medians of its first and second halves, ``s`` the standard error of their difference
    (``1.2533 * sigma * sqrt(2 / half)``, with ``sigma`` the per-step noise measured from the
    window's own second differences). The loss is *not decreasing* in the window when even the
    upper confidence bound of its drop is small: ``(a - b) + z * s < decrease * |a|``. The rule fires
    when, in addition, the same holds since the start of the run (``a`` replaced by the median of the
    run's first half-window), and the optimizer's steps are not still growing (with an optimizer, the
    update-to-weight ratio at the end of the window is below ``warmup_growth`` times its start: a
    learning-rate warm-up is not a stall).

    The claim is withdrawn when the loss is leaving a plateau: the median of the window's last
    quarter ``q`` is established below ``a`` by more than ``decrease`` (``(a - q) - z s_q > decrease
    |a|``, ``s_q = 1.2533 sigma sqrt(1/half + 1/quarter)``), which the halves' medians miss while only
    the last few losses have fallen.

    This is an equivalence test: it claims "not decreasing" only when a decrease of ``decrease`` (2%)
    per window is statistically excluded, so a noisy loss that goes up on some steps, a slow but real
    learner whose progress is hidden in noise, a loss that fell and then converged, and a warm-up do
    not fire; a loss that never moved (learning rate 0 or far too small, a model the optimizer does
    not hold, labels unrelated to inputs) or that went back up and stayed there does. The finding's
    step is where the loss last came back to its starting level (the first step, for a run that never
    made progress).

    ``decrease`` is a rate per ``window``: a shorter window (the last flush of a short run, the
    provisional pass of ``report()`` from ``min_steps`` on) tests ``decrease * length / window``, the
    same rate pro rata, so a short window never makes the claim easier.

    A loss that decreased for a while and then stalled is, from the loss alone, indistinguishable from
    convergence; it is reported when the optimizer shows why: the update-to-weight ratio collapsed
    (below ``collapse`` of its level over the window before) at the step the loss stopped falling,
    after a window of statistically established progress (see :meth:`_stall_after_progress`). That
    finding describes the evidence at the first step the stall is established (the same live, at
    each flush or judged once at the end), follows its episode and is resolved when the updates come
    back. Without an optimizer (no update ratio) such a stall is not detected; nor, within one window,
    are stalls from the start whose per-step noise exceeds about 4% of the loss (raise ``window`` for
    those: the bound tightens as 1/sqrt(window)).

    Incremental: the windows ending at new rows are judged together (sorted arrays, no loop over
    rows), and only the frame's tail is read once the run's start is measured.

    Thresholds:
        window: 100 steps; decrease: 2% of the loss per window; z: 2 (one-sided 98%); warmup_growth:
            1.5. In benchmarks/detection.py stalled runs bound their drop below 1.2% per window and a
            slow, noisy healthy learner above 3.5% (our measurements; SageMaker's LossNotDecreasing
            fires when the loss 10 steps apart did not decrease at all, which noisy mini-batch losses
            trip constantly).
        collapse: 0.1, the update-ratio drop (10x) that marks the optimizer as stopped, for a stall
            after progress (our choice: a learning rate set to 0 gives 0; no healthy run of
            benchmarks/detection.py drops its update ratio 10x within a window).
        min_steps: 20, the fewest recorded losses judged at the last flush of a short run. At every
            last flush (and in the provisional pass of ``report()``, which adds no rows) the window
            ending at the last recorded loss is judged. There is no trailing partial episode: a
            stall is judged against the run's start, so a window that ends at the last step already
            holds any stall that began within it, and a shorter one only has less statistical power.
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {
        "window": 100,
        "decrease": 0.02,
        "z": 2.0,
        "warmup_growth": 1.5,
        "min_steps": 20,
        "collapse": 0.1,
    }

    def validate(self) -> None:
        """Check threshold ranges."""
        for name in ("window", "z", "min_steps", "warmup_growth", "collapse"):
            if not self.thresholds[name] > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule 'loss_not_decreasing' to be > 0, but got "
                    f"{self.thresholds[name]!r}."
                )
        if not 0 < self.thresholds["decrease"] < 1:
            raise ConfigurationError(
                "Expected threshold 'decrease' of rule 'loss_not_decreasing' to be in (0, 1), but got "
                f"{self.thresholds['decrease']!r}."
            )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._fired = False
        self._start: tuple[int, float, float] | None = None
        # a stall after progress, once reported: the finding, its episode, the update-ratio level before it
        self._stall: tuple[Finding, Episode, float] | None = None
        # a candidate stall after progress being judged: (its step, the losses since it already judged)
        self._scanned: tuple[int, int] | None = None

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Findings visible in the rows added since the last flush (and their look-back window)."""
        if "loss" not in ctx.frame.scalar_names:
            return []
        if self._fired:
            return self._follow_stall(ctx)
        found = self._from_start(ctx)
        if found:
            return found
        return self._stall_after_progress(ctx)

    def _from_start(self, ctx: RuleContext) -> list[Finding]:
        """The equivalence test: a stall within the window and since the start of the run.

        Every window ending at a new row is judged at once (medians of sorted windows, no loop over
        rows); once the run's start is measured only the frame's tail is read, so a call costs what
        its new rows and one window hold, not what the run has recorded.
        """
        frame = ctx.frame
        th = self.thresholds
        every = ctx.every
        win = steps_to_rows(th["window"], every, minimum=8)
        valid = self._valid_tail(frame, ctx.new_from, win if self._start is not None else None)
        loss = frame.scalar("loss")
        length = window_rows(len(valid), win, final=ctx.final, minimum=int(th["min_steps"]))
        if length == 0:
            return []
        vals, steps = loss[valid], frame.steps[valid]
        half = length // 2
        # The run's start, measured once while its first rows are still at full resolution (a bounded
        # frame thins old rows later); a short run judged at its end uses what it has.
        run_start = self._start
        if run_start is None or run_start[0] != length:
            run_start = (length, _median(vals[:half]), _noise(vals[:length]))
            if len(vals) >= win:
                self._start = run_start
        _, base, base_noise = run_start
        # `decrease` is per window of `window` steps: a shorter window (a short run at its end, the
        # provisional pass of report() at step 20) tests the same rate of progress, pro rata, so a
        # slow learner is never called stalled because its window is short.
        z, dec = th["z"], th["decrease"] * min(1.0, length / win)
        # windows not judged before: those ending at a row added by this flush; at the last flush (and in
        # the provisional pass of report(), which adds no rows) the last window at least
        new_pos = int(np.searchsorted(valid, ctx.new_from))
        begin = max(0, new_pos - length + 1)
        if ctx.final:
            begin = min(begin, len(vals) - length)
        if begin > len(vals) - length:
            return []
        starts = np.arange(begin, len(vals) - length + 1)
        # the second half's median first: a window whose loss is below the run's start by `decrease` is
        # learning whatever its noise (the bound below only adds to the drop), so the rest of the test
        # (two more medians, the noise) is computed for the few windows left: none, in a run that learns
        b = _row_medians(vals[(starts + length - half)[:, None] + np.arange(half)[None, :]])
        left = np.flatnonzero((base - b) < dec * abs(base))
        if not len(left):
            return []
        starts, b = starts[left], b[left]
        w = vals[starts[:, None] + np.arange(length)[None, :]]  # [m, length]
        a = _row_medians(w[:, :half])
        sigma = _row_noise(w)
        se = _MEDIAN_SE * sigma * np.sqrt(2.0 / half)
        se0 = _MEDIAN_SE * np.maximum(sigma, base_noise) * np.sqrt(2.0 / half)
        # a decrease of `decrease` excluded, in the window and since the start ...
        flat = ((a - b) + z * se < dec * np.abs(a)) & ((base - b) + z * se0 < dec * abs(base))
        # ... and not under way at the window's end: the last quarter's median established below the
        # window's start by more than `decrease` (a loss leaving a plateau: its halves' medians still
        # read the plateau while its latest losses have clearly left it)
        q = max(1, half // 2)
        tail = _row_medians(w[:, -q:])
        se_q = _MEDIAN_SE * sigma * np.sqrt(1.0 / half + 1.0 / q)
        flat &= ~((a - tail) - z * se_q > dec * np.abs(a))
        candidates = np.flatnonzero(flat)
        if not len(candidates):
            return []
        ramping = self._ramping(ctx, valid, starts[candidates], length, th["warmup_growth"])
        if ramping.all():
            return []
        c = int(candidates[int(np.argmin(ramping))])  # the first window neither learning nor warming up
        self._fired = True
        i = int(starts[c])
        a0, b0, sigma0 = float(a[c]), float(b[c]), float(sigma[c])
        # The episode starts where the smoothed loss last came back above the starting level minus
        # `decrease` (the window's start when it never left it: stalled from the start).
        level = base - dec * abs(base)
        k = max(1, min(half, 10))  # a short running median: locates the step without blurring it
        smooth = _row_medians(w[c][np.arange(length - k + 1)[:, None] + np.arange(k)[None, :]])
        below = np.flatnonzero(smooth < level)
        end = i + length - 1
        # smooth[j] is centred on row j + k // 2
        start = min(end, i + (int(below[-1]) + k // 2 + 1 if len(below) else 0))
        first, last = int(steps[start]), int(steps[end])
        rose = b0 - a0 > z * float(se[c])
        return [
            self.finding(
                step=first,
                layer=None,
                message=(
                    f"The training loss is not decreasing: over {steps_label(first, last)} its median was {fmt(a0)} in "
                    f"the first half and {fmt(b0)} in the second{' (it rose)' if rose else ''}, against "
                    f"{fmt(base)} at the start of the run; with a noise of {fmt(sigma0)} per step, a drop of "
                    f"{fmt(100 * dec)}% is excluded at {fmt(z)} standard errors."
                ),
                suggestion=(
                    "Check that the optimizer holds the model's parameters and the learning rate is not 0 or "
                    "tiny (try 10-100x higher), that labels match inputs, that the loss uses the model's output, "
                    "and look for vanishing gradients or dead units in this report."
                ),
                evidence={
                    "stat": "loss",
                    "window": [first, last],
                    "median_first_half": a0,
                    "median_second_half": b0,
                    "run_start": base,
                    "noise": sigma0,
                    "threshold_decrease": float(dec),
                },
            )
        ]

    @staticmethod
    def _valid_tail(frame: StatsFrame, new_from: int, win: int | None) -> np.ndarray:
        """Rows with a finite training loss whose optimizer stepped: all of them (``win`` None), or a tail.

        The tail holds at least ``win`` such rows before ``new_from`` (and ``win`` in all), so every
        window ending at a new row, and the last window, are in it; earlier rows are not read.
        """
        loss, skipped, n = frame.scalar("loss"), frame.skipped, len(frame)
        if win is None:
            return np.flatnonzero(~skipped & np.isfinite(loss))
        start = max(0, min(new_from, n) - win - 8)
        while True:
            valid = start + np.flatnonzero(~skipped[start:] & np.isfinite(loss[start:]))
            if start == 0 or (int(np.searchsorted(valid, new_from)) >= win and len(valid) >= win):
                return valid
            start = max(0, start - 2 * (n - start))

    def _stall_after_progress(self, ctx: RuleContext) -> list[Finding]:
        """A loss that stopped falling after real progress because the optimizer stopped moving the weights.

        A mini-batch loss is too noisy for the equivalence test to exclude a decrease of 2% within a
        window or two after a stall, and a loss that stops falling looks like convergence. What tells
        them apart is the optimizer: at a sampled step ``s`` the update-to-weight ratio fell below
        ``collapse`` times its median over the ``window`` steps before ``s`` and stayed there; before
        ``s`` the loss had fallen below the run's start by more than ``decrease`` at ``z`` standard
        errors (real progress); and in the losses since ``s`` (at least ``min_steps``) a decrease of
        ``decrease`` is not established (the lower bound of the drop between their halves' medians is
        below it). The finding's step is ``s``, its evidence that of the first step the stall was
        established (the shortest such run of losses since ``s``); it is resolved when the update
        ratio comes back above the collapse level.
        """
        frame = ctx.frame
        if "update_ratio" not in frame.schema.stats:
            return []
        th = self.thresholds
        win = steps_to_rows(th["window"], ctx.every, minimum=8)
        # the recent rows (full resolution): a stall is judged as it happens; only the frame's tail is read
        need, n, skipped = win + int(th["min_steps"]), len(frame), frame.skipped
        start = max(0, n - max(3 * win, need) - 8)
        keep = start + np.flatnonzero(~skipped[start:])
        while start > 0 and len(keep) < max(3 * win, need):
            start = max(0, start - 2 * (n - start))
            keep = start + np.flatnonzero(~skipped[start:])
        if len(keep) < need:
            return []
        rows = keep[-3 * win :]
        srows = rows[frame.sampled[rows]]
        if len(srows) < 4:
            return []
        ratio = _update_ratio(frame, srows)
        ssteps = frame.steps[srows]
        collapse = float(th["collapse"])
        if not ratio[-1] < collapse * float(np.nanmax(ratio[:-1], initial=0.0)):
            return []  # the latest update is not collapsed: nothing to look for (the common case, cheap)
        for j in range(3, len(srows)):
            before = ratio[:j][(ssteps[:j] >= ssteps[j] - th["window"]) & np.isfinite(ratio[:j])]
            if len(before) < 3:
                continue
            ref = float(np.median(before))
            later = ratio[j:]
            if not (ref > 0 and np.isfinite(later).all() and (later < collapse * ref).all()):
                continue
            found = self._stall_at(ctx, rows, int(ssteps[j]), ref)
            if found is not None:
                return [found]
            break  # the earliest collapse that holds until now is the candidate; later ones are within it
        return []

    def _stall_at(self, ctx: RuleContext, rows: np.ndarray, s: int, ref: float) -> Finding | None:
        """The finding for a stall that began at step ``s`` (``ref``: the update ratio before), or None."""
        frame = ctx.frame
        th = self.thresholds
        loss = frame.scalar("loss")[rows]
        steps = frame.steps[rows]
        ok = np.isfinite(loss)
        pre = loss[ok & (steps < s) & (steps >= s - th["window"])]
        post = loss[ok & (steps >= s)]
        if len(post) < int(th["min_steps"]) or len(pre) < int(th["min_steps"]):
            return None
        if self._start is None:
            return None  # the run's start is measured by the equivalence test once a window is recorded
        z, dec = th["z"], th["decrease"]
        half = len(pre) // 2
        a0, b0 = self._start[1], float(np.median(pre[-half:]))
        se0 = _MEDIAN_SE * max(_noise(pre), self._start[2]) * np.sqrt(2.0 / half)
        if (a0 - b0) - z * se0 <= dec * abs(a0):
            return None  # no real progress since the start: not this test's case
        # The stall is established at the first step since `s` (at least `min_steps` losses) where a
        # decrease is not established: the finding describes the evidence as of that step, so it is the
        # same whenever, and however often, the rule looks (live at every step, or once at the end).
        done = self._scanned[1] if self._scanned is not None and self._scanned[0] == s else 0
        m = int(th["min_steps"])
        # established once `min_steps // 2` more losses keep a decrease unestablished (rescanning the last
        # prefixes, so a run that spans two calls is found: the result does not depend on the cadence)
        p = _first_flat_prefix(post, max(m, done - m + 2), z, dec, persist=m // 2)
        self._scanned = (s, len(post))
        if p is None:
            return None  # still falling, established: the optimizer's steps got small, not useless
        post_steps = steps[ok & (steps >= s)]
        established = int(post_steps[p - 1])
        h = p // 2
        a, b = _median(post[:h]), _median(post[p - h : p])
        after = self._ratio_after(ctx, rows, s, established)
        first, last = s, established
        finding = self.finding(
            step=first,
            layer=None,
            message=(
                f"The training loss stopped decreasing at step {s} after real progress: it fell from {fmt(a0)} at the "
                f"start of the run to {fmt(b0)} before that step, and its median has been {fmt(a)} then "
                f"{fmt(b)} since ({steps_label(first, last)}); at the same step the optimizer's update-to-weight "
                f"ratio fell from {fmt(ref)} to {fmt(after)}: the weights stopped moving."
            ),
            suggestion=(
                "Check the learning rate schedule (a scheduler that drops it to 0 or by orders of magnitude), "
                "parameter groups rebuilt or frozen at that step, and the optimizer's state (a reloaded checkpoint, "
                "a GradScaler skipping every step)."
            ),
            evidence={
                "stat": "loss",
                "window": [first, last],
                "median_before": [a0, b0],
                "median_since": [a, b],
                "update_ratio_before": ref,
                "update_ratio_since": after,
                "threshold_decrease": float(dec),
            },
        )
        self._fired = True
        self._stall = (finding, Episode(last=established), ref)
        # the episode since: the rows recorded after the step it was established at (none, live)
        followed = self._follow_stall(ctx)
        return followed[0] if followed else dataclasses.replace(finding, last_step=established)

    @staticmethod
    def _ratio_after(ctx: RuleContext, rows: np.ndarray, s: int, until: int) -> float:
        frame = ctx.frame
        steps = frame.steps[rows]
        srows = rows[frame.sampled[rows] & (steps >= s) & (steps <= until)]
        ratio = _update_ratio(frame, srows)
        return _median(ratio) if len(ratio) else float("nan")

    def _follow_stall(self, ctx: RuleContext) -> list[Finding]:
        """The episode of a stall after progress: it lasts while the update ratio stays collapsed."""
        if self._stall is None:
            return []
        finding, ep, ref = self._stall
        frame = ctx.frame
        start = int(np.searchsorted(frame.steps, ep.last, side="right"))  # the rows after the episode's last step
        rows = start + np.flatnonzero(~frame.skipped[start:] & frame.sampled[start:])
        if not len(rows):
            return []
        ratio = _update_ratio(frame, rows)
        held = ~(np.nan_to_num(ratio, nan=0.0) >= float(self.thresholds["collapse"]) * ref)
        if ep.follow(frame.steps[rows], held, 1):
            return [finding.with_episode(ep.last, ep.resolved)]
        return []

    @staticmethod
    def _ramping(ctx: RuleContext, valid: np.ndarray, starts: np.ndarray, length: int, growth: float) -> np.ndarray:
        """Whether the optimizer's update size grew ``growth``-fold across each window (needs update_ratio).

        Window ``j`` is the rows ``valid[starts[j] : starts[j] + length]``; its update ratios are those
        of its sampled rows, in order (non-finite ones left out), and it is ramping when the median of
        the last quarter of them is above ``growth`` times the median of the first quarter (at least
        two ratios). Returns ``[len(starts)]`` bool.
        """
        frame = ctx.frame
        if "update_ratio" not in frame.schema.stats:
            return np.zeros(len(starts), dtype=bool)
        span = valid[int(starts.min()) : int(starts.max()) + length]
        ratio = np.full(len(span), np.nan)
        sampled = frame.sampled[span]
        ratio[sampled] = _update_ratio(frame, span[sampled])
        ratio[~np.isfinite(ratio)] = np.nan
        r = ratio[(starts - starts.min())[:, None] + np.arange(length)[None, :]]  # [W, length]
        r = np.take_along_axis(r, np.argsort(np.isnan(r), axis=1, kind="stable"), axis=1)  # finite first, in order
        n = np.sum(~np.isnan(r), axis=1)
        k = np.maximum(1, n // 4)
        col = np.arange(length)[None, :]
        first = _row_medians(np.sort(np.where(col < k[:, None], r, np.nan), axis=1), k, is_sorted=True)
        last_k = (col >= (n - k)[:, None]) & (col < n[:, None])
        last = _row_medians(np.sort(np.where(last_k, r, np.nan), axis=1), k, is_sorted=True)
        return (n >= 2) & (last > growth * first)


@register_rule("overfitting")
class Overfitting(Rule):
    """Validation loss rises from its best while the training loss keeps falling, persistently.

    Needs ``val_loss`` passed to ``scope.step`` (at any cadence; steps without it are ignored).

    Definition: at each validation step ``k``, the training loss is the median of the training losses
    recorded since the previous validation step, and the best validation loss so far is at step ``j``.
    The condition holds at ``k`` when the training loss has not risen since ``j`` and either

    * the validation loss rose from its best: ``val[k] >= val[j] * (1 + rise)`` and by more than
      ``z`` times the noise of the validation curve (the best is taken on a centred median of three
      evaluations, so a single lucky value is not the reference), or
    * the generalization gap grew while validation stopped improving: ``val[k] >= val[j]`` and
      ``(val[k] - train[k]) - (val[j] - train[j]) >= gap * |val[j]|``.

    The rule fires when the condition holds at ``patience`` consecutive validation steps; the finding's
    step is the first of them. A small model whose validation loss tracks its training loss never
    fires, nor does a single noisy validation value.

    Thresholds:
        rise: 0.05 (5 % above the best); gap: 0.25 (the gap grew by a quarter of the validation loss);
        z: 2 noise units; patience: 3 validation steps (our choices). SageMaker's Overfit default, a gap of
        10 % of the training loss at a single validation, fires on 2 of the 7 healthy runs of
        benchmarks/detection.py that pass a validation loss, and on every overfitting run 10 to 30 steps
        before its validation loss starts to rise.
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {"rise": 0.05, "gap": 0.25, "z": 2.0, "patience": 3}

    def validate(self) -> None:
        """Check threshold ranges."""
        for name in ("rise", "gap", "z", "patience"):
            if not self.thresholds[name] > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule 'overfitting' to be > 0, but got {self.thresholds[name]!r}."
                )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._fired = False
        self._last_vstep = 0  # steps, not row indices: a bounded frame thins old rows between flushes
        self._v: list[float] = []  # validation losses, in order
        self._t: list[float] = []  # training loss (median since the previous validation) at each
        self._vsteps: list[int] = []
        self._best = (np.inf, -1)  # lowest centred median of three among evaluations 0..k-2, and where
        self._run = 0  # consecutive validations at which the condition held
        self._episode = (0, 0, np.inf)  # (first validation of the current run, its best's index, best value)

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Findings visible in the rows added since the last flush (and their look-back window)."""
        frame = ctx.frame
        if self._fired or "val_loss" not in frame.scalar_names or "loss" not in frame.scalar_names:
            return []
        th = self.thresholds
        # only the rows after the last validation read: a call costs what was added since, not the run
        start = int(np.searchsorted(frame.steps, self._last_vstep, side="right"))
        keep = ~frame.skipped[start:]
        steps = frame.steps[start:]
        val_all, train_all = frame.scalar("val_loss")[start:], frame.scalar("loss")[start:]
        new_vrows = np.flatnonzero(keep & np.isfinite(val_all))
        if len(new_vrows) == 0:
            return []
        start_k = len(self._v)
        train_ok = keep & np.isfinite(train_all)
        prev = 0
        for r in new_vrows:  # one pass per validation, over the rows since the one before
            # training losses since the previous validation (recent rows: always at full resolution)
            seg = train_all[prev : r + 1][train_ok[prev : r + 1]]
            self._t.append(_median(seg) if len(seg) else np.nan)
            self._v.append(float(val_all[r]))
            self._vsteps.append(int(steps[r]))
            self._last_vstep = int(steps[r])
            prev = r + 1
        v, t = np.asarray(self._v), np.asarray(self._t)
        noise = _noise(v)
        patience = int(th["patience"])
        for k in range(max(1, start_k), len(v)):
            # The best validation loss is a centred median of three evaluations (one lucky value is not the
            # reference); evaluation k-1's median needs v[k], so it competes with its raw value.
            if k >= 2:
                j = k - 2
                m = _median(v[max(0, j - 1) : j + 2])
                if m < self._best[0]:
                    self._best = (m, j)
            best, j = self._best
            if v[k - 1] < best:
                best, j = float(v[k - 1]), k - 1
            cond = False
            if np.isfinite(t[k]) and np.isfinite(t[j]) and t[k] <= t[j]:
                rose = v[k] >= best * (1 + th["rise"]) and v[k] - best > th["z"] * noise
                gap = v[k] >= best and (v[k] - t[k]) - (best - t[j]) >= th["gap"] * abs(best)
                cond = bool(rose or gap)
            if not cond:
                self._run = 0
                continue
            self._run += 1
            if self._run == 1:
                self._episode = (k, j, best)
            if self._run >= patience:
                self._fired = True
                return [self._finding(k, v, t, patience)]
        return []

    def _finding(self, k: int, v: np.ndarray, t: np.ndarray, patience: int) -> Finding:
        k0, j0, best = self._episode
        s_best, s_first, s_now = self._vsteps[j0], self._vsteps[k0], self._vsteps[k]
        rel = v[k] / best - 1 if best != 0 else np.inf
        return self.finding(
            step=s_first,
            layer=None,
            message=(
                f"Overfitting: the validation loss rose from its best, {fmt(best)} at step {s_best}, to {fmt(v[k])} at "
                f"step {s_now} ({'+' if rel >= 0 else ''}{fmt(100 * rel)}%) while the training loss kept falling "
                f"({fmt(t[j0])} -> {fmt(t[k])}); the gap between them grew from {fmt(best - t[j0])} to "
                f"{fmt(v[k] - t[k])} over {patience} validations ({steps_label(s_first, s_now)})."
            ),
            suggestion=(
                f"Stop early (the best validation loss was at step {s_best}), add regularization (weight decay, "
                "dropout, data augmentation), use more training data or a smaller model."
            ),
            evidence={
                "stat": "val_loss",
                "best_val_loss": float(best),
                "best_step": s_best,
                "val_loss": float(v[k]),
                "train_loss_at_best": float(t[j0]),
                "train_loss": float(t[k]),
                "gap_at_best": float(best - t[j0]),
                "gap": float(v[k] - t[k]),
                "window": [s_first, s_now],
                "evaluations": patience,
            },
        )
