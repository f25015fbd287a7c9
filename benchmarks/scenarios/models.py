"""Small models for the detection scenarios: MLPs, a CNN, a GPT-style transformer, an LSTM, a vanilla RNN."""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import GPT

__all__ = ["GPT", "MLP", "LSTMClassifier", "RNNClassifier", "ResidualMLP", "SmallCNN", "TwoHeadMLP", "scale_init"]

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "leaky": nn.LeakyReLU}


class MLP(nn.Sequential):
    """``Linear -> act`` blocks then a linear head; modules named ``fc0, act0, fc1, ... head``."""

    def __init__(self, d_in: int, widths: list[int], d_out: int, act: str = "relu", out_act: str | None = None) -> None:
        mods: list[tuple[str, nn.Module]] = []
        d = d_in
        for i, w in enumerate(widths):
            mods.append((f"fc{i}", nn.Linear(d, w)))
            mods.append((f"act{i}", _ACTS[act]()))
            d = w
        mods.append(("head", nn.Linear(d, d_out)))
        if out_act is not None:
            mods.append(("out", _ACTS[out_act]()))
        super().__init__()
        for name, m in mods:
            self.add_module(name, m)

    @property
    def hidden(self) -> list[nn.Linear]:
        return [m for n, m in self.named_children() if n.startswith("fc")]


def scale_init(model: nn.Module, *, std: float | None = None, gain: float | None = None, kind: str = "normal") -> None:
    """Re-initialise every Linear weight: fixed ``std``, or ``gain * sqrt(1 / fan_in)``; biases to 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                s = std if std is not None else gain / math.sqrt(m.in_features)
                m.weight.normal_(0.0, s)
                if m.bias is not None:
                    m.bias.zero_()


class ResidualMLP(nn.Module):
    """Pre-LayerNorm residual MLP blocks: deep, yet gradients flow."""

    def __init__(self, d_in: int, d: int, depth: int, d_out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk(h)
        return self.head(self.norm(h))


class SmallCNN(nn.Module):
    """conv-BN-ReLU x3 with pooling, then a linear head (``bn=False``: conv bias, no normalization)."""

    def __init__(self, classes: int = 10, width: int = 16, bn: bool = True) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.c1 = block(3, width)
        self.c2 = block(width, 2 * width)
        self.c3 = block(2 * width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.c1(x))
        x = self.pool(self.c2(x))
        x = self.c3(x).mean(dim=(2, 3))
        return self.head(x)


class LSTMClassifier(nn.Module):
    def __init__(self, d_in: int, hidden: int, classes: int, layers: int = 1) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.proj(x))
        return self.head(out[:, -1])


class RNNClassifier(nn.Module):
    """A vanilla (Elman) RNN; ``radius`` rescales the recurrent matrix to that spectral radius."""

    def __init__(
        self, d_in: int, hidden: int, classes: int, nonlinearity: str = "tanh", radius: float | None = None
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, hidden)
        self.rnn = nn.RNN(hidden, hidden, batch_first=True, nonlinearity=nonlinearity)
        self.head = nn.Linear(hidden, classes)
        if radius is not None:
            with torch.no_grad():
                w = self.rnn.weight_hh_l0
                w.mul_(radius / torch.linalg.eigvals(w).abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.proj(x))
        return self.head(out[:, -1])


class TwoHeadMLP(nn.Module):
    """A trunk with a main head and an auxiliary head; ``use_aux`` decides whether the aux head is used."""

    def __init__(self, d_in: int, d: int, classes: int, use_aux: bool | str = True, detach_trunk: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
        self.head = nn.Linear(d, classes)
        self.aux = nn.Linear(d, classes)
        self.use_aux = use_aux
        self.detach_trunk = detach_trunk
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.trunk(x)
        if self.detach_trunk:
            h = h.detach()
        out = self.head(h)
        if self.use_aux is True or (self.use_aux == "alternate" and self.calls % 2 == 0):
            out = out + 0.1 * self.aux(h)
        return out
