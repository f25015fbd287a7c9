"""Rules about the size of the gradients: vanishing, exploding and non-finite.

All three read the per-layer gradient ``rms``, the global ``l2_norm`` and ``nonfinite_count``, which
are recorded at every recorded step, so they see every step the optimizer took. Layers are
compared in depth (forward) order; "first in backward order" is the layer nearest the loss.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import (
    fmt,
    frame_rows,
    global_values_many,
    later_max,
    layer_label,
    nanmedian,
    steps_label,
)
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule
from gradscope.rules.window import (
    Episode,
    dtype_info,
    episode_min_rows,
    episode_windows,
    judged_rows,
    persistent_windows,
    steps_to_rows,
    window_rows,
)

if TYPE_CHECKING:
    from gradscope.stats.frame import StatsFrame

__all__ = ["ExplodingGradients", "NonfiniteGradients", "VanishingGradients"]

# log10 of the largest float64: a norm whose square overflowed (finite entries, |g| > ~1e19 in
# float32) is "at least this large" rather than unknown.
_LOG_OVERFLOW = float(np.log10(np.finfo(np.float64).max))


def _check_positive(rule: Rule, *names: str) -> None:
    for name in names:
        v = rule.thresholds[name]
        if not v > 0:
            raise ConfigurationError(f"Expected threshold {name!r} of rule {rule.name!r} to be > 0, but got {v!r}.")


def _check_fraction(rule: Rule, name: str) -> None:
    v = rule.thresholds[name]
    if not 0 < v <= 1:
        raise ConfigurationError(f"Expected threshold {name!r} of rule {rule.name!r} to be in (0, 1], but got {v!r}.")


@register_rule("vanishing_gradients")
class VanishingGradients(Rule):
    """Early layers' gradients collapse relative to the layers after them, and stay collapsed.

    Definition: at each recorded step, each layer's gradient RMS (over all its entries) is divided by
    the largest gradient RMS among the layers after it in forward order. A layer is *collapsed* when
    that ratio is below ``ratio``, or when its RMS is below the smallest normal number of its dtype
    (``torch.finfo(dtype).tiny``: the gradient is underflowing, e.g. float16 without loss scaling).
    A layer is *persistently* collapsed over a window of ``window`` steps when it is collapsed at the
    window's first step and at ``min_fraction`` of its steps. The rule fires when a contiguous block of
    layers starting at the input (layers without a gradient are skipped over) is persistently
    collapsed. The finding names the layer where the collapse begins, walking the backward pass from
    the loss: the last (output-most) layer of that block; every layer before it is collapsed too.

    Because each step's layers are compared with each other, gradients that shrink everywhere as the
    loss falls never fire; because RMS is per entry, layer size does not matter.

    Thresholds:
        ratio: 1e-3. Same order as AUTOTRAINER's first/last-layer gradient-norm ratio (1e-3); over the
            26 healthy runs of benchmarks/detection.py the first layer's ratio stays above 10^-2 (a
            zero-initialised head, whose hidden gradients start at zero), while the vanishing faults
            reach 10^-4.7 to 10^-11.8.
        window: 50 steps; min_fraction: 0.8. Vanishing gradients are a persistent condition; a
            collapse that fades within tens of steps is an initialisation transient: the attention
            query and key of a randomly initialised BERT start at 10^-4.8 of the classifier's gradient
            RMS and are back above 10^-3 by about step 20, while AdamW updates them like every other
            layer (tests/integration/test_hf_models.py). The finding is backdated to the window's first
            step, so the window delays the report, not the finding's step.
        min_steps: 3 recorded steps, the fewest judged at the last flush: at the end of a short run (a
            CI check), and for a collapse that began fewer than ``window`` steps before the end (the
            trailing rows, judged with ``min_fraction`` over the rows since its first step; also what
            ``report()`` shows, as provisional, during a run).
        confirm: 10 steps. At an ordinary flush, a collapse that begins after the first ``window``
            steps (not an initialisation transient; it begins where the layer was not collapsed the
            step before) is confirmed after ``confirm`` steps, ``min_fraction`` of them collapsed,
            instead of a full window. Over the 26 healthy runs of benchmarks/detection.py the first
            layer's ratio never goes below 10^-2 at any step, so no healthy run has a single collapsed
            step for this to confirm; the window is kept for episodes from initialisation, where the
            BERT transient above lives. The same span, with no collapsed step, resolves an episode
            (``resolved_step``).
    """

    severity = "error"
    requires = ("l2_norm",)
    defaults: ClassVar[dict[str, Any]] = {
        "ratio": 1e-3,
        "window": 50,
        "min_fraction": 0.8,
        "min_steps": 3,
        "confirm": 10,
    }

    def validate(self) -> None:
        """Check threshold ranges."""
        _check_positive(self, "ratio", "window", "min_steps", "confirm")
        _check_fraction(self, "min_fraction")
        if self.thresholds["ratio"] >= 1:
            raise ConfigurationError(
                f"Expected threshold 'ratio' of rule 'vanishing_gradients' to be below 1 (a collapse), but got "
                f"{self.thresholds['ratio']!r}."
            )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._first: Finding | None = None  # the finding reported, whose episode is followed
        self._episode: Episode | None = None

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Findings visible in the rows added since the last flush (and their look-back window).

        Once it has fired, it follows the episode of the layer it named (``last_step``,
        ``resolved_step`` once that layer has not been collapsed for ``confirm`` steps).
        """
        th = self.thresholds
        every = ctx.every
        win = steps_to_rows(th["window"], every, minimum=2)
        rows, _ = judged_rows(ctx, win - 1)
        if len(rows) == 0:
            return []
        if len(ctx.forward_order) < 2:
            return []
        values = _depth_rows(ctx, rows)  # each row's values are computed once, at the first call that sees it
        rms, ratio = values["rms"], values["ratio"]
        tiny = _tiny_by_depth(ctx)
        ok_row = ~values["bad"] & np.isfinite(np.where(np.isnan(rms), 0.0, rms)).all(axis=1)
        present = ~np.isnan(rms)
        collapsed = present & ok_row[:, None] & (((ratio < th["ratio"]) & values["ref_pos"]) | (rms < tiny[None, :]))
        steps = ctx.frame.steps[rows]
        names = ctx.layers_by_depth()
        if self._first is not None:
            return self._follow(steps, collapsed, names)
        if not collapsed.any():
            return []  # an episode starts at a collapsed row: none in the window
        min_rows = episode_min_rows(
            steps,
            collapsed,
            final=ctx.final,
            window=win,
            confirm=steps_to_rows(th["confirm"], every, minimum=2),
            minimum=int(th["min_steps"]),
            init_steps=int(th["window"]),
        )
        persistent, lengths = episode_windows(collapsed, win, th["min_fraction"], min_rows)
        if not persistent.any():
            return []
        judged = episode_windows(present, win, 0.5, 1)[0] | persistent  # layers with a gradient in the window
        # Contiguous from the input: a layer not judged in a window is transparent.
        blocks = np.cumprod(persistent | ~judged, axis=1).astype(bool) & persistent
        hit = np.flatnonzero(blocks.any(axis=1))
        if len(hit) == 0:
            return []
        w = int(hit[0])
        length = int(lengths[w])
        block = np.flatnonzero(blocks[w])
        origin, first = int(block[-1]), int(block[0])
        span = slice(w, w + length)
        med = nanmedian(np.where(collapsed[span], ratio[span], np.nan), axis=0)
        first_step, last_step = int(steps[w]), int(steps[w + length - 1])
        later = nanmedian(rms[span], axis=0)[origin + 1 :]
        ref_layer = int(np.nanargmax(later)) + origin + 1 if np.isfinite(later).any() else None
        underflow = bool(nanmedian(rms[span, origin]) < tiny[origin])
        how = (
            f"below the smallest normal number of its dtype ({fmt(tiny[origin])}): it is underflowing"
            if underflow
            else f"{fmt(med[origin])} x the largest gradient RMS after it (threshold {fmt(th['ratio'])})"
        )
        earliest = (
            f" The collapse spans {len(block)} layers; the earliest, {layer_label(names[first])}, is at "
            f"{fmt(med[first])} x."
            if first != origin
            else ""
        )
        held = steps[span][collapsed[span, origin]]
        self._episode = Episode(last=int(held.max()) if len(held) else first_step)
        finding = self.finding(
            step=first_step,
            layer=names[origin],
            message=(
                f"Gradients vanish from layer {layer_label(names[origin])} back to the input: over "
                f"{steps_label(first_step, last_step)} its gradient RMS stayed {how}.{earliest}"
            ),
            suggestion=(
                "Use He (ReLU) or Xavier (tanh) initialization, ReLU-family activations instead of deep "
                "sigmoid/tanh stacks, normalization layers (BatchNorm/LayerNorm) and residual connections; "
                "in float16, scale the loss with torch.amp.GradScaler."
            ),
            evidence={
                "stat": "rms",
                "ratio_to_later_max": {names[i]: float(med[i]) for i in block},
                "reference_layer": names[ref_layer] if ref_layer is not None else None,
                "threshold": float(th["ratio"]),
                "collapsed_layers": [names[i] for i in block],
                "window": [first_step, last_step],
                "dtype_tiny": float(tiny[origin]),
            },
        )
        self._first = finding
        # the rows after the window may already show it clearing (a late report at the last flush)
        self._episode.follow(steps, collapsed[:, origin], int(th["confirm"]))
        return [self._with_episode(finding)]

    def _with_episode(self, finding: Finding) -> Finding:
        ep = self._episode
        assert ep is not None
        return finding.with_episode(ep.last, ep.resolved)

    def _follow(self, steps: np.ndarray, collapsed: np.ndarray, names: list[str]) -> list[Finding]:
        """The episode update of the layer reported, or nothing when it did not change."""
        first, ep = self._first, self._episode
        assert first is not None and ep is not None
        if first.layer not in names:
            return []
        flags = collapsed[:, names.index(first.layer)]
        if not ep.follow(steps, flags, int(self.thresholds["confirm"])):
            return []
        return [self._with_episode(first)]


