"""Helpers of the view tests: two real short runs, a healthy MLP and a deep sigmoid MLP whose gradients vanish."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope


def mlp(depth: int, act: type[nn.Module], d: int = 16, width: int = 32, out: int = 4) -> nn.Sequential:
    mods: dict[str, nn.Module] = {}
    for i in range(depth):
        mods[f"fc{i}"] = nn.Linear(d, width)
        mods[f"act{i}"] = act()
        d = width
    mods["head"] = nn.Linear(d, out)
    return nn.Sequential(OrderedDict(mods))


def train(model: nn.Module, steps: int, *, seed: int = 0, log_dir: Path | None = None, **watch) -> gradscope.Report:
    """``steps`` SGD steps on a seeded teacher task, watched; returns the report."""
    torch.manual_seed(seed)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with gradscope.watch(model, optimizer=opt, log_dir=None if log_dir is None else str(log_dir), **watch) as scope:
        for step in range(1, steps + 1):
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1000 * seed + step))
            loss = F.cross_entropy(model(x), (x @ teacher).argmax(dim=1))
            loss.backward()
            opt.step()
            scope.step(loss=loss, lr=opt.param_groups[0]["lr"])
            opt.zero_grad()
    return scope.report()


def healthy(steps: int = 20, **kwargs) -> gradscope.Report:
    torch.manual_seed(0)
    return train(mlp(2, nn.ReLU), steps, **kwargs)


def vanishing(steps: int = 20, **kwargs) -> gradscope.Report:
    torch.manual_seed(0)
    return train(mlp(8, nn.Sigmoid), steps, **kwargs)


class FlagLayer(gradscope.Rule):
    """A test rule: reports ``layer`` at step ``at`` with a fixed value and threshold."""

    name = "exploding_gradients"
    severity = "error"

    def __init__(self, layer: str, at: int = 3) -> None:
        super().__init__()
        self.layer, self.at = layer, at

    def check(self, ctx):
        if not (ctx.steps >= self.at).any():
            return []
        return [
            self.finding(
                step=self.at,
                layer=self.layer,
                message=f"Layer {self.layer} is flagged by the test rule.",
                suggestion="Nothing; <i>this</i> is a test.",
                evidence={"stat": "l2_norm", "value": 1.23456, "threshold": 1.0},
            )
        ]
