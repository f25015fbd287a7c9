"""Rules about activation outputs: dead ReLU-family units and saturated tanh/sigmoid units.

Activation statistics are taken on sampled steps only (every ``sample_every`` steps, forward hooks on
the activation modules; see :mod:`gradscope.capture.activations`), so windows here count sampled steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import fmt, frame_rows, layer_label, nanmedian, steps_label
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule
from gradscope.rules.window import (
    Episode,
    episode_min_rows,
    episode_windows,
    follow_episodes,
    judged_rows,
    steps_to_rows,
)

__all__ = ["DeadUnits", "SaturatedActivations"]

_SATURATING = ("tanh", "sigmoid", "hardtanh", "hardsigmoid")


class _ActivationRule(Rule):
    """Shared windowing: a statistic of chosen activation modules above a threshold, persistently."""

    kinds: tuple[str, ...] = ()
    stat = ""
    skip_output = False

    def validate(self) -> None:
        """Check threshold ranges."""
        th = self.thresholds
        for name in ("threshold", "min_fraction"):
            if not 0 < th[name] <= 1:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule {self.name!r} to be in (0, 1], but got {th[name]!r}."
                )
        for name in ("window", "min_samples", "confirm"):
            if not th[name] > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule {self.name!r} to be > 0, but got {th[name]!r}."
                )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        # per activation module reported: its finding and the episode followed since
        self._reported: dict[int, tuple[Finding, Episode]] = {}

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Findings visible in the rows added since the last flush (and their look-back window).

        Modules reported before are followed: an episode update when their ``last_step`` or
        ``resolved_step`` (no longer above ``threshold`` for ``confirm`` steps) changed.
        """
        schema = ctx.frame.schema
        skip = tuple(ctx.output_activations) if self.skip_output else ()
        mods = frame_rows(ctx.frame).const(
            ("act_modules", self.kinds, skip),
            lambda: [a for a, k in enumerate(schema.act_kinds) if k in self.kinds and a not in set(skip)],
        )
        if not mods:
            return []
        th = self.thresholds
        sample_every = ctx.sample_every
        win = steps_to_rows(th["window"], sample_every, minimum=1)
        rows, _ = judged_rows(ctx, win - 1, sampled=True)
        if len(rows) == 0:
            return []
        vals = ctx.frame.act_values(self.stat)[rows][:, mods]
        flags = vals >= th["threshold"]  # NaN (not taken) compares False
        steps = ctx.frame.steps[rows]
        out: list[Finding] = []
        reported = self._reported
        if reported:
            followed = [j for j, a in enumerate(mods) if a in reported]
            kept = [reported[mods[j]] for j in followed]
            if len(kept) > 4:  # one array pass for many; a few are cheaper one by one (same result)
                changed = follow_episodes(
                    [ep for _, ep in kept], steps, flags[:, followed], int(th["confirm"])
                ).tolist()
            else:
                changed = [ep.follow(steps, flags[:, j], int(th["confirm"])) for j, (_, ep) in zip(followed, kept)]
            for (reported_finding, ep), moved in zip(kept, changed):
                if moved:
                    out.append(reported_finding.with_episode(ep.last, ep.resolved))
            fresh = [j for j, a in enumerate(mods) if a not in reported]
            if not fresh:
                return out
            flags, vals = flags[:, fresh], vals[:, fresh]
        else:
            fresh = list(range(len(mods)))
        if not flags.any():
            return out  # an episode starts at a sampled row above the threshold: none in the window
        spans = {
            "window": win,
            "confirm": steps_to_rows(th["confirm"], sample_every, minimum=1),
            "minimum": int(th["min_samples"]),
            "init_steps": int(th["window"]),
        }
        min_rows = episode_min_rows(steps, flags, final=False, **spans)
        # One sample confirms a mid-run onset only after a clean stretch: a module that held the
        # condition at a sampled step of the look-back (a flicker) needs the full window.
        recent = np.zeros_like(flags)
        for back in range(1, win):
            recent[back:] |= flags[:-back]
        min_rows = np.where(recent, win, min_rows)
        if ctx.final:
            # the last flush judges trailing episodes on `min_samples`, and is never stricter than an
            # ordinary flush: a mid-run onset confirmed by `confirm` live is confirmed at the end too
            min_rows = np.minimum(min_rows, episode_min_rows(steps, flags, final=True, **spans))
        pers, lengths = episode_windows(flags, win, th["min_fraction"], min_rows)
        for j in np.flatnonzero(pers.any(axis=0)).tolist():  # the modules with an episode, in order
            a = mods[fresh[j]]
            hit = np.flatnonzero(pers[:, j])
            w = int(hit[0])
            length = int(lengths[w])
            span = slice(w, w + length)
            value = float(nanmedian(vals[span, j]))
            first, last = int(steps[w]), int(steps[w + length - 1])
            finding = self._finding(ctx, a, value, first, last, length, rows[span])
            held = steps[span][flags[span, j]]
            ep = Episode(last=int(held.max()))
            ep.follow(steps, flags[:, j], int(th["confirm"]))  # later rows may already show it clearing
            reported[a] = (finding, ep)
            out.append(finding.with_episode(ep.last, ep.resolved))
        return out

    def _finding(
        self, ctx: RuleContext, a: int, value: float, first: int, last: int, samples: int, rows: np.ndarray
    ) -> Finding:
        raise NotImplementedError