@functools.lru_cache(maxsize=64)
def _lookback_index(n: int, width: int) -> np.ndarray:
    """``[n, width]`` indices: row ``k`` reads the ``width`` entries before entry ``k`` of an array padded with ``width`` in front."""
    index = np.arange(n)[:, None] + np.arange(width)[None, :]
    index.setflags(write=False)
    return index


def _pow10(x: float) -> float:
    """``10 ** x`` that saturates at inf instead of raising OverflowError."""
    with np.errstate(over="ignore"):
        return float(np.power(10.0, x))


def _log_global(norm: np.ndarray, nonfinite: np.ndarray) -> np.ndarray:
    """log10 of the global gradient L2 norm ``norm [R]``; NaN for rows holding non-finite gradients (``[R, L]``)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.log10(norm)
    out = np.where(np.isinf(out) & (out > 0), _LOG_OVERFLOW, out)
    return np.where(nonfinite.sum(axis=1) > 0, np.nan, out)


def _grad_rows(ctx: RuleContext, rows: np.ndarray, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Per-row gradient values at ``rows``, computed once per row for all the gradient rules (cached per frame).

    Args:
        ctx: the rule context (its frame and forward order).
        rows: frame rows ``[R]``.
        names: the values wanted (all when None).

    Returns:
        ``rms [R, L]`` and ``nonfinite [R, L]`` in forward order (see :func:`_layer_rms_in_layer_order`); ``bad [R]``:
        the row holds a non-finite gradient; ``lg [R]``: :func:`_log_global` of the global L2 norm
        (NaN on bad rows); ``ratio [R, L]``: each layer's RMS over the largest RMS after it in forward
        order, ``ref_pos [R, L]``: that largest RMS is > 0; with ``param_norm`` collected, ``relative
        [R]`` (global gradient norm / global weight norm, NaN on rows not sampled) and
        ``relative_finite [R]`` (no NaN/Inf counted).
    """
    frame = ctx.frame
    order = list(ctx.forward_order)

    def compute(at: np.ndarray) -> dict[str, np.ndarray]:
        rms, nonfinite = _layer_rms_in_layer_order(frame, at)
        rms, nonfinite = rms[:, order], nonfinite[:, order]
        stats = frame.schema.stats
        wanted = ["l2_norm", *(s for s in ("param_norm", "nonfinite_count") if s in stats)]
        model = global_values_many(frame, wanted, at)
        ref = later_max(rms)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = rms / ref
        out: dict[str, np.ndarray] = {
            "rms": rms,
            "nonfinite": nonfinite,
            "bad": np.asarray((nonfinite > 0).any(axis=1)),
            "lg": _log_global(model["l2_norm"], nonfinite),
            "ratio": ratio,
            "ref_pos": np.asarray(ref > 0),
        }
        if "param_norm" in model:  # the "above the weights" test (sampled rows; NaN on the others)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["relative"] = model["l2_norm"] / model["param_norm"]
            finite = np.ones(len(at), dtype=bool)
            if "nonfinite_count" in model:
                count = model["nonfinite_count"]
                finite = np.asarray((count == 0) | np.isnan(count))  # a NaN count is no count
            out["relative_finite"] = finite
        return out

    # keyed by the forward order: it may still change while modules are first seen
    return frame_rows(frame).get(frame, ("gradients", tuple(order)), compute, rows, names)


