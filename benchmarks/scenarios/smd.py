"""A baseline: Amazon SageMaker Debugger's built-in rules, re-implemented from their published definitions.

Defaults are those of the SageMaker developer guide (see DESIGN.md's research, anchors-mission.md 2a).
Each rule is evaluated on the same run as gradscope, from the same recorded statistics where they
exist, plus what SageMaker saves and gradscope does not keep (``Probe``: mean |g| per tensor at every
step, ReLU/tanh/sigmoid inputs on sampled steps, 5th-95th gradient percentiles over the first steps).
SageMaker saves every 500 steps by default; the baseline is given every step instead (every sampled
step for activations and weight updates), which can only help it.

Each SageMaker rule maps to the gradscope kind it is meant to catch:

=========================  ==============================================================
VanishingGradient          vanishing_gradients: mean |g| < 1e-7 for any gradient tensor
ExplodingTensor            nonfinite_gradients: any NaN/Inf in a gradient or the loss
WeightUpdateRatio          exploding_gradients when update/weight > 10; loss_not_decreasing
                           when < 1e-8 (SageMaker: "very small updates, slow convergence")
PoorWeightInitialization   vanishing_gradients (or exploding_gradients when the variance of
                           ReLU inputs grows with depth): max/min variance ratio across layers
                           > 10, or the 5th-95th percentile range of a gradient < 0.001, in the
                           first 10 steps
SaturatedActivation        saturated_activations: > 50 % of a tanh/sigmoid layer's units have
                           their input beyond (-9.4999, 9.4999) / (-23, 16.99999) on > 99 % of
                           the samples (activity < 1 %)
DeadRelu                   dead_units: > 50 % of a ReLU layer's units active (> 0) on < 1 % of
                           the samples
Overfit                    overfitting: (val - mean train) / mean train > 0.1, patience 1
LossNotDecreasing          loss_not_decreasing: the loss (validation loss first, when given)
                           did not decrease against the saved step 10 steps earlier
=========================  ==============================================================

SageMaker has no rule for parameters that never get a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

import gradscope
from gradscope.registry import STATISTICS
from gradscope.stats.moments import MOMENTS

__all__ = ["MEAN_ABS", "Probe", "SMDFinding", "smd_findings"]

MEAN_ABS = "smd_mean_abs_grad"
if MEAN_ABS not in STATISTICS:

    @gradscope.register_statistic(MEAN_ABS, reduce="mean")
    def _mean_abs(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return grad.abs().mean(dtype=torch.float32)


TANH_RANGE = (-9.4999, 9.4999)
SIGMOID_RANGE = (-23.0, 16.99999)


@dataclass
class SMDFinding:
    kind: str
    step: int
    layer: Optional[str]
    rule: str


class Probe:
    """Records, outside gradscope, what the SageMaker rules read that gradscope does not keep."""

    def __init__(self, sample_every: int = 10, init_steps: int = 10) -> None:
        self.sample_every = sample_every
        self.init_steps = init_steps
        self.handles: list[Any] = []
        self.step = 0
        self.act: dict[int, list[tuple[str, str, float]]] = {}  # step -> [(module, rule, value)]
        self.relu_in_var: dict[str, list[float]] = {}
        self.order: list[str] = []
        self.grad_range: dict[int, list[tuple[str, float]]] = {}

    def attach(self, model: nn.Module) -> None:
        self.model = model
        for path, m in model.named_modules():
            if isinstance(m, (nn.ReLU, nn.Tanh, nn.Sigmoid)):
                self.handles.append(m.register_forward_hook(self._hook(path)))

    def before_step(self, step: int) -> None:
        self.step = step
        self._seen: set[str] = set()

    def _sampled(self) -> bool:
        return (self.step - 1) % self.sample_every == 0

    def _hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not module.training or path in self._seen or not isinstance(out, torch.Tensor):
                return
            self._seen.add(path)
            x = args[0].detach()
            units = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2).reshape(-1, x.shape[1]) if x.dim() > 2 else x
            if isinstance(module, nn.ReLU):
                if self.step <= self.init_steps:
                    if path not in self.order:
                        self.order.append(path)
                    self.relu_in_var.setdefault(path, []).append(float(x.double().var()))
                if self._sampled():
                    activity = (units > 0).double().mean(dim=0)  # share of samples where each unit fires
                    dead = float((activity < 0.01).double().mean())
                    self.act.setdefault(self.step, []).append((path, "DeadRelu", dead))
            elif self._sampled():
                lo, hi = TANH_RANGE if isinstance(module, nn.Tanh) else SIGMOID_RANGE
                active = ((units > lo) & (units < hi)).double().mean(dim=0)
                sat = float((active < 0.01).double().mean())
                self.act.setdefault(self.step, []).append((path, "SaturatedActivation", sat))

        return hook

    def on_backward(self, step: int, model: nn.Module) -> None:
        if step > self.init_steps:
            return
        out = []
        for name, p in model.named_parameters():
            if p.grad is not None and p.grad.numel() > 1 and torch.isfinite(p.grad).all():
                q = torch.quantile(p.grad.detach().double().flatten()[:100_000], torch.tensor([0.05, 0.95]).double())
                out.append((name.rpartition(".")[0], float(q[1] - q[0])))
        self.grad_range[step] = out

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _first(found: list[SMDFinding], kind: str, step: int, layer: Optional[str], rule: str) -> None:
    if not any(f.kind == kind for f in found):
        found.append(SMDFinding(kind, int(step), layer, rule))


def smd_findings(frame: Any, probe: Probe, losses: np.ndarray, val_losses: dict[int, float]) -> list[SMDFinding]:
    """Evaluate the SageMaker default rules on a finished run; one finding per kind, at its first step."""
    found: list[SMDFinding] = []
    sch = frame.schema
    keep = ~frame.skipped
    steps = frame.steps
    layers = sch.param_layers
    # VanishingGradient: mean |g| < 1e-7 for any tensor, at any saved step.
    if MEAN_ABS in sch.stats:
        ma = frame.param_values(MEAN_ABS)
        hit = keep[:, None] & np.isfinite(ma) & (ma < 1e-7)
        if hit.any():
            r, p = np.argwhere(hit)[0]
            _first(found, "vanishing_gradients", steps[r], layers[p], "VanishingGradient")
    # ExplodingTensor: NaN/Inf in any gradient or the loss.
    nf = frame.param_values("nonfinite_count")
    loss_bad = ~np.isfinite(frame.scalar("loss")) if "loss" in frame.scalar_names else np.zeros(len(frame), bool)
    bad = keep & ((np.nan_to_num(nf, nan=0.0) > 0).any(axis=1) | loss_bad)
    if bad.any():
        r = int(np.argmax(bad))
        ps = np.flatnonzero(np.nan_to_num(nf[r], nan=0.0) > 0)
        _first(found, "nonfinite_gradients", steps[r], layers[ps[0]] if len(ps) else None, "ExplodingTensor")
    # WeightUpdateRatio on the steps where the update was measured (per tensor, eps 1e-9).
    if "update_ratio" in sch.stats:
        d = np.sqrt(frame.moments[..., MOMENTS.index("dsumsq")])
        w = np.sqrt(frame.moments[..., MOMENTS.index("psumsq")])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = d / (w + 1e-9)
        ok = keep[:, None] & frame.sampled[:, None] & frame.has_grad & np.isfinite(ratio)
        large = ok & (ratio > 10.0)
        small = ok & (ratio < 1e-8)
        if large.any():
            r, p = np.argwhere(large)[0]
            _first(found, "exploding_gradients", steps[r], layers[p], "WeightUpdateRatio")
        if small.any():
            r, p = np.argwhere(small)[0]
            _first(found, "loss_not_decreasing", steps[r], layers[p], "WeightUpdateRatio")
    # PoorWeightInitialization over the first 10 steps.
    if probe.relu_in_var:
        var = np.array([np.median(probe.relu_in_var[k]) for k in probe.order])
        if len(var) >= 2 and var.min() > 0 and var.max() / var.min() > 10.0:
            kind = "exploding_gradients" if np.argmax(var) > np.argmin(var) else "vanishing_gradients"
            _first(found, kind, 1, probe.order[int(np.argmin(var))], "PoorWeightInitialization")
    for step in sorted(probe.grad_range):
        rng = [(layer, v) for layer, v in probe.grad_range[step]]
        small_range = [layer for layer, v in rng if v < 0.001]
        if small_range:
            _first(found, "vanishing_gradients", step, small_range[0], "PoorWeightInitialization")
            break
    # DeadRelu / SaturatedActivation: > 50 % of the units inactive on > 99 % of the samples.
    for step in sorted(probe.act):
        for path, rule, frac in probe.act[step]:
            if frac > 0.5:
                _first(
                    found,
                    "dead_units" if rule == "DeadRelu" else "saturated_activations",
                    step,
                    path,
                    rule,
                )
    # Overfit: (val - mean train since the previous validation) / mean train > 0.1, patience 1.
    prev = 0
    for step in sorted(val_losses):
        train = losses[prev:step]
        train = train[np.isfinite(train)]
        prev = step
        if len(train) and np.isfinite(val_losses[step]):
            mean = float(np.mean(train))
            if mean > 0 and (val_losses[step] - mean) / mean > 0.1:
                _first(found, "overfitting", step, None, "Overfit")
                break
    # LossNotDecreasing: loss at step s against step s - 10, no decrease at all (validation loss first).
    if val_losses:
        series = sorted(val_losses.items())
        pairs = [(s, v, pv) for (s, v) in series for (ps, pv) in series if s - ps >= 10 and s - ps < 20]
    else:
        pairs = [(s + 1, losses[s], losses[s - 10]) for s in range(10, len(losses))]
    for s, v, pv in pairs:
        if np.isfinite(v) and np.isfinite(pv) and not v < pv:
            _first(found, "loss_not_decreasing", s, None, "LossNotDecreasing")
            break
    return found
