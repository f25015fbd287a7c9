"""A jump of the training loss far above its recent trend, traced to the layers whose gradients rose with it.

The trend and the noise are measured from the curve itself (a median, and the median absolute deviation of
its step-to-step changes), so a noisy mini-batch loss does not fire and a spike is judged against what this
run's loss normally does, not against a fixed factor. A declared change of phase (``scope.step(...,
phase=k)``: a curriculum stage, a restart, a new dataset) starts a new trend.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import fmt, layer_label, nanmedian
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule

__all__ = ["PHASE_SCALAR", "LossSpike"]

#: The scalar that declares a phase: ``scope.step(loss=loss, phase=2)``. A change of its value restarts
#: the loss trend, so a curriculum stage or a warm restart is never a spike.
PHASE_SCALAR = "phase"

# MAD of a normal sample x 1.4826 estimates its standard deviation; a first difference of white noise has
# standard deviation sigma * sqrt(2).
_MAD_TO_SIGMA = 1.4826


def _held(values: np.ndarray) -> np.ndarray:
    """``values`` with each NaN replaced by the last value before it: a phase holds until the next one."""
    idx = np.where(np.isfinite(values), np.arange(len(values)), 0)
    np.maximum.accumulate(idx, out=idx)
    held = values[idx]
    held[: int(np.argmax(np.isfinite(values))) if np.isfinite(values).any() else len(values)] = np.nan
    return held


def _step_noise(values: np.ndarray) -> float:
    """Per-step noise of a curve from its first differences (robust to a trend and to outliers)."""
    d = np.diff(values)
    if len(d) < 2:
        return 0.0
    return float(_MAD_TO_SIGMA * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


@register_rule("loss_spike")
class LossSpike(Rule):
    """The training loss jumps far above its recent robust trend; the finding names the layers behind it.

    Definition: for each recorded, finite training loss ``L[t]``, the trend ``m`` is the median of the
    previous ``window`` losses of the same phase (spikes already found left out) and ``s`` their per-step
    noise (1.4826 x the median absolute deviation of their first differences / sqrt(2)). ``L[t]`` is a
    spike when ``L[t] > m + z * s``, ``L[t] > m + rise * |m|`` and ``L[t] - m > undo * (L0 - m)`` (``L0``:
    the median magnitude of the run's first ``min_history`` losses): far outside the noise, a real change of
    the loss, and material on the scale of the run: it undoes at least ``undo`` of the progress made since
    the start (a converged loss of 0.009 that reads 0.15 on one batch, out of 1.3 at the start, undoes 11 %:
    not a finding, however many of its own tiny noise units that is). It needs ``min_history`` losses of history in the phase.

    The layers: each layer's gradient RMS in the ``lookback`` steps up to the spike is divided by its
    median over the trend window. The finding's layer is the one whose RMS first rose ``grad_rise``-fold
    (ties: the largest rise), and the evidence lists the layers with the largest rises (the embedding, the
    last layer, one attention block...). A spike whose gradients did not rise anywhere (the loss jumped
    but the gradients did not, e.g. a batch of shuffled labels seen late) is reported at the model
    (layer None) with the rises measured.

    Recovery: the spike's episode ends at the first step whose loss is back within ``z`` noise units or
    ``rise / 2`` of the trend (``resolved_step``); until then the message says it has not recovered.

    Thresholds:
        window: 50 steps of trend; min_history: 20; z: 10 noise units; rise: 0.1 (10 % above the
            trend); undo: 0.2 (a fifth of the progress since the start); grad_rise: 3 (a layer's gradient RMS 3x its
            median); lookback: 5 steps. Chosen so that the healthy runs of benchmarks/detection.py and
            benchmarks/lr_detection.py (mini-batch noise, learning-rate warm-up and decay, restarts
            declared with ``phase=``, losses that converge to 1e-3) stay silent while a batch of shuffled
            labels, inputs scaled 100x and a 100x learning-rate pulse injected mid-run are found at their
            step (our measurements). A fixed factor (e.g. "2x the previous loss") cannot tell a noisy early
            run from a spike in a converged one.
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {
        "window": 50,
        "min_history": 20,
        "z": 10.0,
        "rise": 0.1,
        "grad_rise": 3.0,
        "lookback": 5,
        "undo": 0.2,
    }

    def validate(self) -> None:
        """Check threshold ranges."""
        th = self.thresholds
        for name in ("window", "min_history", "z", "rise", "grad_rise", "lookback"):
            if not th[name] > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule 'loss_spike' to be > 0, but got {th[name]!r}."
                )
        if th["min_history"] > th["window"]:
            raise ConfigurationError(
                f"Threshold 'min_history' ({th['min_history']}) of rule 'loss_spike' must not exceed "
                f"'window' ({th['window']}): the trend is the median of at most `window` losses."
            )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._judged_step = 0  # the last step whose loss was judged
        self._spike_steps: set[int] = set()  # steps found as spikes (left out of later trends)
        self._open: list[tuple[Finding, float, float]] = []  # spikes not recovered yet: (finding, trend, noise)
        self._run_scale: float | None = None  # median |loss| of the run's first losses

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Spikes among the losses recorded since the last judgement, and the recovery of open ones."""
        frame = ctx.frame
        if "loss" not in frame.scalar_names:
            return []
        th = self.thresholds
        loss = frame.scalar("loss")
        steps = frame.steps
        ok = ~frame.skipped & np.isfinite(loss)
        phase = _held(frame.scalar(PHASE_SCALAR)) if PHASE_SCALAR in frame.scalar_names else None
        out: list[Finding] = []
        rows = np.flatnonzero(ok & (steps > self._judged_step))
        window, need = int(th["window"]), int(th["min_history"])
        valid = np.flatnonzero(ok)
        for r in rows:
            step = int(steps[r])
            self._judged_step = step
            out.extend(self._recoveries(step, float(loss[r])))
            pos = int(np.searchsorted(valid, r))
            history = valid[max(0, pos - window - len(self._spike_steps)) : pos]
            history = history[[int(steps[h]) not in self._spike_steps for h in history]][-window:]
            if phase is not None:
                # a declared phase change starts a new trend: only the history of the current phase counts
                same = (phase[history] == phase[r]) | (np.isnan(phase[history]) & np.isnan(phase[r]))
                history = history[same]
            if len(history) < need:
                continue
            past = loss[history]
            trend = float(np.median(past))
            noise = _step_noise(past)
            value = float(loss[r])
            # ... and a material jump on the scale of the run: it undoes a part of the progress made since the
            # start (a converged loss of 0.009 that reads 0.15 on one batch, out of 1.3 at the start, is not a
            # spike worth a finding, however many of its own tiny noise units that is)
            scale = self._scale(loss, valid)
            if not (
                value > trend + th["z"] * noise
                and value > trend + th["rise"] * abs(trend)
                and value - trend > th["undo"] * max(scale - trend, 0.0)
            ):
                continue
            self._spike_steps.add(step)
            if any(f.step == step for f, _, _ in self._open):
                continue
            finding = self._finding(ctx, int(r), history, value, trend, noise)
            self._open.append((finding, trend, noise))
            out.append(finding)
        return out

    def _scale(self, loss: np.ndarray, valid: np.ndarray) -> float:
        """The loss's scale: the median magnitude of the run's first ``min_history`` losses (measured once)."""
        if self._run_scale is None:
            self._run_scale = float(np.median(np.abs(loss[valid[: int(self.thresholds["min_history"])]])))
        return self._run_scale

    def _recoveries(self, step: int, value: float) -> list[Finding]:
        """Episode updates: open spikes whose loss is back near its trend at ``step``, or still high."""
        th = self.thresholds
        updates: list[Finding] = []
        still: list[tuple[Finding, float, float]] = []
        for finding, trend, noise in self._open:
            if step <= finding.step:
                still.append((finding, trend, noise))
                continue
            back = value <= trend + max(th["z"] * noise, 0.5 * th["rise"] * abs(trend))
            if back:
                updates.append(_with_episode(finding, last=step - 1, resolved=step))
            else:
                still.append((finding, trend, noise))
                updates.append(_with_episode(finding, last=step, resolved=None))
        self._open = still
        return updates

    def _finding(
        self, ctx: RuleContext, row: int, history: np.ndarray, value: float, trend: float, noise: float
    ) -> Finding:
        th = self.thresholds
        frame = ctx.frame
        step = int(frame.steps[row])
        names = frame.schema.layers
        lookback = int(th["lookback"])
        order = np.asarray(ctx.forward_order, dtype=int)
        rises: dict[str, float] = {}
        origin: str | None = None
        first_rise_step: int | None = None
        if len(order) and "rms" in frame.schema.stats:
            recent = np.arange(max(0, row - lookback), row + 1)
            recent = recent[~frame.skipped[recent]]
            base = frame.layer_values("rms", history)[:, order]
            now = frame.layer_values("rms", recent)[:, order]
            with np.errstate(divide="ignore", invalid="ignore"):
                median = nanmedian(np.where(np.isfinite(base), base, np.nan), axis=0)
                ratio = now / median
            ratio = np.where(np.isfinite(ratio), ratio, np.nan)
            peak = np.nanmax(np.where(np.isnan(ratio), -np.inf, ratio), axis=0) if len(recent) else np.array([])
            for i in np.argsort(-np.nan_to_num(peak, nan=-np.inf, neginf=-np.inf))[:3]:
                if np.isfinite(peak[i]):
                    rises[names[order[i]]] = float(peak[i])
            risen = ratio >= th["grad_rise"]
            if risen.any():
                first_row = int(np.flatnonzero(risen.any(axis=1))[0])
                candidates = np.flatnonzero(risen[first_row])
                best = candidates[int(np.nanargmax(ratio[first_row, candidates]))]
                origin = names[order[best]]
                first_rise_step = int(frame.steps[recent[first_row]])
        rel = value / trend - 1 if trend else np.inf
        where = (
            f"The gradient RMS of layer {layer_label(origin)} rose first ({fmt(rises.get(origin, np.nan))}x its "
            f"median, at step {first_rise_step})"
            if origin is not None
            else "No layer's gradient RMS rose with it"
        )
        largest = ", ".join(f"{layer_label(k)} {fmt(v)}x" for k, v in rises.items())
        return self.finding(
            step=step,
            layer=origin,
            message=(
                f"Loss spike at step {step}: the training loss jumped to {fmt(value)}, {fmt(100 * rel)}% above its "
                f"trend of {fmt(trend)} ({fmt((value - trend) / noise) if noise > 0 else 'inf'} noise units; noise "
                f"{fmt(noise)} per step). {where}; largest gradient rises in the {lookback} steps before: "
                f"{largest or 'none measured'}."
            ),
            suggestion=(
                "Look at the batch of that step (bad labels, extreme inputs), clip gradients "
                "(torch.nn.utils.clip_grad_norm_), lower the learning rate or lengthen its warm-up; for transformers "
                "check the embedding and the last layers' scale (QK-norm, z-loss). A planned jump (curriculum stage, "
                "restart) is declared with scope.step(..., phase=k)."
            ),
            evidence={
                "stat": "loss",
                "loss": value,
                "trend": trend,
                "noise": noise,
                "threshold_z": float(th["z"]),
                "threshold_rise": float(th["rise"]),
                "gradient_rises": rises,
                "first_rise_step": first_rise_step,
                "window": [int(frame.steps[history[0]]), int(frame.steps[history[-1]])],
            },
        )


def _with_episode(finding: Finding, *, last: int, resolved: int | None) -> Finding:
    return replace(finding, last_step=last, resolved_step=resolved)