def _layer_rms_in_layer_order(frame: StatsFrame, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient RMS and non-finite count of every layer at ``rows``, in the frame's layer order, ``[R, L]`` each.

    As :func:`~gradscope.rules._common.layer_rms_by_depth`, except that without ``nonfinite_count``
    collected (``stats=["l2_norm"]``), where a layer's non-finite count is inferred from its RMS (NaN
    both for a NaN gradient and for no gradient at all), a layer that had no gradient at a row (an
    unused head, a branch skipped that step) counts 0 there, so it neither hides its row from the
    vanishing/exploding rules nor reads as NaN.
    """
    if "nonfinite_count" in frame.schema.stats:
        values = frame.layer_values_many(["rms", "nonfinite_count"], rows)
        rms, nonfinite = values["rms"], values["nonfinite_count"]
        return rms, np.where(np.isnan(nonfinite), 0.0, nonfinite)  # counts: never infinite
    rms = frame.layer_values("rms", rows)
    nonfinite = np.where(np.isfinite(rms), 0.0, 1.0)
    if not len(rows):
        return rms, nonfinite
    had = frame.schema.layer_groups.any(frame.has_grad[rows])  # no gradient at all: not non-finite
    return rms, np.where(had, nonfinite, 0.0)


def _depth_rows(ctx: RuleContext, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The :func:`_grad_rows` values the depth tests read."""
    return _grad_rows(ctx, rows, ("rms", "nonfinite", "bad", "ratio", "ref_pos"))


