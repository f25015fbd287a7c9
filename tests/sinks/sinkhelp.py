"""Helpers of the output tests (imported by them): a small seeded training loop, TensorBoard's own reader."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import gradscope
from gradscope.rules.base import Rule, RuleContext


def small_mlp() -> nn.Module:
    """Linear layers ``0``, ``2``, ``4`` with a ReLU (``1``) and a Tanh (``3``) between them."""
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


@dataclass
class Run:
    """What a training run left behind: the report and copies of what the optimizer saw."""

    report: gradscope.Report
    scope: gradscope.GradScope
    grads: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> name -> grad (float64)
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> name -> weight before step
    skip: tuple[int, ...] = ()


def train(
    model: nn.Module,
    steps: int,
    *,
    seed: int = 0,
    capture: Iterable[int] = (),
    skip: Iterable[int] = (),
    grad_hook: Any = None,
    **watch_kwargs: Any,
) -> Run:
    """Train ``model`` for ``steps`` SGD steps on seeded regression data under ``gradscope.watch``.

    ``capture``: steps at which the gradients and weights the optimizer sees are copied (float64).
    ``skip``: steps whose ``optimizer.step()`` is not called (as GradScaler does on inf).
    ``grad_hook(step, model)``: may edit gradients before the optimizer step.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    capture, skip = set(capture), set(skip)
    grads: dict[int, dict[str, torch.Tensor]] = {}
    weights: dict[int, dict[str, torch.Tensor]] = {}
    d_in = next(p for p in model.parameters() if p.dim() == 2).shape[1]
    scope = gradscope.watch(model, optimizer=opt, **watch_kwargs)
    with scope:
        for step in range(1, steps + 1):
            x = torch.randn(16, d_in, generator=gen)
            out = model(x)
            loss = (out - x[:, : out.shape[1]].sin()).pow(2).mean()
            loss.backward()
            if grad_hook is not None:
                grad_hook(step, model)
            if step in capture:
                grads[step] = {
                    n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None
                }
                weights[step] = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            if step not in skip:
                opt.step()
            scope.step(loss=loss, val_loss=loss.detach() * 1.25)
            opt.zero_grad()
    return Run(report=scope.report(), scope=scope, grads=grads, weights=weights, skip=tuple(sorted(skip)))


def load_events(run_dir: Path) -> Any:
    """TensorBoard's EventAccumulator over ``run_dir``, keeping every event of every kind."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).rglob("*") if "tfevents" in p.name)


def tensor_text(acc: Any, tag: str) -> list[tuple[int, str]]:
    """String tensors (text, JSON records) of ``tag`` as ``(step, text)``."""
    return [(e.step, e.tensor_proto.string_val[0].decode("utf-8")) for e in acc.Tensors(tag)]


class FiresAtStep(Rule):
    """A test rule: reports ``layer`` at ``at`` (once the run got there), with a fixed message."""

    name = "exploding_gradients"
    severity = "error"

    def __init__(self, at: int = 5, layer: str | None = "2", severity: str = "error") -> None:
        super().__init__()
        self.at, self.layer, self.sev = at, layer, severity

    def check(self, ctx: RuleContext) -> list:
        if not (ctx.steps >= self.at).any():
            return []
        return [
            self.finding(
                step=self.at,
                layer=self.layer,
                message=f"Layer {self.layer!r} is flagged by the test rule at step {self.at}.",
                suggestion="Nothing; this is a test.",
                evidence={"stat": "l2_norm", "value": 1.5, "threshold": 1.0},
                severity=self.sev,
            )
        ]


def f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).astype(np.float32)


def expected_records(report: gradscope.Report, *, per_param: bool = False) -> dict[tuple[int, str], float]:
    """``(step, tag) -> value`` of every number a record sink should receive, from ``report``'s tables.

    The layer and model aggregates (and the parameters with ``per_param``) of ``report.stats`` and the
    scalars of ``report.scalars``, NaN values left out.
    """
    from gradscope.sinks import tags as T

    stats = report.stats
    if not per_param:
        stats = stats[stats["param"] == "*"]
    stats = stats[stats["value"].notna()]
    out = {
        (int(step), T.stat_tag(stat, layer, param)): float(value)
        for step, layer, param, stat, value in stats[["step", "layer", "param", "stat", "value"]].itertuples(
            index=False
        )
    }
    for name, series in report.scalars.items():
        for step, value in series.dropna().items():
            out[(int(step), T.scalar_tag(name))] = float(value)
    return out