@register_rule("dead_units")
class DeadUnits(_ActivationRule):
    """ReLU-family layers whose units output zero for every sample, over a window.

    Definition: on each sampled step, a unit (a feature, or a channel of a convolution output) of a
    ReLU-family module (ReLU, ReLU6, LeakyReLU, PReLU, RReLU) is dead when its output is <= 0 for
    every sample (and position) of the batch: it passes no gradient (a leaky unit only its small
    slope). The rule fires for a module whose dead fraction (``act_dead_fraction``) is at least
    ``threshold`` at the first sampled step of a window of ``window`` steps and at ``min_fraction``
    of its sampled steps. Each module is reported once, at the first step of the episode.

    The measure is per batch: with batches of one or two samples of a fully connected layer, a unit
    can be silent for the whole batch by chance; raise ``threshold`` (or sample larger batches).

    Thresholds:
        threshold: 0.5, SageMaker Debugger's DeadRelu default (``threshold_layer`` 50 %); the ReLU
            layers of the healthy runs in benchmarks/detection.py stay below 0.4 (a 16-unit autoencoder
            bottleneck; the others below 0.15), the dead-unit faults reach 0.75 to 1.
        window: 30 steps (3 sampled steps at the default ``sample_every=10``); min_fraction: 0.8.
        min_samples: 2 sampled steps, the fewest judged at the last flush: at the end of a short run,
            and for an episode that began fewer than ``window`` steps before the end.
        confirm: 10 steps (1 sampled step at ``sample_every=10``). At an ordinary flush (and a live
            evaluation), an episode that begins after the first ``window`` steps (the module was
            below ``threshold`` at the sampled step before) is confirmed after ``confirm`` steps
            instead of a full window: at the default sampling, by the first sampled step that shows
            it, so it is seen 0 to 9 steps after its onset (two samples made that 10 to 19). The
            healthy runs of benchmarks/detection.py stay below 0.4 at every sampled step, so the
            second sample added margin against a one-batch fluke, not against them; with batches of
            a few samples, raise ``confirm`` to 20. The same span below ``threshold`` resolves an
            episode (``resolved_step``).
    """

    severity = "warning"
    requires_activations = True
    defaults: ClassVar[dict[str, Any]] = {
        "threshold": 0.5,
        "window": 30,
        "min_fraction": 0.8,
        "min_samples": 2,
        "confirm": 10,
    }
    kinds = ("relu",)
    stat = "act_dead_fraction"

    def _finding(
        self, ctx: RuleContext, a: int, value: float, first: int, last: int, samples: int, rows: np.ndarray
    ) -> Finding:
        path = ctx.frame.schema.act_modules[a]
        zero = float(nanmedian(ctx.frame.act_values("act_zero_fraction")[rows, a]))
        evidence: dict[str, Any] = {
            "stat": "act_dead_fraction",
            "value": value,
            "threshold": float(self.thresholds["threshold"]),
            "act_zero_fraction": zero,
            "window": [first, last],
            "sampled_steps": samples,
        }
        return self.finding(
            step=first,
            layer=path,
            message=(
                f"Dead units in {layer_label(path)}: {fmt(100 * value)}% of its units output zero for every "
                f"sample of the batch (median over {samples} sampled steps, {steps_label(first, last)}); "
                f"{fmt(100 * zero)}% of all its outputs are zero. Dead units pass no gradient, so they stay dead."
            ),
            suggestion=(
                "Lower the learning rate (a large update often pushes biases far negative), initialize with He "
                "(kaiming) scaling and zero or small positive biases, add BatchNorm/LayerNorm before the "
                "activation, or use LeakyReLU/GELU/SiLU."
            ),
            evidence=evidence,
        )


