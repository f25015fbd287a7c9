"""The batch of one optimizer step against the gradient noise scale: far below it, or far above it.

The simple noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al., 2018, "An Empirical Model of
Large-Batch Training"; estimated by :mod:`gradscope.capture.noise_scale` under ``watch(noise_scale=...)``)
is the batch at which the noise of a mini-batch gradient equals its signal. The paper's model gives the
optimizer steps needed as ``S_min (1 + B_simple / B)`` and the samples as ``E_min (1 + B / B_simple)``: a
batch ``B`` far below ``B_simple`` spends many more steps than needed, one far above it spends many more
samples than needed.

Two kinds, because they are two different findings that can both happen in one run (``B_simple`` grows
as the loss falls, so a batch can start far above it and end far below it), each with its own episode,
suggestion and opt-out: ``batch_size_too_small`` and ``batch_size_too_large``.

What the rules read. The estimator records, at every recorded step, the running sums since it was
attached of its per-step unbiased estimates of ``tr(Sigma)`` and ``|G|^2`` (scalars
``noise_scale_trace_sum`` and ``noise_scale_grad_sq_sum``), and the batch of the step (``noise_scale_batch``,
micro-batch x accumulated micro-batches, or per-rank batch x world size under DDP). The difference of the
sums between two recorded steps is the sum of the estimates in between, so the rules judge the last
``window`` estimates exactly whatever ``every`` is and however the frame thins old rows, and they keep
only the new rows' differences between flushes (incremental, constant cost per call).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import fmt, steps_label
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule
from gradscope.rules.window import Episode, steps_to_rows

__all__ = [
    "BATCH",
    "GRAD_SQ_SUM",
    "NOISE_SCALE_SCALARS",
    "TRACE_SUM",
    "BatchSizeTooLarge",
    "BatchSizeTooSmall",
    "WindowEstimate",
]

#: Scalar: running sum of the per-step estimates of ``tr(Sigma)`` (``NoiseScale.scalars()``).
TRACE_SUM = "noise_scale_trace_sum"
#: Scalar: running sum of the per-step estimates of ``|G|^2``.
GRAD_SQ_SUM = "noise_scale_grad_sq_sum"
#: Scalar: the batch of the step, in the estimator's unit (``b_big``).
BATCH = "noise_scale_batch"
#: The scalars the rules read.
NOISE_SCALE_SCALARS = (TRACE_SUM, GRAD_SQ_SUM, BATCH)

# The fewest recorded rows a window's spread is measured from (with a large ``every``, fewer rows hold
# ``min_estimates`` steps): below about 30 the standard error itself is too uncertain for a z of 3.
_MIN_ROWS = 30

_UNIT = "counted like watch(noise_scale=...): samples when given the micro-batch size, else micro-batches"


class WindowEstimate:
    """``B_simple`` over a window of per-step estimates, with a Fieller confidence interval.

    ``B_simple = mean(t) / mean(g)`` (the ratio of the averaged estimates, as the paper recommends, not an
    average of per-step ratios, which the noise in ``g`` would make meaningless). The interval is the set
    of ``R >= 0`` that the one-sided tests of ``mean(t - R g) = 0`` at ``z`` standard errors do not reject
    (Fieller's interval for a ratio of means): it is exact in the limit of normal means, and unbounded
    above when ``mean(g)`` is not clearly positive (the gradient is lost in the noise).

    Args:
        t: ``[m]`` estimates of ``tr(Sigma)`` (sums over each block of steps).
        g: ``[m]`` estimates of ``|G|^2`` over the same blocks.
        z: standard errors of the interval.
    """

    __slots__ = ("_cov", "_z", "b_simple", "g_mean", "high", "low", "m", "t_mean")

    def __init__(self, t: np.ndarray, g: np.ndarray, z: float) -> None:
        self.m = m = len(t)
        self._z = z
        # Both rows at once (four small NumPy calls: the rules run at every flush and live evaluation).
        pair = np.vstack((t, g))
        means = pair.sum(axis=1) / m
        dev = pair - means[:, None]
        cov = (dev @ dev.T) / max(m - 1, 1)
        self.t_mean, self.g_mean = float(means[0]), float(means[1])
        self._cov = (float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1]))  # s_tt, s_gg, s_tg
        self.b_simple = self.t_mean / self.g_mean if self.g_mean > 0 else math.inf
        self.low, self.high = self._interval()

    def beyond(self, threshold: float) -> float:
        """Standard errors by which ``mean(t - threshold g)`` is above 0 (B_simple above ``threshold``)."""
        s_tt, s_gg, s_tg = self._cov
        var = (s_tt - 2 * threshold * s_tg + threshold * threshold * s_gg) / self.m
        diff = self.t_mean - threshold * self.g_mean
        return diff / math.sqrt(var) if var > 0 else math.copysign(math.inf, diff) if diff else 0.0

    def _interval(self) -> tuple[float, float]:
        s_tt, s_gg, s_tg = self._cov
        k = self._z * self._z / self.m
        # R is inside when (t_mean - R g_mean)^2 <= k (s_tt - 2 R s_tg + R^2 s_gg): a R^2 - 2 b R + c <= 0
        a = self.g_mean**2 - k * s_gg
        b = self.t_mean * self.g_mean - k * s_tg
        c = self.t_mean**2 - k * s_tt
        disc = max(b * b - a * c, 0.0)
        root = math.sqrt(disc)
        if a > 0:  # g_mean clearly positive: a bounded interval
            return max((b - root) / a, 0.0), max((b + root) / a, 0.0)
        if c <= 0:  # neither mean clearly away from 0: nothing known
            return 0.0, math.inf
        if a == 0:
            return (c / (2 * b) if b > 0 else 0.0), math.inf
        # a < 0 < c: R = 0 is excluded; the inside is outside the roots, and B_simple >= 0
        return max((b - root) / a, (b + root) / a, 0.0), math.inf


class _BatchVsNoiseScale(Rule):
    """Shared by the two kinds: the incremental window, the judgement, the episode.

    Definition: the estimates of the last ``window`` steps after the first ``warmup`` steps (recorded
    rows, each the sum over ``every`` steps; at least ``min_estimates`` steps and 30 rows) give
    ``B_simple`` and its interval at ``z`` standard errors (:class:`WindowEstimate`). With ``B`` the batch
    of the last step, ``batch_size_too_small`` fires when the whole interval lies above ``factor x B``,
    ``batch_size_too_large`` when it lies below ``B / factor``. The episode lasts while the point estimate
    stays beyond the threshold, and is resolved once it has stayed within it for a window.

    Thresholds:
        factor: 10 ("far": at a tenth of ``B_simple`` the paper's model puts the run at 11x the fewest
            steps, at ten times it at 11x the fewest samples; a smaller factor would read more into
            ``B_simple`` than its order-of-magnitude agreement with the critical batch size).
        window: 200 steps (``B_simple`` grows as the loss falls: only a recent window says where the run
            is now).
        min_estimates: 200 steps' estimates, a full window (over 100 steps the estimate's spread is
            about 10% on small models with the batch 16-20x from ``B_simple``, over 200 about 7%;
            docs/rules.md).
        z: 3 standard errors (the rules judge the window again at every flush and live evaluation: a
            3-sigma one-sided test keeps the repeated looks from firing on noise).
        warmup: 50 steps (the first steps move fastest and say little about the run).
    """

    severity = "warning"
    requires: ClassVar[tuple[str, ...]] = ("noise_scale",)
    defaults: ClassVar[dict[str, Any]] = {
        "factor": 10.0,
        "window": 200,
        "min_estimates": 200,
        "z": 3.0,
        "warmup": 50,
    }
    #: +1: the batch is far below ``B_simple``; -1: far above.
    direction: ClassVar[int] = 1

    def validate(self) -> None:
        """Check threshold ranges."""
        th = self.thresholds
        if not th["factor"] > 1:
            raise ConfigurationError(
                f"Expected threshold 'factor' of rule {self.name!r} to be > 1 (how far from B_simple is 'far'), "
                f"but got {th['factor']!r}."
            )
        for key in ("window", "z"):
            if not th[key] > 0:
                raise ConfigurationError(
                    f"Expected threshold {key!r} of rule {self.name!r} to be > 0, but got {th[key]!r}."
                )
        if th["min_estimates"] < 3:
            raise ConfigurationError(
                f"Expected threshold 'min_estimates' of rule {self.name!r} to be at least 3 (a spread needs "
                f"several estimates), but got {th['min_estimates']!r}."
            )
        if th["warmup"] < 0:
            raise ConfigurationError(
                f"Expected threshold 'warmup' of rule {self.name!r} to be >= 0 steps, but got {th['warmup']!r}."
            )

    def reset(self) -> None:
        """Forget every estimate and finding (a new run)."""
        self._seen = 0  # last recorded step whose sums were taken
        self._prev = (0.0, 0.0)  # the running sums at that step (0 before the estimator's first step)
        # The window, one contiguous row per quantity: [4, rows] = end step, sum of the tr(Sigma)
        # estimates over the row's steps, of the |G|^2 ones, and the batch.
        self._blocks = np.zeros((4, 0))
        self._finding: Finding | None = None
        self._episode: Episode | None = None

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Take the rows recorded since the last call; judge the window as of the last of them."""
        frame = ctx.frame
        names = frame.scalar_names
        if TRACE_SUM not in names or GRAD_SQ_SUM not in names or BATCH not in names:
            return []  # noise_scale off (the rule is then normally inactive), or the estimator is not the scope's
        steps = frame.steps
        lo = int(np.searchsorted(steps, self._seen, side="right"))
        if lo >= len(steps):
            return []
        self._take(ctx, lo)
        th = self.thresholds
        # Recorded rows: with every=k each holds the sum of k steps' estimates.
        need = steps_to_rows(int(th["min_estimates"]), ctx.every, minimum=_MIN_ROWS)
        keep = steps_to_rows(int(th["window"]), ctx.every, minimum=need)
        if self._blocks.shape[1] > keep:
            self._blocks = self._blocks[:, -keep:]
        blocks = self._blocks
        if blocks.shape[1] < need:
            return []
        batch = float(blocks[3, -1])
        if not (batch > 0 and math.isfinite(batch)):
            return []
        est = WindowEstimate(blocks[1], blocks[2], float(th["z"]))
        step = int(blocks[0, -1])
        threshold = batch * th["factor"] if self.direction > 0 else batch / th["factor"]
        if self._finding is None:
            sigmas = self.direction * est.beyond(threshold)
            if sigmas <= th["z"]:
                return []
            self._finding = self._report(est, blocks, batch)
            self._episode = Episode(last=step)
            return [self._finding]
        assert self._episode is not None  # set with the finding
        # The episode lasts while the point estimate stays beyond the threshold, whatever its spread.
        held = est.b_simple > threshold if self.direction > 0 else est.b_simple < threshold
        if self._episode.follow(np.array([step]), np.array([held]), int(th["window"])):
            return [replace(self._finding, last_step=self._episode.last, resolved_step=self._episode.resolved)]
        return []

    def _take(self, ctx: RuleContext, lo: int) -> None:
        """Append the estimates in the rows from ``lo`` on: differences of the running sums."""
        frame = ctx.frame
        steps = frame.steps[lo:]
        tr, g2, batch = (frame.scalar(n)[lo:] for n in NOISE_SCALE_SCALARS)
        self._seen = int(steps[-1])
        ok = np.isfinite(tr) & np.isfinite(g2)
        if not ok.all():
            steps, tr, g2, batch = steps[ok], tr[ok], g2[ok], batch[ok]
        if not len(steps):
            return
        sums = np.vstack((tr, g2))
        delta = np.empty_like(sums)
        delta[:, 0] = sums[:, 0] - self._prev
        np.subtract(sums[:, 1:], sums[:, :-1], out=delta[:, 1:])
        dt, dg = delta
        self._prev = (float(tr[-1]), float(g2[-1]))
        # No change: no estimate between the two rows (one micro-batch, a skipped or non-finite step).
        new = (delta != 0).any(axis=0) & (steps > self.thresholds["warmup"])
        if new.any():
            self._blocks = np.concatenate([self._blocks, np.stack([steps, dt, dg, batch])[:, new]], axis=1)

    def _report(self, est: WindowEstimate, blocks: np.ndarray, batch: float) -> Finding:
        th = self.thresholds
        first, last = int(blocks[0, 0]), int(blocks[0, -1])
        b = est.b_simple
        # a power of two near B_simple (at least one sample); from the interval's low end when B_simple is
        # unbounded (the window's mean |G|^2 estimate is not positive: the gradient is lost in the noise)
        near = b if b < math.inf else est.low
        suggested = max(1.0, float(2.0 ** round(math.log2(near)))) if near > 0 else 1.0
        # The paper's model: steps S_min (1 + B_simple / B), samples E_min (1 + B / B_simple); with an
        # unbounded B_simple, the figures at its interval's low end (what the evidence supports).
        steps_factor = 1 + near / batch
        data_factor = 1 + batch / b if b > 0 else math.inf
        spread = f"{fmt(est.low)}-{fmt(est.high)} at {fmt(th['z'])} standard errors"
        value = f"B_simple = {fmt(b)}" if b < math.inf else f"B_simple above {fmt(est.low)} (no signal measured)"
        where = f"over {est.m} estimates ({steps_label(first, last)})"
        if self.direction > 0:
            ratio = near / batch
            at_least = "" if b < math.inf else "at least "
            message = (
                f"The batch of one optimizer step ({fmt(batch)}) is {at_least}{fmt(ratio)}x below the gradient "
                f"noise scale {value} ({spread}; {where}): each step's gradient is mostly noise. By the empirical "
                f"model of large-batch training this batch needs {at_least}about {fmt(steps_factor)}x the fewest "
                f"possible optimizer steps; a batch near B_simple would need {at_least}about "
                f"{fmt(steps_factor / 2)}x fewer steps for at most twice the samples."
            )
            suggestion = (
                f"Try a batch of about {fmt(suggested)} per optimizer step (near B_simple): more accumulated "
                "micro-batches or more ranks, scaling the learning rate up with the batch (about linearly for SGD, "
                "less for Adam). Or keep the batch and lower the learning rate, if it was tuned at a larger batch. "
                "B_simple only approximates the critical batch size beyond which a larger batch stops saving "
                "steps (within an order of magnitude), and it grows as the loss falls, so the critical batch is "
                f"often larger: read {fmt(suggested)} as a lower end."
            )
        else:
            ratio = batch / b if b > 0 else math.inf
            message = (
                f"The batch of one optimizer step ({fmt(batch)}) is {fmt(ratio)}x above the gradient noise scale "
                f"B_simple = {fmt(b)} ({spread}; {where}): most of each batch adds little to the step. By the "
                f"empirical model of large-batch training this batch spends about {fmt(data_factor)}x the fewest "
                f"possible samples; a batch near B_simple would need about {fmt(data_factor / 2)}x fewer samples "
                "for at most twice the optimizer steps."
            )
            suggestion = (
                f"Try a batch of about {fmt(suggested)} per optimizer step (near B_simple): fewer accumulated "
                "micro-batches or fewer ranks, with the learning rate lowered with the batch, for the same progress "
                "per sample at less compute. B_simple grows as the loss falls and only approximates the critical "
                "batch size (within an order of magnitude; it is often an underestimate), so a batch above it may "
                "pay off later in the run: this finding resolves when it does."
            )
        return self.finding(
            step=last,
            layer=None,
            message=message,
            suggestion=suggestion,
            evidence={
                "stat": "noise_scale",
                "b_simple": b,
                "b_simple_low": est.low,
                "b_simple_high": est.high,
                "batch": batch,
                "ratio": ratio,
                "threshold_factor": float(th["factor"]),
                "z": float(th["z"]),
                "estimates": est.m,
                "window": [first, last],
                "steps_factor": steps_factor,
                "data_factor": data_factor,
                "suggested_batch": suggested,
                "unit": _UNIT,
            },
        )


@register_rule("batch_size_too_small")
class BatchSizeTooSmall(_BatchVsNoiseScale):
    """The batch of one optimizer step is far below the gradient noise scale (needs ``watch(noise_scale=...)``).

    See :class:`_BatchVsNoiseScale` for the definition and thresholds: the whole confidence interval of
    ``B_simple`` over the window lies above ``factor`` (10) times the batch. Training is noise-dominated:
    a larger batch would cut the number of steps almost in proportion at little extra compute.
    """

    direction = 1


@register_rule("batch_size_too_large")
class BatchSizeTooLarge(_BatchVsNoiseScale):
    """The batch of one optimizer step is far above the gradient noise scale (needs ``watch(noise_scale=...)``).

    See :class:`_BatchVsNoiseScale` for the definition and thresholds: the whole confidence interval of
    ``B_simple`` over the window lies below the batch divided by ``factor`` (10). Most of each batch is
    compute spent for little progress: a smaller batch gives about the same progress per step.
    """

    direction = -1