def _tiny_by_depth(ctx: RuleContext) -> np.ndarray:
    """:func:`~gradscope.rules.window.dtype_info`'s smallest normal number per layer, in forward order."""
    schema = ctx.frame.schema
    tiny = frame_rows(ctx.frame).const("dtype_tiny", lambda: dtype_info(schema)[0])
    return tiny[list(ctx.forward_order)]


def _relative_rows(ctx: RuleContext, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Global gradient norm / global weight norm at ``rows`` (``ratio [R]``), and ``finite [R]``: no NaN/Inf counted.

    Needs ``param_norm`` collected.
    """
    values = _grad_rows(ctx, rows, ("relative", "relative_finite"))
    return {"ratio": values["relative"], "finite": values["relative_finite"]}


@register_rule("exploding_gradients")
class ExplodingGradients(Rule):
    """Gradient norms run away: growing without bound, far above the warm-up, above the weights, or with depth.

    Definition (any of four, on steps the optimizer took; rows holding NaN/Inf are left to
    ``nonfinite_gradients``):

    * *runaway*: within ``window`` steps the global gradient L2 norm grows at least ``growth``-fold
      from its lowest point, rising at ``min_rising`` of the steps in between, and ends at least
      ``growth`` times above the warm-up level (the median over the first ``warmup`` judged steps;
      for a growth that starts within the warm-up, its own starting level).
    * *far above warm-up*: the global norm is at least ``above`` times the warm-up level at the first
      step of a ``window``-step window and at ``min_fraction`` of its steps.
    * *above the weights*: on sampled steps (needs ``param_norm``), the global gradient norm is at
      least ``relative`` times the global weight norm at ``relative_samples`` sampled steps in a row:
      a step of any sane learning rate would then rewrite the weights. This catches runs that explode
      from the first step, whose warm-up is already exploded.
    * *depth*: a contiguous block of layers from the input has a gradient RMS at least ``ratio`` times
      the largest RMS among the layers after it, persistently (mirror of vanishing gradients).

    The finding names where the explosion starts: the layer whose gradient RMS most exceeds every
    layer after it (nearer the loss), i.e. where the backward pass amplifies it; when no layer exceeds
    the layers after it, the layer nearest the loss (the explosion enters from the loss). Steps that
    GradScaler skipped are never judged, so a loss-scale overflow is not an explosion.

    Thresholds:
        growth: 100 within 10 steps; above: 1000. Over the 26 healthy runs of benchmarks/detection.py
            the global norm grows at most 10^2.2 within 10 steps (an LSTM recovering from a dip, still
            below its warm-up level) and drifts at most 10^1.9 above its warm-up level (a GPT whose
            learning rate warms up over 200 steps); the exploding faults grow 10^6.7 to 10^17 within
            10 steps and reach 10^4.9 to 10^18 above their warm-up (except an RNN exploded from its
            first step, which ``relative`` catches).
        relative: 10, relative_samples: 3. Healthy runs keep the global gradient norm below 10^-0.2
            of the weight norm; faults that explode from the first step reach 10^1.7 to 10^2.7 and
            stay there (three sampled steps: a regression whose gradient falls back as it fits is
            spared).
        ratio: 1e3, the mirror of ``vanishing_gradients``' 1e-3 (AUTOTRAINER uses 70 on first/last
            layer L2 norms; RMS per entry keeps a wider margin for small input layers).
        window: 10 steps; warmup: 10 steps; min_fraction: 0.6; min_rising: 0.7 (our choice: a
            divergence must be caught before it reaches NaN, typically 5 to 30 steps after it starts).
            The window is short enough to confirm a mid-run explosion within 10 steps, so there is no
            separate ``confirm``. An episode is resolved once the criterion that fired has not held
            for ``window`` steps (rows holding NaN/Inf count as still exploded).
        min_steps: 3, the fewest steps the persistence tests (*far above warm-up*, *depth*) judge at
            the last flush: at the end of a short run, and over the trailing rows of a long one.
    """

    severity = "error"
    requires = ("l2_norm",)
    defaults: ClassVar[dict[str, Any]] = {
        "growth": 100.0,
        "above": 1000.0,
        "relative": 10.0,
        "relative_samples": 3,
        "ratio": 1e3,
        "window": 10,
        "warmup": 10,
        "min_fraction": 0.6,
        "min_rising": 0.7,
        "min_steps": 3,
    }

    def validate(self) -> None:
        """Check threshold ranges."""
        _check_positive(self, "window", "warmup", "min_steps", "relative", "relative_samples")
        _check_fraction(self, "min_fraction")
        _check_fraction(self, "min_rising")
        for name in ("growth", "above", "ratio"):
            if not self.thresholds[name] > 1:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule 'exploding_gradients' to be above 1, but got "
                    f"{self.thresholds[name]!r}."
                )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._first: Finding | None = None  # the finding reported, whose episode is followed
        self._episode: Episode | None = None
        self._criterion: tuple[str, float, str | None] = ("", 0.0, None)  # (criterion, level, layer) followed
        self._w0: float | None = None

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Findings visible in the rows added since the last flush (and their look-back window).

        Once it has fired, it follows the episode (``last_step``; ``resolved_step`` once the criterion
        that fired has not held for ``window`` steps).
        """
        if self._first is not None:
            return self._follow(ctx)
        th = self.thresholds
        every = ctx.every
        win = steps_to_rows(th["window"], every, minimum=2)
        warm_rows = steps_to_rows(th["warmup"], every, minimum=1)
        valid = np.flatnonzero(~ctx.frame.skipped)
        # look back over a window, the warm-up, and the sampled rows the "above the weights" test needs
        sample_every = ctx.sample_every
        rel_rows = steps_to_rows((int(th["relative_samples"]) - 1) * sample_every, every, minimum=0) + 1
        rows, _ = judged_rows(ctx, max(win, warm_rows, rel_rows) - 1)
        length = window_rows(len(rows), win, final=ctx.final, minimum=int(th["min_steps"]))
        if length == 0:
            return []
        # each row's values are computed once, at the first call that sees it
        values = _grad_rows(ctx, rows, ("rms", "nonfinite", "bad", "lg", "ratio", "ref_pos"))
        lg = values["lg"]
        pos = np.searchsorted(valid, rows)  # position of each judged row among all judged rows of the run
        # The warm-up level, measured once from full-resolution rows (a bounded frame thins old rows later).
        w0 = self._w0
        if w0 is None:
            w0, complete = self._warmup_level(ctx, valid, warm_rows)
            if complete:
                self._w0 = w0
        g = float(np.log10(th["growth"]))
        # a full window at ordinary flushes; at the last one, the trailing rows too (min_steps of them)
        min_rows = min(int(th["min_steps"]), win) if ctx.final else win
        found: list[tuple[int, int, str, dict[str, Any]]] = []  # (start row, end row, criterion, details)
        if w0 is not None:
            above = lg - w0 >= np.log10(th["above"])  # NaN rows (non-finite) compare False
            if above.any():  # a window starts at a row above the level: none, no episode
                pers, lengths = episode_windows(above, win, th["min_fraction"], min_rows)
                if pers.any():
                    i = int(np.argmax(pers))
                    found.append((i, i + int(lengths[i]) - 1, "warmup", {"reference": w0}))
        run = self._runaway(lg, pos, length, g, th["min_rising"], w0, warm_rows)
        if run is not None:
            found.append(run)
        rel = self._relative(ctx, rows, th)
        if rel is not None:
            found.append(rel)
        depth = self._depth(values, win, min_rows, th)
        if depth is not None:
            found.append(depth)
        if not found:
            return []
        rms, nonfinite, names = values["rms"], values["nonfinite"], ctx.layers_by_depth()
        # the earliest episode; at the same step, the criterion that says most about the dynamics
        priority = {"runaway": 0, "warmup": 1, "depth": 2, "relative": 3}
        start, end, how, info = min(found, key=lambda f: (f[0], priority[f[2]]))
        steps = ctx.frame.steps[rows]
        first_step, last_step = int(steps[start]), int(steps[end])
        span = slice(start, end + 1)
        origin, amp = _amplifier(rms[span], nonfinite[span])
        where = (
            f"it starts in layer {layer_label(names[origin])}, whose gradient RMS is {fmt(_pow10(amp))} x that of "
            "every layer after it"
            if amp > 0
            else f"no layer amplifies it, so it enters from the loss at layer {layer_label(names[origin])}"
        )
        if how == "depth":
            message = (
                f"Gradients explode with depth: over {steps_label(first_step, last_step)} the gradient RMS of the "
                f"{len(info['block'])} earliest layer(s) stayed above {fmt(th['ratio'])} x the largest after them "
                f"({', '.join(f'{layer_label(names[i])}: {fmt(v)} x' for i, v in info['ratios'].items())}); {where}."
            )
            evidence: dict[str, Any] = {
                "stat": "rms",
                "criterion": how,
                "ratio_to_later_max": {names[i]: v for i, v in info["ratios"].items()},
                "threshold": float(th["ratio"]),
            }
        elif how == "relative":
            message = (
                f"Gradients explode: at sampled {steps_label(first_step, last_step)} the global gradient norm was "
                f"{fmt(info['ratio'])} x the global weight norm (threshold {fmt(th['relative'])} x), so each update "
                f"can rewrite the weights entirely; {where}."
            )
            evidence = {
                "stat": "l2_norm / param_norm",
                "criterion": how,
                "ratio": info["ratio"],
                "threshold": float(th["relative"]),
            }
        else:
            peak = float(np.nanmax(lg[span]))
            ref = info["reference"]
            what = (
                f"grew {fmt(_pow10(peak - info['low']))} x over {steps_label(first_step, last_step)}"
                if how == "runaway"
                else f"stayed above {fmt(th['above'])} x its warm-up level over {steps_label(first_step, last_step)}"
            )
            message = (
                f"Gradients explode: the global gradient norm {what}, reaching {fmt(_pow10(peak))} against a "
                f"warm-up level of {fmt(_pow10(ref))} ({fmt(_pow10(peak - ref))} x); {where}."
            )
            evidence = {
                "stat": "l2_norm",
                "criterion": how,
                "warmup_norm": _pow10(ref),
                "peak_norm": _pow10(peak),
                "growth": _pow10(peak - ref),
                "threshold": float(th["growth"] if how == "runaway" else th["above"]),
            }
        evidence["window"] = [first_step, last_step]
        evidence["amplification"] = _pow10(amp)
        finding = self.finding(
            step=first_step,
            layer=names[origin],
            message=message,
            suggestion=(
                "Lower the learning rate (or add warm-up), clip gradients (torch.nn.utils.clip_grad_norm_), "
                "add normalization (BatchNorm/LayerNorm) and initialize weights with He/Xavier scaling; for "
                "recurrent networks keep the recurrent weights' spectral radius below 1 and clip."
            ),
            evidence=evidence,
        )
        if how == "depth":
            self._criterion = (how, float(th["ratio"]), names[int(info["block"][0])])
        elif how == "relative":
            self._criterion = (how, float(th["relative"]), None)
        else:
            level = info["reference"] + (g if how == "runaway" else float(np.log10(th["above"])))
            self._criterion = (how, level, None)
        self._first = finding
        self._episode = Episode(last=first_step)
        self._follow(ctx)
        return [finding.with_episode(self._episode.last, self._episode.resolved)]

    def _follow(self, ctx: RuleContext) -> list[Finding]:
        """The episode update of the finding reported, or nothing when it did not change.

        The criterion that fired is followed: the global norm above the level it crossed (runaway:
        ``growth`` x its reference; warm-up: ``above`` x the warm-up level), the first layer of the
        depth block above ``ratio`` x the layers after it, or the gradient norm above ``relative`` x the
        weight norm on sampled steps. Rows holding NaN/Inf count as still exploded.
        """
        first, ep = self._first, self._episode
        assert first is not None and ep is not None
        th = self.thresholds
        how, level, layer = self._criterion
        win = steps_to_rows(th["window"], ctx.every, minimum=2)
        if how == "relative":
            rows, _ = judged_rows(ctx, 0, sampled=True)
            if len(rows) == 0:
                return []
            flags = ~(_relative_rows(ctx, rows)["ratio"] < level)  # a NaN ratio counts as still exploded
        else:
            rows, _ = judged_rows(ctx, win - 1)
            if len(rows) == 0:
                return []
            if how == "depth":
                names = ctx.layers_by_depth()
                if layer not in names:
                    return []
                values = _depth_rows(ctx, rows)
                ratio = values["ratio"][:, names.index(layer)]
                flags = values["bad"] | (ratio >= level)  # a NaN ratio (no gradient) is not above
            else:
                values = _grad_rows(ctx, rows, ("bad", "lg"))
                flags = values["bad"] | (values["lg"] >= level)
        if not ep.follow(ctx.frame.steps[rows], flags, int(th["window"])):
            return []
        return [first.with_episode(ep.last, ep.resolved)]

    @staticmethod
    def _warmup_level(ctx: RuleContext, valid: np.ndarray, n_rows: int) -> tuple[float | None, bool]:
        """Median log10 global norm over the first ``n_rows`` judged finite rows, and whether it is final.

        Final once ``n_rows`` finite rows were found, or once the look-ahead is exhausted (a run that
        went non-finite within its warm-up keeps the few finite rows it had).
        """
        span = max(4 * n_rows, n_rows + 8)
        head = valid[:span]
        if len(head) == 0:
            return None, False
        lg = _grad_rows(ctx, head, ("lg",))["lg"]
        ok = np.flatnonzero(np.isfinite(lg))[:n_rows]
        complete = len(ok) >= n_rows or len(head) >= span
        return (float(np.median(lg[ok])) if len(ok) else None), complete

    @staticmethod
    def _runaway(
        lg: np.ndarray, pos: np.ndarray, length: int, g: float, min_rising: float, w0: float | None, warm_rows: int
    ) -> tuple[int, int, str, dict[str, Any]] | None:
        """A growth of ``g`` decades within ``length`` rows, mostly rising, far above the warm-up level.

        The start is the first row after the last one still near (within 2x of) the lowest level
        before the peak, so the finding's step is where the growth began, not an earlier dip of noise.
        """
        fin = np.isfinite(lg)
        if length < 2 or len(lg) < 2:
            return None
        # The lowest finite level of the `length - 1` rows before each row, in one pass; only the rows
        # that far above it can start an episode, and the test below is the same for them.
        padded = np.concatenate([np.full(length - 1, np.inf), np.where(fin, lg, np.inf)])
        lows = padded[_lookback_index(len(lg), length - 1)].min(axis=1)
        with np.errstate(invalid="ignore"):
            candidates = np.flatnonzero(fin & (lg - lows >= g))
        for k in candidates[candidates >= 1].tolist():
            lo = max(0, k - length + 1)
            seg = np.where(fin[lo:k], lg[lo:k], np.inf)
            low = float(seg.min())
            i = lo + int(np.flatnonzero(seg <= low + np.log10(2.0))[-1])
            ref = w0 if (w0 is not None and pos[i] >= warm_rows) else float(lg[i])
            if lg[k] - ref < g:
                continue
            vals = lg[i : k + 1][fin[i : k + 1]]
            if (np.diff(vals) > 0).mean() >= min_rising:
                start = min(i + 1, k)
                end = max(k, min(start + length - 1, len(lg) - 1))  # the episode's window, for its peak
                return (start, end, "runaway", {"reference": ref, "low": float(lg[i])})
        return None

    @staticmethod
    def _relative(
        ctx: RuleContext, rows: np.ndarray, th: dict[str, Any]
    ) -> tuple[int, int, str, dict[str, Any]] | None:
        """``relative_samples`` sampled rows in a row whose global gradient norm is ``relative`` x the weight norm.

        Returns positions in ``rows`` (the episode's first and last sampled rows), or None.
        """
        if "param_norm" not in ctx.frame.schema.stats:
            return None
        n = int(th["relative_samples"])
        srows, _ = judged_rows(ctx, n - 1, sampled=True)  # its own look-back: n - 1 earlier sampled rows
        if len(srows) < n:
            return None
        values = _relative_rows(ctx, srows)
        ratio = values["ratio"]
        ok = np.isfinite(ratio) & values["finite"]
        above = ok & (ratio >= th["relative"])
        if not above.any():
            return None
        runs = persistent_windows(above, n, 1.0)
        if not runs.any():
            return None
        j = int(np.argmax(runs))
        first, last = srows[j], srows[j + n - 1]
        if first < rows[0]:
            return None  # began before this flush's rows: the judged window would not contain it
        start, end = int(np.searchsorted(rows, first)), int(np.searchsorted(rows, last))
        return (start, end, "relative", {"ratio": float(np.min(ratio[j : j + n]))})

    @staticmethod
    def _depth(
        values: dict[str, np.ndarray], window: int, min_rows: int, th: dict[str, Any]
    ) -> tuple[int, int, str, dict[str, Any]] | None:
        """A block of layers from the input ``ratio`` x above the layers after them, persistently.

        ``values`` are those of :func:`_depth_rows` at the judged rows.
        """
        rms, ratio = values["rms"], values["ratio"]
        if rms.shape[1] < 2:
            return None
        present = ~np.isnan(rms)
        big = present & ~values["bad"][:, None] & values["ref_pos"] & (ratio >= th["ratio"])  # NaN: False
        if not big.any():
            return None  # an episode starts at a row where a layer is above: none in the window
        persistent, lengths = episode_windows(big, window, th["min_fraction"], min_rows)
        if not persistent.any():
            return None
        judged = episode_windows(present, window, 0.5, 1)[0] | persistent
        blocks = np.cumprod(persistent | ~judged, axis=1).astype(bool) & persistent
        hit = np.flatnonzero(blocks.any(axis=1))
        if len(hit) == 0:
            return None
        w = int(hit[0])
        length = int(lengths[w])
        block = np.flatnonzero(blocks[w])
        med = nanmedian(np.where(big[w : w + length], ratio[w : w + length], np.nan), axis=0)
        return (w, w + length - 1, "depth", {"block": block, "ratios": {int(i): float(med[i]) for i in block}})


