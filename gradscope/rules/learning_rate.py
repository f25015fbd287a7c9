"""Is the learning rate wrong? Verdicts from the size of the optimizer's steps and what the loss does with them.

Both rules read the update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` (``update_ratio``, taken
on sampled steps when ``watch(optimizer=...)``): the step the optimizer actually took, after momentum,
Adam's normalisation, weight decay and any scheduler. That makes one threshold hold across optimizers:

* SGD: the step is ``lr * g`` (with momentum ``beta``, about ``lr * g / (1 - beta)`` once it builds up), so
  the ratio scales with the gradient as well as the learning rate;
* Adam, AdamW and relatives normalise each entry, so the step is about ``lr`` per entry and the ratio is
  about ``lr / rms(w)``, nearly independent of the gradient's scale.

The ratio alone is not a verdict (a ratio of 1e-2 is right for a short fine-tune and wrong for a long
pre-training), so each rule also asks the loss: too high when the steps are (or were) large *and* the loss
rose from its best level (the loss before the first update included), or when the steps stay very large
and the loss is no lower than where the run started, or when the loss jumped well above its level before
any update right after the first updates (an overshoot: Adam's first step moves every entry by about ``lr``);
too low when the steps are small *and* the loss is
still falling at a steady rate (its progress does not slow down, so the run is far from where a larger step
would overshoot), or when it falls at a steady rate and realises most of what a first-order model of the
loss predicts for steps of that size (the *efficiency* ``-dL/step / (||g|| ||dw||)``: near 1 the step is in
the loss's linear regime and could be larger; a step near the best size realises about half). A warm-up
(ratio growing across the window), a decay (ratio shrinking) and steps that shrank since earlier in the run
(a schedule or a collapsed model: dead units) never make ``learning_rate_too_low`` fire.

Both rules keep their own running state, fed with the rows recorded since their previous check (found by
step, so a thinned frame or a repeated call changes nothing): their cost per check does not grow with the
length of the run.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import fmt, layer_label, nanmedian, steps_label
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule
from gradscope.stats.moments import MOMENT_INDEX

__all__ = ["LearningRateTooHigh", "LearningRateTooLow"]

_MEDIAN_SE = 1.2533  # standard error of a median of n normal samples: 1.2533 sigma / sqrt(n)


def _median(values: np.ndarray) -> float:
    """Median of a 1-D array (a partition: a few times cheaper than ``np.median`` on the short arrays here)."""
    n = len(values)
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(values, (lo, hi))
    return 0.5 * float(part[lo] + part[hi])


def _noise(values: np.ndarray) -> float:
    """Per-step noise from second differences (cancel a local trend), robust (MAD)."""
    d = values[2:] - 2 * values[1:-1] + values[:-2]
    if len(d) < 2:
        return 0.0
    return 1.4826 * _median(np.abs(d - _median(d))) / np.sqrt(6.0)


def _running_median(values: np.ndarray, n: int) -> np.ndarray:
    """Medians of every ``n`` consecutive values, ``[len(values) - n + 1]`` (a partition, cheaper than np.median)."""
    view = np.lib.stride_tricks.as_strided(
        values, shape=(len(values) - n + 1, n), strides=(values.strides[0], values.strides[0]), writeable=False
    )
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(view, (lo, hi), axis=1)
    return 0.5 * (part[:, lo] + part[:, hi])


def _grid_ends(ts: np.ndarray, judged: int, stride: int) -> list[int]:
    """The first of ``ts`` (sorted steps) in each stretch ``[k * stride, (k + 1) * stride)`` after ``judged``'s.

    Windows judged at these ends are the same whether the rules run every step or every 50: a verdict
    does not depend on the check cadence, and a check judges one or two windows, not one per new step.
    """
    out: list[int] = []
    last = judged // stride if judged else -1
    for t in ts.tolist():
        if t // stride > last:
            out.append(int(t))
            last = t // stride
    return out


def _factor(x: float) -> int:
    """A factor to try, rounded to 1, 2, 3 or 5 times a power of ten, between 2 and 100."""
    x = float(np.clip(x, 2.0, 100.0))
    exp = 10 ** np.floor(np.log10(x))
    return int(min((m * exp for m in (1, 2, 3, 5, 10) if m * exp >= x * 0.75), default=x))


def _model_update_ratio(frame: Any, rows: np.ndarray) -> np.ndarray:
    """``update_ratio`` of the whole model at ``rows``, ``[R]``: ``frame.global_values("update_ratio", rows)``.

    Summed here from the two moments it needs (``dsumsq``, ``psumsq``) over the parameters that had a
    gradient: the general path aggregates every moment of the statistic's groups and costs several times more,
    which matters at every check.
    """
    has = frame.has_grad[rows]
    mom = frame.moments[rows]
    d = np.where(has, mom[:, :, MOMENT_INDEX["dsumsq"]], 0.0).sum(axis=1)
    p = np.where(has, mom[:, :, MOMENT_INDEX["psumsq"]], 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(has.any(axis=1), np.sqrt(d) / np.sqrt(p), np.nan)


def _layer_ratios(ctx: RuleContext, first: int, last: int) -> dict[str, float]:
    """Median update ratio of every layer over the sampled rows of steps ``first..last`` (read once, at a finding)."""
    frame = ctx.frame
    steps = frame.steps
    lo, hi = np.searchsorted(steps, first, side="left"), np.searchsorted(steps, last, side="right")
    rows = lo + np.flatnonzero(frame.sampled[lo:hi] & ~frame.skipped[lo:hi])
    if len(rows) == 0:
        return {}
    values = frame.layer_values("update_ratio", rows)
    med = nanmedian(np.where(np.isfinite(values), values, np.nan), axis=0)
    return {frame.schema.layers[i]: float(med[i]) for i in range(len(med)) if np.isfinite(med[i])}


class _LearningRateRule(Rule):
    """What both verdicts share: running buffers of the recent losses and sampled update ratios.

    State (plain floats and NumPy arrays, so ``copy.deepcopy`` of the rule, as in ``report()``'s
    provisional pass, carries it): the last ``_keep()`` losses and sampled steps, the last step taken in,
    and the run's starting loss level.
    """

    requires = ("update_ratio",)

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._fired = False
        self._seen = 0  # last step taken into the buffers
        self._loss_steps = np.zeros(0, dtype=np.int64)
        self._loss = np.zeros(0)
        self._ratio_steps = np.zeros(0, dtype=np.int64)
        self._ratio = np.zeros(0)
        self._start: float | None = None  # the loss before the first update (step 1), when recorded
        self._first: list[float] = []  # the run's first `smooth` finite losses
        self._level0: float | None = None  # their median: the starting level
        self._nonfinite: int | None = None  # the first step whose loss was not finite

    def validate(self) -> None:
        """Check threshold ranges: every threshold of both rules is a positive number."""
        for name, value in self.thresholds.items():
            if not value > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule {self.name!r} to be > 0, but got {value!r}."
                )

    def _keep(self) -> int:
        """Steps of history the buffers keep."""
        return 2 * int(self.thresholds["window"]) + int(self.thresholds.get("smooth", 10))

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Take in the rows recorded since the last check and judge them (nothing once the rule has fired)."""
        if self._fired:
            return []
        new = self._take(ctx)
        return [] if new is None else self._judge_new(ctx, new)

    def _judge_new(self, ctx: RuleContext, new: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[Finding]:
        """The verdict on the new rows ``(loss steps, losses, sampled steps)`` from :meth:`_take`."""
        raise NotImplementedError

    def _take(self, ctx: RuleContext) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Append the rows recorded since the last call; return the new ``(loss steps, losses, sampled steps)``.

        None when the run has no loss or no optimizer. Rows are found by step (``searchsorted``), not by
        ``ctx.new_from``: a provisional pass over rows already taken adds nothing.
        """
        frame = ctx.frame
        if "loss" not in frame.scalar_names or not ctx.has_optimizer or not len(frame):
            return None
        steps = frame.steps
        lo = int(np.searchsorted(steps, self._seen, side="right"))
        if lo >= len(steps):
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64)
        new_steps = steps[lo:]
        self._seen = int(new_steps[-1])
        ok = ~frame.skipped[lo:]
        loss = frame.scalar("loss")[lo:]
        keep = ok & np.isfinite(loss)
        ls, lv = new_steps[keep], loss[keep]
        bad = ok & ~np.isfinite(loss)
        if bad.any() and self._nonfinite is None:
            self._nonfinite = int(new_steps[np.argmax(bad)])
        srows = lo + np.flatnonzero(ok & frame.sampled[lo:])
        ss = np.zeros(0, dtype=np.int64)
        if len(srows):
            ratio = _model_update_ratio(frame, srows)
            fin = np.isfinite(ratio)
            ss = steps[srows][fin]
            self._ratio_steps = np.concatenate([self._ratio_steps, ss])
            self._ratio = np.concatenate([self._ratio, ratio[fin]])
        if len(ls):
            if self._start is None and int(new_steps[0]) == 1 and keep[0]:
                self._start = float(loss[0])  # computed before the first optimizer step
            smooth = int(self.thresholds.get("smooth", 10))
            if self._level0 is None:
                self._first.extend(float(v) for v in lv[: smooth - len(self._first)])
                if len(self._first) >= smooth:
                    self._level0 = _median(np.asarray(self._first))
            self._loss_steps = np.concatenate([self._loss_steps, ls])
            self._loss = np.concatenate([self._loss, lv])
        # keep a bounded history: the cost of a check does not grow with the run
        horizon = self._seen - self._keep()
        if len(self._loss_steps) and self._loss_steps[0] <= horizon:
            cut = int(np.searchsorted(self._loss_steps, horizon, side="right"))
            self._loss_steps, self._loss = self._loss_steps[cut:], self._loss[cut:]
        if len(self._ratio_steps) and self._ratio_steps[0] <= horizon:
            cut = int(np.searchsorted(self._ratio_steps, horizon, side="right"))
            self._ratio_steps, self._ratio = self._ratio_steps[cut:], self._ratio[cut:]
        return ls, lv, ss


@register_rule("learning_rate_too_high")
class LearningRateTooHigh(_LearningRateRule):
    """The optimizer's steps are, or were, large and the loss is worse for it: the learning rate is too high.

    Definition: at a sampled step ``t``, with ``now`` the median loss of the last ``smooth`` steps,

    * **divergence**: the largest update-to-weight ratio since ``window`` steps before the loss's best level
      is at least ``high_ratio``, and ``now`` is above that best level (the lowest running median of
      ``smooth`` losses, and the loss at step 1, computed before any update) by more than ``rise`` of it
      and ``z`` noise units (per-step noise over the last ``window`` losses), or by more than 3 x ``rise``
      of the starting level whatever the noise (a loss that oscillates wildly while it climbs); or
    * **no progress under large steps**: the median ratio over the last ``window`` steps is at least
      ``high_ratio`` (steps of 5 % of the weights, sustained), and the median loss over those steps is
      not ``rise`` below the run's starting level (the loss at step 1, or the median of its first ``smooth``
      losses): the weights move a lot and the loss has gained nothing; or
    * **overshoot at the start**: within the ``smooth`` steps after the first update, a median of 3
      consecutive losses is above the loss at step 1 (computed before any update) by more than ``rise`` of it
      and ``z`` noise units (per-step noise over the first ``window`` losses), and a step up to then reached
      ``high_ratio``. The first steps are the largest relative steps of a run at a constant learning rate
      (Adam's first step moves every entry by about ``lr``, whatever the gradient: a ratio of ``lr / rms(w)``),
      and the loss before them is the initialisation's, with no trend to confuse: steps that make the model
      clearly worse than its random initialisation overshot, even when the loss recovers and later falls
      (the run then trains from a damaged start, or sits at chance level). The median of 3 leaves out one
      bad batch; judged once, at the first check after step ``window`` (or the last of a run shorter than that),
      from the losses of steps ``1..window`` (the same whatever the check cadence).

    A loss that diverges to NaN/Inf is ``nonfinite_gradients``; this rule names the cause while the loss is
    still finite (oscillating or climbing), and also when the steps have shrunk since (a model that blew up
    and then died keeps a loss above where it started). A warm-up that overshoots is caught too (that is what
    this rule is for); a loss that is noisy but keeps its level, or large steps with a falling loss (a short
    fine-tune, an early phase), do not fire.

    Thresholds:
        window: 50 steps; high_ratio: 0.05 (weights moving by 5 % of their norm in one step; healthy runs
            of our benchmarks stay below 0.02 after their first steps, except plain SGD at the largest rate
            that still trains, 0.04-0.1, whose loss falls); rise: 0.1 (10 % above the best level); z: 4
            noise units; smooth: 10 steps. The folklore target of an update ratio near 1e-3 (Karpathy) is a
            starting point; our thresholds are measured in benchmarks/lr_detection.py.
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {"window": 50, "high_ratio": 0.05, "rise": 0.1, "z": 4.0, "smooth": 10}

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        super().reset()
        self._best = np.inf  # lowest running median of the loss so far (or the loss at step 1)
        self._best_step = 0  # the last step of the losses it covers
        self._peak = 0.0  # largest update ratio since `window` steps before the best
        self._folded = 0  # the last step whose running median was folded into `_best`
        self._blown = False  # a non-finite loss was judged
        self._stuck_judged = 0  # the last step judged for large steps without progress
        self._early_judged = False  # the overshoot at the start was judged

    def _judge_new(self, ctx: RuleContext, new: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[Finding]:
        """Judge the sampled steps recorded since the last check."""
        ls, _, ss = new
        th = self.thresholds
        smooth, window = int(th["smooth"]), int(th["window"])
        steps, loss = self._loss_steps, self._loss
        if self._start is not None and self._best_step == 0:
            self._best, self._best_step = self._start, 1
        level0 = self._start if self._start is not None else self._level0
        if self._nonfinite is not None and not self._blown:
            self._blown = True
            found = self._blew_up(ctx, level0)
            if found:
                return found
        if not self._early_judged and (self._seen >= window or (ctx.final and self._seen > smooth)):
            self._early_judged = True
            found = self._overshoot(ctx)
            if found:
                return found
        if len(ls) == 0 or len(steps) < smooth:
            return []
        if len(ss) == 0:
            return []
        # running medians of `smooth` losses ending at each loss step not folded into the best yet (one
        # vectorised median over at most one check's rows and `smooth` more)
        first = max(0, int(np.searchsorted(steps, self._folded, side="right")) - smooth + 1)
        med = _running_median(loss[first:], smooth)
        med_steps = steps[first + smooth - 1 :]
        # each new sampled step t is judged against the best level of the medians that ended `smooth` steps or
        # more before it (so `now` is not part of it): a running minimum, vectorised over the t's
        ts = ss.astype(np.int64)
        # (every median here ends after `_folded`: `first` starts them there)
        run_min = np.minimum.accumulate(med)
        k = np.searchsorted(med_steps, ts - smooth, side="right") - 1
        k_last = int(k[-1])
        best_before = self._best
        if k_last >= 0:
            # fold what is now `smooth` steps old into the best level; large steps count from `window` before it
            if run_min[k_last] < self._best:
                b = int(np.argmin(med[: k_last + 1]))
                self._best, self._best_step = float(med[b]), int(med_steps[b])
                self._peak = 0.0
            self._folded = int(med_steps[k_last])
        if max(self._peak, float(self._ratio.max()) if len(self._ratio) else 0.0) < th["high_ratio"]:
            return []  # no large step since the best nor in the recent windows: neither verdict can hold
        # each new sampled step t is judged against the best level of the medians that ended `smooth` steps or
        # more before it (so `now` is not part of it): a running minimum, vectorised over the t's
        best_t = np.minimum(best_before, np.where(k >= 0, run_min[np.maximum(k, 0)], np.inf))
        j = np.searchsorted(med_steps, ts, side="right") - 1
        valid = (j >= 0) & (med_steps[np.maximum(j, 0)] > ts - smooth) & np.isfinite(best_t)
        now_t = med[np.maximum(j, 0)]
        # the largest step since `window` steps before the best, as of each t (a running maximum)
        since = self._ratio_steps > self._best_step - window
        peak_t = np.full(len(ts), self._peak)
        if since.any():
            run_max = np.maximum.accumulate(self._ratio[since])
            at = np.searchsorted(self._ratio_steps[since], ts, side="right") - 1
            peak_t = np.maximum(peak_t, np.where(at >= 0, run_max[np.maximum(at, 0)], 0.0))
            self._peak = max(self._peak, float(run_max[-1]))
        noise = _noise(loss[-window:])
        scale = abs(level0) if level0 is not None else np.abs(best_t)
        diverged = (
            valid
            & (peak_t >= th["high_ratio"])
            & (now_t > best_t + th["rise"] * np.abs(best_t))
            & ((now_t > best_t + th["z"] * noise) | (now_t > best_t + 3 * th["rise"] * scale))
        )
        if diverged.any():
            i = int(np.argmax(diverged))
            self._peak = float(peak_t[i])
            t, now, best, sustained, how = int(ts[i]), float(now_t[i]), float(best_t[i]), 0.0, "diverged"
        else:
            # no progress under sustained large steps: a lasting state, judged every `window / 2` steps (at
            # the first sampled step of each stretch, so the verdict does not depend on how often checks run)
            for t in _grid_ends(ts, self._stuck_judged, max(1, window // 2)):
                self._stuck_judged = t
                w_in = (self._ratio_steps > t - window) & (self._ratio_steps <= t)
                sustained = _median(self._ratio[w_in]) if w_in.sum() >= 3 else 0.0
                if (
                    sustained >= th["high_ratio"]
                    and level0 is not None
                    and t > window
                    and _median(loss[(steps > t - window) & (steps <= t)]) > level0 - th["rise"] * abs(level0)
                ):
                    i = int(np.searchsorted(ts, t))
                    now, best, how = float(now_t[i]), float(best_t[i]), "stuck"
                    break
            else:
                return []
        self._fired = True
        return [self._report(ctx, t, now, best, level0, noise, sustained, how)]

    def _overshoot(self, ctx: RuleContext) -> list[Finding]:
        """Did the loss jump well above its pre-update level right after the first updates (judged once)?"""
        th = self.thresholds
        smooth, window = int(th["smooth"]), int(th["window"])
        steps, loss = self._loss_steps, self._loss
        if self._start is None or not len(steps) or steps[0] > 2:
            return []  # no loss before the first update, or the first losses already left the buffers
        early = (steps >= 2) & (steps <= smooth + 1)
        if early.sum() < 3:
            return []
        med3 = _running_median(loss[early], 3)  # one bad batch does not make a median of 3
        i = int(np.argmax(med3))
        now, start = float(med3[i]), self._start
        end = int(steps[early][i + 2])
        ratio = self._ratio[self._ratio_steps <= end]
        peak = float(ratio.max()) if len(ratio) else 0.0
        noise = _noise(loss[steps <= window])
        if not (peak >= th["high_ratio"] and now > start + th["rise"] * abs(start) and now > start + th["z"] * noise):
            return []
        self._fired = True
        self._peak = peak
        return [self._report(ctx, end, now, start, start, noise, 0.0, "overshoot")]

    def _blew_up(self, ctx: RuleContext, level0: float | None) -> list[Finding]:
        """The loss became non-finite: was it climbing under large steps first (fewer than ``smooth`` losses do)?"""
        th = self.thresholds
        t = self._nonfinite
        assert t is not None  # called once one was seen
        before = self._loss[self._loss_steps < t][-int(th["smooth"]) :]
        ratio = self._ratio[self._ratio_steps < t]
        if len(before) < 3 or not len(ratio) or (level0 is None and self._start is None):
            return []
        ref = self._start if self._start is not None else level0
        assert ref is not None
        peak = max(self._peak, float(ratio.max()))
        now = _median(before[-3:])
        if not (peak >= th["high_ratio"] and now > ref + 3 * th["rise"] * abs(ref)):
            return []
        self._fired = True
        self._peak = peak
        end = int(self._loss_steps[self._loss_steps < t][-1])
        best = min(self._best, ref)
        return [self._report(ctx, end, now, best, level0 if level0 is not None else ref, 0.0, 0.0, "diverged")]

    def _report(
        self,
        ctx: RuleContext,
        end: int,
        now: float,
        best: float,
        level0: float | None,
        noise: float,
        sustained: float,
        how: str,
    ) -> Finding:
        th = self.thresholds
        window = int(th["window"])
        if how == "stuck":
            start = max(1, end - window + 1)
        elif how == "overshoot":
            start = 1
        else:
            start = max(1, min(self._best_step, end - window + 1))
        layers = {k: v for k, v in _layer_ratios(ctx, start, end).items() if v >= th["high_ratio"]}
        worst = sorted(layers.items(), key=lambda kv: -kv[1])[:5]
        peak = max(self._peak, sustained)
        factor = _factor(peak / 0.01)
        named = ", ".join(f"{layer_label(n)} {fmt(v)}" for n, v in worst)
        if how == "overshoot":
            what = (
                f"the first updates moved the weights by up to {fmt(self._peak)} of their norm in one step "
                f"(threshold {fmt(th['high_ratio'])}) and the loss jumped from {fmt(best)} before any update to "
                f"{fmt(now)} (median of 3 consecutive losses, {fmt(100 * (now / best - 1)) if best else 'inf'}% "
                f"higher; noise {fmt(noise)} per step): the first steps overshot, leaving the model worse than "
                "its initialisation."
            )
        elif how == "diverged":
            what = (
                f"the optimizer moved the weights by up to {fmt(self._peak)} of their norm in one step (threshold "
                f"{fmt(th['high_ratio'])}) and the loss rose from its best level {fmt(best)} to {fmt(now)} "
                f"({fmt(100 * (now / best - 1)) if best else 'inf'}% higher; noise {fmt(noise)} per step)."
            )
        else:
            what = (
                f"the optimizer moved the weights by a median {fmt(sustained)} of their norm per step (threshold "
                f"{fmt(th['high_ratio'])}) and the loss, {fmt(now)}, is no lower than where the run started "
                f"({fmt(level0)}; noise {fmt(noise)} per step): large steps that gain nothing."
            )
        return self.finding(
            step=start,
            layer=worst[0][0] if worst else None,
            message=(
                f"The learning rate looks too high: by {steps_label(start, end)} {what}"
                + (f" Layers with the largest steps (update/weight ratio): {named}." if named else "")
            ),
            suggestion=(
                f"Divide the learning rate by about {factor} (the update/weight ratio near 1e-3 to 1e-2 is "
                "the usual range), or add/lengthen a warm-up and clip gradients "
                "(torch.nn.utils.clip_grad_norm_); with SGD and momentum the effective step is lr/(1-momentum); "
                "with Adam-family optimizers the step per entry is about lr, so lower lr itself or use a "
                "smaller lr for the layers named (parameter groups)."
            ),
            evidence={
                "stat": "update_ratio",
                "signal": how,
                "window": [start, end],
                "max_update_ratio": self._peak,
                "median_update_ratio": sustained,
                "threshold_high_ratio": float(th["high_ratio"]),
                "best_loss": best,
                "start_loss": level0,
                "loss": now,
                "noise": noise,
                "layer_update_ratios": dict(worst),
                "factor": factor,
            },
        )


@register_rule("learning_rate_too_low")
class LearningRateTooLow(_LearningRateRule):
    """Small optimizer steps and a loss still falling at a steady rate: the learning rate is too low.

    Definition: over windows of ``window`` steps (judged every ``window / 2`` steps, ending at the first sampled
    step of each stretch: the verdict does not depend on how often the rules run), with at least
    ``min_samples`` sampled update ratios,

    * the loss falls significantly and materially: the medians of the window's first and second halves
      differ by more than ``z`` standard errors (noise from the loss's own second differences) and by more
      than ``min_drop`` of the loss (of its initial level, when that is larger: a loss converging to 1e-4
      makes steady but immaterial progress),
    * its progress is not slowing down: the drop over the last half of the window is at least
      ``steady`` times the drop over the first half (a run near convergence decelerates; one whose
      learning rate is too small keeps making the same small progress, step after step),
    * the steps are small: the median update-to-weight ratio is below ``low_ratio``, or below
      ``moderate_ratio`` with an efficiency of at least ``efficiency``: the loss's fall per step is that
      fraction of ``||g|| ||dw||`` (median over the sampled steps), the most a step of that size can gain
      to first order. Near 1 the step is in the loss's linear regime and could be larger; a step of the
      best size along a quadratic realises 1/2; noise in the gradient and curvature lower it,
    * the ratio is neither growing (a warm-up) nor shrinking (a decay) by more than 2x across the window,
      nor ``shrunk`` times smaller than the median of an earlier window of the run: small steps after
      larger ones are a decay schedule or a model that collapsed (ReLUs that no longer fire, saturated
      units), not a learning rate set too low; nor did any step of the run reach ``collapsed_ratio``.

    A loss that does not move at all is ``loss_not_decreasing`` (its causes are many); a loss that falls
    and flattens is converging, whatever its learning rate.

    Thresholds:
        window: 100 steps; low_ratio: 1e-3 (the folklore healthy update ratio; in benchmarks/lr_detection.py
            runs whose 10x larger learning rate ended clearly lower had ratios of 2e-5 to 4e-3, healthy ones
            3e-3 to 2e-2); moderate_ratio: 1e-2, efficiency: 0.35 (fine runs of the benchmark stay below 0.3
            after their first 50 steps); z: 3; min_drop: 0.005 (0.5 % of the loss per window: less is a
            stall, whose causes are many); steady: 0.5; min_samples: 5; shrunk: 3; collapsed_ratio: 0.05.
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {
        "window": 100,
        "low_ratio": 1e-3,
        "moderate_ratio": 1e-2,
        "efficiency": 0.35,
        "z": 3.0,
        "min_drop": 0.005,
        "steady": 0.5,
        "min_samples": 5,
        "shrunk": 3.0,
        "collapsed_ratio": 0.05,
    }

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        super().reset()
        self._largest = 0.0  # the largest update ratio seen so far
        self._top = 0.0  # the largest window median of the update ratio judged so far
        self._judged = 0  # the last window end judged

    def _work_at(self, ctx: RuleContext, first: int, last: int) -> np.ndarray:
        """``||g|| * ||dw||`` at the sampled steps ``first..last`` (finite ones): the first-order bound of each step's gain.

        Read from the frame only when a window needs it (its other conditions hold), not at every check.
        """
        frame = ctx.frame
        if not frame.schema.derivable("l2_norm"):
            return np.zeros(0)
        steps = frame.steps
        lo, hi = np.searchsorted(steps, first, side="left"), np.searchsorted(steps, last, side="right")
        rows = lo + np.flatnonzero(frame.sampled[lo:hi] & ~frame.skipped[lo:hi])
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged run's norms overflow: NaN, left out
            work = (
                frame.global_values("update_ratio", rows)
                * frame.global_values("param_norm", rows)
                * frame.global_values("l2_norm", rows)
            )
        return work[np.isfinite(work)]

    def _judge_new(self, ctx: RuleContext, new: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[Finding]:
        """Judge the windows ending at the first new sampled step of each ``window / 2`` stretch (one or two a check)."""
        _, _, ss = new
        th = self.thresholds
        found: list[Finding] = []
        for end in _grid_ends(ss, self._judged, max(1, int(th["window"]) // 2)):
            self._judged = end
            found = self._judge(ctx, end)
            if found:
                break
        if len(ss):
            self._largest = max(self._largest, float(self._ratio[-len(ss) :].max()))
        return found

    def _judge(self, ctx: RuleContext, end: int) -> list[Finding]:
        """The window of ``window`` steps ending at the sampled step ``end``."""
        th = self.thresholds
        start = end - int(th["window"]) + 1
        upto = self._ratio_steps <= end
        largest = max(self._largest, float(self._ratio[upto].max()) if upto.any() else 0.0)
        if start < 1 or largest >= th["collapsed_ratio"]:
            return []  # a step of the run was once that large: small steps now are a collapse, not a low lr
        r_in = (self._ratio_steps >= start) & (self._ratio_steps <= end)
        r = self._ratio[r_in]
        if len(r) < th["min_samples"]:
            return []
        median = _median(r)
        top, self._top = self._top, max(self._top, median)
        if not median > 0 or median >= th["moderate_ratio"] or top > th["shrunk"] * median:
            return []  # steps not small, or shrunk since earlier: a decay schedule or a collapsed model
        third = max(1, len(r) // 3)
        first_r, last_r = _median(r[:third]), _median(r[-third:])
        if last_r > 2 * first_r or first_r > 2 * last_r:
            return []  # the schedule is changing the step: a warm-up or a decay
        w = self._loss[(self._loss_steps >= start) & (self._loss_steps <= end)]
        if len(w) < 16:
            return []
        half, quarter = len(w) // 2, len(w) // 4
        a, b = _median(w[:half]), _median(w[-half:])
        noise = _noise(w)
        se = _MEDIAN_SE * noise * np.sqrt(2.0 / half)
        if not (a - b > th["z"] * se and a - b > th["min_drop"] * max(abs(a), abs(self._level0 or 0.0))):
            return []  # no significant, material progress: a stall is not this rule's question
        d1 = _median(w[:quarter]) - _median(w[quarter:half])
        d2 = _median(w[half : half + quarter]) - _median(w[-quarter:])
        if not d2 >= th["steady"] * d1:
            return []  # progress slows down: converging
        work = self._work_at(ctx, start, end) if median >= th["low_ratio"] else np.zeros(0)
        gain = (a - b) / max(1, len(w) - half)  # the loss's fall per step (halves' medians are half a window apart)
        bound = _median(work) if len(work) else 0.0
        eff = gain / bound if bound > 0 else float("nan")
        if not (median < th["low_ratio"] or eff >= th["efficiency"]):
            return []
        self._fired = True
        layers = _layer_ratios(ctx, start, end)
        low = sorted(((n, v) for n, v in layers.items() if v < max(th["low_ratio"], median)), key=lambda kv: kv[1])[:5]
        factor = _factor(3e-3 / median) if median < th["low_ratio"] else _factor(2.0 * eff)
        named = ", ".join(f"{layer_label(n)} {fmt(v)}" for n, v in low)
        why = (
            f"a median {fmt(median)} of their norm per step (threshold {fmt(th['low_ratio'])})"
            if median < th["low_ratio"]
            else f"a median {fmt(median)} of their norm per step, and the loss fell by {fmt(eff)} of what a "
            f"first-order model of the loss predicts for steps that size (threshold {fmt(th['efficiency'])}): the "
            "steps are in the loss's linear regime"
        )
        return [
            self.finding(
                step=start,
                layer=None,
                message=(
                    f"The learning rate looks too low: over {steps_label(start, end)} the optimizer moved the "
                    f"weights by {why}, while the loss kept falling at a steady rate ({fmt(a)} -> {fmt(b)}, the "
                    f"second half of the window as fast as the first: {fmt(d1)} then {fmt(d2)}), far from "
                    "converging." + (f" Layers with the smallest steps: {named}." if named else "")
                ),
                suggestion=(
                    f"Multiply the learning rate by about {factor} (aim at an update/weight ratio near 1e-3 to "
                    "1e-2), or run a short learning-rate range test; with SGD add momentum (0.9); with "
                    "Adam-family optimizers the step per entry is about lr, so raise lr itself (or, when the "
                    "weights were initialised large, initialise them smaller: the ratio is lr / rms(w))."
                ),
                evidence={
                    "stat": "update_ratio",
                    "window": [start, end],
                    "median_update_ratio": median,
                    "threshold_low_ratio": float(th["low_ratio"]),
                    "efficiency": eff,
                    "loss_first_half": a,
                    "loss_second_half": b,
                    "drop_first_half": d1,
                    "drop_second_half": d2,
                    "noise": noise,
                    "layer_update_ratios": dict(low),
                    "factor": factor,
                },
            )
        ]
