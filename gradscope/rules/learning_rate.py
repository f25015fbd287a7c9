"""Is the learning rate wrong? Verdicts from the size of the optimizer's steps and what the loss does with them.

Both rules read the update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` (``update_ratio``, taken
on sampled steps when ``watch(optimizer=...)``): the step the optimizer actually took, after momentum,
Adam's normalisation, weight decay and any scheduler. That makes one threshold hold across optimizers:

* SGD: the step is ``lr * g`` (with momentum ``beta``, about ``lr * g / (1 - beta)`` once it builds up), so
  the ratio scales with the gradient as well as the learning rate;
* Adam, AdamW and relatives normalise each entry, so the step is about ``lr`` per entry and the ratio is
  about ``lr / rms(w)``, nearly independent of the gradient's scale.

The ratio alone is not a verdict (a ratio of 1e-2 is right for a short fine-tune and wrong for a long
pre-training), so each rule also asks the loss: too high when the steps are large *and* the loss rose from
its best level; too low when the steps are small *and* the loss is still falling at a steady rate (its
progress does not slow down, so the run is far from where a larger step would overshoot). A warm-up
(ratio growing across the window) or a decay (ratio shrinking) is the schedule at work: neither fires.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import fmt, layer_label, nanmedian, steps_label
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule

__all__ = ["LearningRateTooHigh", "LearningRateTooLow"]

_MEDIAN_SE = 1.2533  # standard error of a median of n normal samples: 1.2533 sigma / sqrt(n)


def _noise(values: np.ndarray) -> float:
    """Per-step noise from second differences (cancel a local trend), robust (MAD)."""
    d = np.diff(values, n=2)
    if len(d) < 2:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(6.0))


def _factor(x: float) -> int:
    """A factor to try, rounded to 1, 2, 3 or 5 times a power of ten, between 2 and 100."""
    x = float(np.clip(x, 2.0, 100.0))
    exp = 10 ** np.floor(np.log10(x))
    return int(min((m * exp for m in (1, 2, 3, 5, 10) if m * exp >= x * 0.75), default=x))


def _layer_ratios(ctx: RuleContext, rows: np.ndarray) -> dict[str, float]:
    """Median update ratio of every layer over ``rows``."""
    frame = ctx.frame
    values = frame.layer_values("update_ratio", rows)
    med = nanmedian(np.where(np.isfinite(values), values, np.nan), axis=0)
    return {frame.schema.layers[i]: float(med[i]) for i in range(len(med)) if np.isfinite(med[i])}


class _LearningRateRule(Rule):
    """What both verdicts share: the sampled update ratios and losses of a window of steps."""

    requires = ("update_ratio",)

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._fired = False
        self._judged = 0  # last sampled step whose window was judged

    def validate(self) -> None:
        """Check threshold ranges: every threshold of both rules is a positive number."""
        for name, value in self.thresholds.items():
            if not value > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule {self.name!r} to be > 0, but got {value!r}."
                )

    def _series(self, ctx: RuleContext) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """``(sampled rows, global update ratio at them, loss rows, loss values)``; None without a loss."""
        frame = ctx.frame
        if "loss" not in frame.scalar_names or not ctx.has_optimizer:
            return None
        ok = ~frame.skipped
        loss = frame.scalar("loss")
        loss_rows = np.flatnonzero(ok & np.isfinite(loss))
        sampled = np.flatnonzero(ok & frame.sampled)
        if len(sampled) == 0 or len(loss_rows) == 0:
            return None
        ratio = frame.global_values("update_ratio", sampled)
        keep = np.isfinite(ratio)
        return sampled[keep], ratio[keep], loss_rows, loss[loss_rows]


@register_rule("learning_rate_too_high")
class LearningRateTooHigh(_LearningRateRule):
    """The optimizer's steps are large and the loss rose from its best level: the learning rate is too high.

    Definition: at a sampled step, the largest update-to-weight ratio of the model over the last ``window``
    steps is at least ``high_ratio``, and the median loss of the last ``smooth`` steps is above the best
    level reached before them (the lowest running median of ``smooth`` losses) by more than ``rise`` of
    that level and ``z`` noise units (per-step noise over the last ``window`` losses), or by more than
    3 x ``rise`` whatever the noise (a loss that oscillates wildly while it climbs is the symptom itself). A loss that diverges to NaN/Inf is ``nonfinite_gradients``; this rule
    names the cause while the loss is still finite (oscillating or climbing).

    A warm-up that overshoots is caught too (that is what this rule is for); a loss that is noisy but keeps
    its level, or large steps with a falling loss (a short fine-tune, an early phase), do not fire.

    Thresholds:
        window: 50 steps; high_ratio: 0.05 (weights moving by 5 % of their norm in one step; healthy runs
            of our benchmarks stay below 0.02 after their first steps, diverging ones reach 0.2-1.6); rise:
            0.1 (10 % above the best level); z: 4 noise units; smooth: 10 steps. The folklore target of an
            update ratio near 1e-3 (Karpathy) is a starting point; our thresholds are measured in
            benchmarks/lr_detection.py.
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {"window": 50, "high_ratio": 0.05, "rise": 0.1, "z": 4.0, "smooth": 10}

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        super().reset()
        self._best = np.inf  # lowest running median of the loss so far
        self._best_through = 0  # the last step of the losses it covers

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Windows ending at sampled steps not judged before."""
        if self._fired:
            return []
        series = self._series(ctx)
        if series is None:
            return []
        sampled, ratio, loss_rows, loss = series
        frame, th = ctx.frame, self.thresholds
        steps = frame.steps
        loss_steps = steps[loss_rows]
        smooth = int(th["smooth"])
        for k in np.flatnonzero(steps[sampled] > self._judged):
            end = int(steps[sampled[k]])
            self._judged = end
            start = end - int(th["window"]) + 1
            in_window = (steps[sampled] >= start) & (steps[sampled] <= end)
            peak = float(ratio[in_window].max())
            if peak < th["high_ratio"]:
                continue
            # `now`: the loss over the last `smooth` steps; `best`: the lowest running median of `smooth`
            # losses before them (at least the run's first `smooth`), so a divergence shows within a few
            # sampled steps, early in a run as well as late.
            recent = loss[(loss_steps > end - smooth) & (loss_steps <= end)]
            before = loss[loss_steps <= end - smooth]
            if len(before) < smooth or len(recent) < max(3, smooth // 2):
                continue
            best = self._best_level(before, loss_steps[loss_steps <= end - smooth], smooth)
            now = float(np.median(recent))
            noise = max(_noise(before[-int(th["window"]) :]), _noise(loss[loss_steps <= end][-int(th["window"]) :]))
            # a rise of 3x `rise` stands whatever the noise: a loss that oscillates wildly while it climbs
            # (the symptom itself) must not hide behind its own noise
            big = now > best + 3 * th["rise"] * abs(best)
            if not (now > best + th["rise"] * abs(best) and (now > best + th["z"] * noise or big)):
                continue
            self._fired = True
            rows = sampled[in_window]
            layers = {k: v for k, v in _layer_ratios(ctx, rows).items() if v >= th["high_ratio"]}
            worst = sorted(layers.items(), key=lambda kv: -kv[1])[:5]
            factor = _factor(peak / 0.01)
            named = ", ".join(f"{layer_label(n)} {fmt(v)}" for n, v in worst)
            return [
                self.finding(
                    step=start if start > 0 else 1,
                    layer=worst[0][0] if worst else None,
                    message=(
                        f"The learning rate looks too high: over {steps_label(max(1, start), end)} the optimizer "
                        f"moved the weights by up to {fmt(peak)} of their norm in one step (threshold "
                        f"{fmt(th['high_ratio'])}) while the loss rose from its best level {fmt(best)} to "
                        f"{fmt(now)} ({fmt(100 * (now / best - 1)) if best else 'inf'}% higher; noise "
                        f"{fmt(noise)} per step)."
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
                        "window": [max(1, start), end],
                        "max_update_ratio": peak,
                        "threshold_high_ratio": float(th["high_ratio"]),
                        "best_loss": best,
                        "loss": now,
                        "noise": noise,
                        "layer_update_ratios": dict(worst),
                        "factor": factor,
                    },
                )
            ]
        return []

    def _best_level(self, before: np.ndarray, before_steps: np.ndarray, smooth: int) -> float:
        """Lowest running median of ``smooth`` losses so far, updated with the windows not seen before."""
        fresh = before_steps > self._best_through
        first = max(0, int(np.argmax(fresh)) - smooth + 1) if fresh.any() else len(before)
        tail = before[first:]
        if len(tail) >= smooth:
            medians = np.median(np.lib.stride_tricks.sliding_window_view(tail, smooth), axis=1)
            self._best = min(self._best, float(medians.min()))
            self._best_through = int(before_steps[-1])
        return self._best


@register_rule("learning_rate_too_low")
class LearningRateTooLow(_LearningRateRule):
    """Tiny optimizer steps and a loss still falling at a steady rate: the learning rate is too low.

    Definition: over a window of ``window`` steps with at least ``min_samples`` sampled update ratios,

    * the median update-to-weight ratio of the model is below ``low_ratio``,
    * the loss falls significantly and materially: the medians of the window's first and second halves
      differ by more than ``z`` standard errors (noise from the loss's own second differences) and by more
      than ``min_drop`` of the loss (of its initial level, when that is larger: a loss converging to 1e-4
      makes steady but immaterial progress),
    * its progress is not slowing down: the drop over the last half of the window is at least
      ``steady`` times the drop over the first half (a run near convergence decelerates; one whose
      learning rate is too small keeps making the same small progress, step after step),
    * the ratio is neither growing (a warm-up) nor shrinking (a decay) by more than 2x across the window,
    * and no step of the run so far was large (``collapsed_ratio``): small steps after large ones are a model
      that diverged or died (ReLUs that no longer fire), not a learning rate that is too small.

    A loss that does not move at all is ``loss_not_decreasing`` (its causes are many); a loss that falls
    and flattens is converging, whatever its learning rate.

    Thresholds:
        window: 100 steps; low_ratio: 1e-3 (the folklore healthy update ratio; in benchmarks/lr_detection.py
            runs whose 10x larger learning rate ended clearly lower had ratios of 2e-5 to 4e-3, healthy ones
            3e-3 to 2e-2); z: 3; min_drop: 0.005 (0.5 % of the loss per window: less is a stall, whose
            causes are many); steady: 0.5; min_samples: 5; collapsed_ratio: 0.05 (once a step was that large,
            small steps later mean a collapsed or diverged model, not a small learning rate: never fires).
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {
        "window": 100,
        "low_ratio": 1e-3,
        "z": 3.0,
        "min_drop": 0.005,
        "steady": 0.5,
        "min_samples": 5,
        "collapsed_ratio": 0.05,
    }

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        super().reset()
        self._largest = 0.0  # the largest update ratio seen so far
        self._scale: float | None = None  # median |loss| of the run's first 10 losses

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Windows ending at sampled steps not judged before."""
        if self._fired:
            return []
        series = self._series(ctx)
        if series is None:
            return []
        sampled, ratio, loss_rows, loss = series
        if self._scale is None and len(loss) >= 10:
            # measured once, while the run's first rows are at full resolution (a bounded frame thins them)
            self._scale = float(np.median(np.abs(loss[:10])))
        frame, th = ctx.frame, self.thresholds
        steps = frame.steps
        loss_steps = steps[loss_rows]
        for k in np.flatnonzero(steps[sampled] > self._judged):
            end = int(steps[sampled[k]])
            self._judged = end
            start = end - int(th["window"]) + 1
            if start < 1:
                continue
            in_window = (steps[sampled] >= start) & (steps[sampled] <= end)
            r = ratio[in_window]
            if len(r) < th["min_samples"]:
                continue
            # steps that were once large and are small now: the model collapsed (dead units, saturation) or
            # diverged; the learning rate is not too low
            self._largest = max(self._largest, float(ratio[: k + 1].max()))
            if self._largest >= th["collapsed_ratio"]:
                continue
            median = float(np.median(r))
            if not 0 < median < th["low_ratio"]:
                continue
            third = max(1, len(r) // 3)
            first_r, last_r = float(np.median(r[:third])), float(np.median(r[-third:]))
            if last_r > 2 * first_r or first_r > 2 * last_r:
                continue  # the schedule is changing the step: a warm-up or a decay
            w = loss[(loss_steps >= start) & (loss_steps <= end)]
            if len(w) < 16:
                continue
            half, quarter = len(w) // 2, len(w) // 4
            a, b = float(np.median(w[:half])), float(np.median(w[-half:]))
            noise = _noise(w)
            se = _MEDIAN_SE * noise * np.sqrt(2.0 / half)
            if not (a - b > th["z"] * se and a - b > th["min_drop"] * max(abs(a), self._scale or 0.0)):
                continue  # no significant, material progress: a stall is not this rule's question
            d1 = float(np.median(w[:quarter]) - np.median(w[quarter:half]))
            d2 = float(np.median(w[half : half + quarter]) - np.median(w[-quarter:]))
            if not d2 >= th["steady"] * d1:
                continue  # progress slows down: converging
            self._fired = True
            rows = sampled[in_window]
            layers = _layer_ratios(ctx, rows)
            low = sorted(((n, v) for n, v in layers.items() if v < th["low_ratio"]), key=lambda kv: kv[1])[:5]
            factor = _factor(3e-3 / median)
            named = ", ".join(f"{layer_label(n)} {fmt(v)}" for n, v in low)
            return [
                self.finding(
                    step=start,
                    layer=None,
                    message=(
                        f"The learning rate looks too low: over {steps_label(start, end)} the optimizer moved the "
                        f"weights by a median {fmt(median)} of their norm per step (threshold {fmt(th['low_ratio'])}) "
                        f"while the loss kept falling at a steady rate ({fmt(a)} -> {fmt(b)}, the second half of the "
                        f"window as fast as the first: {fmt(d1)} then {fmt(d2)}), far from converging."
                        + (f" Layers with the smallest steps: {named}." if named else "")
                    ),
                    suggestion=(
                        f"Multiply the learning rate by about {factor} (aim at an update/weight ratio near 1e-3 to "
                        "1e-2), or run a short learning-rate range test; with SGD add momentum (0.9); with "
                        "Adam-family optimizers the step per entry is about lr, so raise lr itself."
                    ),
                    evidence={
                        "stat": "update_ratio",
                        "window": [start, end],
                        "median_update_ratio": median,
                        "threshold_low_ratio": float(th["low_ratio"]),
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
        return []