def _amplifier(rms: np.ndarray, nonfinite: np.ndarray) -> tuple[int, float]:
    """The layer whose gradient RMS most exceeds every layer after it, and by how much (log10).

    Args:
        rms: ``[R, L]`` gradient RMS in forward order over the rows of an episode.
        nonfinite: ``[R, L]`` non-finite counts (rows holding any are left out).

    Returns:
        ``(layer index, log10 excess)``; when no layer exceeds the layers after it (excess <= 0), the
        last layer with a gradient (nearest the loss) and the best excess found.
    """
    ok = nonfinite.sum(axis=1) == 0
    r = rms[ok] if ok.any() else rms
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = np.log10(r) - np.log10(later_max(r))
    med = nanmedian(np.where(np.isfinite(excess), excess, np.nan), axis=0) if r.shape[0] else excess
    present = np.flatnonzero(~np.isnan(r).all(axis=0)) if r.shape[0] else np.arange(rms.shape[1])
    last = int(present[-1]) if len(present) else rms.shape[1] - 1
    if not np.isfinite(med).any():
        return last, 0.0
    best = int(np.nanargmax(med))
    if med[best] > 0:
        return best, float(med[best])
    return last, float(med[best])


@register_rule("nonfinite_gradients")
class NonfiniteGradients(Rule):
    """NaN or Inf in any gradient: fires at once, as an error.

    Definition: the first step the optimizer took (GradScaler-skipped steps excluded) at which any
    layer's gradient holds a NaN or Inf entry (``nonfinite_count > 0``). The finding names the first
    such layer in backward order (nearest the loss): the non-finite value entered the backward pass
    there or just after it in the forward graph. It also says whether the loss recorded at that step
    was itself non-finite: if so, the forward pass or the loss produced it (log(0), division by zero,
    overflow), otherwise an operation inside the backward pass did (sqrt or log at 0, 0/0). One finding
    per run: once NaN reaches the weights every later step is non-finite too. With
    ``watch(..., on_nonfinite="raise")`` this finding is the message of the
    :class:`gradscope.NonFiniteGradientError` raised at that step.

    Thresholds: none (no persistence: a single non-finite gradient corrupts the weights it updates;
    peers agree, e.g. SageMaker Debugger's ExplodingTensor and torch's anomaly mode).
    """

    severity = "error"
    requires = ("nonfinite_count",)
    defaults: ClassVar[dict[str, Any]] = {}

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._fired = False

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Findings visible in the rows added since the last flush (and their look-back window)."""
        if self._fired:
            return []
        rows, _ = judged_rows(ctx, 0)
        if len(rows) == 0:
            return []
        values = _grad_rows(ctx, rows, ("bad", "nonfinite"))  # each row's values are computed once
        bad_rows = np.flatnonzero(values["bad"])
        if len(bad_rows) == 0:
            return []
        nonfinite, names = values["nonfinite"], ctx.layers_by_depth()
        r = int(bad_rows[0])
        bad = np.flatnonzero(nonfinite[r] > 0)
        origin = int(bad[-1])  # forward order: the last one is the first in backward order
        row = int(rows[r])
        step = int(ctx.frame.steps[row])
        self._fired = True
        counts = {names[i]: int(nonfinite[r, i]) for i in bad[::-1]}
        if "loss" in ctx.frame.scalar_names:
            loss = float(ctx.frame.scalar("loss")[row])
            loss_finite: bool | None = bool(np.isfinite(loss))
        else:
            loss, loss_finite = float("nan"), None
        where = (
            f"{len(bad)} of {len(names)} layers hold NaN/Inf"
            + (f" ({', '.join(layer_label(k) for k in list(counts)[:4])}{', ...' if len(counts) > 4 else ''})")
            if len(bad) > 1
            else "only this layer holds NaN/Inf"
        )
        if loss_finite is False:
            cause = (
                f"The loss recorded at that step was itself non-finite ({fmt(loss)}), so the NaN/Inf came from the "
                "forward pass or the loss, not from the backward pass."
            )
            suggestion = (
                "Check the loss for log(0) or division by zero: use F.cross_entropy / log_softmax instead of "
                "log(softmax(...)), clamp probabilities or add an epsilon, check the inputs and labels for NaN/Inf, "
                "and lower the learning rate if the logits grew until they overflowed."
            )
        elif loss_finite:
            cause = (
                f"The loss was finite ({fmt(loss)}), so an operation at or just after {layer_label(names[origin])} "
                "produced it in the backward pass."
            )
            suggestion = (
                f"Look at {layer_label(names[origin])} and the operations that use its output for a derivative that "
                "is infinite at some input (sqrt or log at 0, division by a value near 0, pow with a negative "
                "exponent) and add an epsilon or clamp; run one step under torch.autograd.detect_anomaly() for "
                "the traceback; lower the learning rate or clip gradients if values overflowed."
            )
        else:
            cause = "The loss was not recorded (pass scope.step(loss=loss) to tell forward from backward NaNs)."
            suggestion = (
                "Check the loss for log(0) or division by zero, then run one step under "
                "torch.autograd.detect_anomaly() to find the operation that produced NaN/Inf."
            )
        # on the multi-tensor path a count may be 1 per tensor holding NaN/Inf (a flag), not entries
        amount = f" ({counts[names[origin]]} values)" if ctx.nonfinite_counted else ""
        return [
            self.finding(
                step=step,
                layer=names[origin],
                message=(
                    f"Non-finite gradient at step {step}: the first layer in backward order holding NaN/Inf is "
                    f"{layer_label(names[origin])}{amount}; {where}. {cause}"
                ),
                suggestion=suggestion,
                evidence={
                    "stat": "nonfinite_count",
                    "counts": counts,
                    "counted": ctx.nonfinite_counted,
                    "loss": loss,
                    "loss_finite": loss_finite,
                    "backward_order": [names[i] for i in bad[::-1]],
                },
            )
        ]