@register_rule("saturated_activations")
class SaturatedActivations(_ActivationRule):
    """tanh/sigmoid layers with most outputs pinned near their bounds, over a window.

    Definition: on each sampled step, an output of a saturating module (Tanh, Sigmoid, Hardtanh,
    Hardsigmoid) is saturated when its local derivative is below 1% of its maximum (tanh: |y| >
    0.995, i.e. |x| > 3.0; sigmoid: y < 0.0025 or y > 0.9975, i.e. |x| > 6.0; hard variants: at the
    clamp). The rule fires for a module whose saturated fraction (``act_saturated_fraction``, over all
    outputs of the batch) is at least ``threshold`` at the first sampled step of a window of
    ``window`` steps and at ``min_fraction`` of its sampled steps. Output activations (modules after
    which no layer with parameters runs, e.g. the sigmoid of a binary classifier) are not judged: they
    saturate by design once the model is confident, and the loss's own gradient does not pass through
    their flat part.

    Thresholds:
        threshold: 0.5, SageMaker Debugger's SaturatedActivation default (``threshold_layer`` 50 %),
            with a stricter per-output test (the derivative, not SageMaker's |x| > 9.5 for tanh); the
            hidden tanh/sigmoid layers of the healthy runs in benchmarks/detection.py stay below 0.02,
            the saturation faults reach 0.72 to 1.
        window: 30 steps (3 sampled steps at the default ``sample_every=10``); min_fraction: 0.8.
        min_samples: 2 sampled steps, the fewest judged at the last flush (as ``dead_units``).
        confirm: 10 steps (1 sampled step), as ``dead_units``: the hidden tanh/sigmoid layers of the
            healthy runs stay below 0.02 at every sampled step.
    """

    severity = "warning"
    requires_activations = True
    defaults: ClassVar[dict[str, Any]] = {
        "threshold": 0.5,
        "window": 30,
        "min_fraction": 0.8,
        "min_samples": 2,
        "confirm": 10,
    }
    kinds = _SATURATING
    stat = "act_saturated_fraction"
    skip_output = True

    def _finding(
        self, ctx: RuleContext, a: int, value: float, first: int, last: int, samples: int, rows: np.ndarray
    ) -> Finding:
        schema = ctx.frame.schema
        path, kind = schema.act_modules[a], schema.act_kinds[a]
        pinned = float(nanmedian(ctx.frame.act_values("act_dead_fraction")[rows, a]))
        bounds = "+-1" if kind in ("tanh", "hardtanh") else "0 or 1"
        return self.finding(
            step=first,
            layer=path,
            message=(
                f"Saturated activations in {layer_label(path)} ({kind}): {fmt(100 * value)}% of its outputs sit "
                f"at {bounds} where the derivative is below 1% of its peak (median over {samples} sampled steps, "
                f"{steps_label(first, last)}); {fmt(100 * pinned)}% of its units are saturated for every sample. "
                "Little gradient passes through them to earlier layers."
            ),
            suggestion=(
                "Normalize the inputs (zero mean, unit variance), initialize with Xavier/Glorot scaling, add "
                "BatchNorm/LayerNorm before the activation, lower the learning rate, or use ReLU-family "
                "activations in hidden layers."
            ),
            evidence={
                "stat": "act_saturated_fraction",
                "value": value,
                "threshold": float(self.thresholds["threshold"]),
                "act_dead_fraction": pinned,
                "window": [first, last],
                "sampled_steps": samples,
            },
        )
