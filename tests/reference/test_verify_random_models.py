"""No false alarm: gradscope.verify passes 100 seeded random correct models in float64 and in float32.

Each seed builds a small random stack, a multilayer perceptron, a convolutional net or a recurrent sequence
model, from the layers with a reference and from custom modules that have none (their gradients are checked
numerically by the fallback). Every model is correct (plain PyTorch), so any report that is not ok is a
false alarm; all of them are listed at once.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.reference import Recurrent

MODELS = 100


# --- custom modules without a reference: the numerical fallback checks them --------------------------


class Swish(nn.Module):
    """x σ(x), written out in its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class ScaleShift(nn.Module):
    """y = a x + b with a and b per feature on the last dimension."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.a = nn.Parameter(1 + 0.3 * torch.randn(features))
        self.b = nn.Parameter(0.3 * torch.randn(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x + self.b


class ChannelGate(nn.Module):
    """y = x σ(w x), w per channel (dim 1) of a 4-d input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.w.view(1, -1, 1, 1) * x)


class MyLinear(nn.Module):
    """tanh(x Wᵀ + b) with its own parameters."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, self.weight, self.bias))


class MyConv(nn.Module):
    """A 3x3 'same' convolution of its own, no bias."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) / (3 * cin**0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1)


ACTIVATIONS = [
    nn.ReLU,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
    lambda: nn.LeakyReLU(0.1),
    lambda: nn.GELU(approximate="tanh"),
    Swish,
]


# --- random models ----------------------------------------------------------------------------------


def mlp(rng: random.Random) -> tuple[nn.Module, torch.Tensor, Any, Any]:
    n, width = rng.randint(2, 6), rng.randint(2, 6)
    layers: list[nn.Module] = []
    for _ in range(rng.randint(1, 4)):
        out = rng.randint(2, 6)
        layers.append(rng.choice([nn.Linear, MyLinear])(width, out))
        width = out
        extra = rng.choice(["activation", "activation", "layernorm", "rmsnorm", "batchnorm", "scale-shift", "none"])
        if extra == "activation":
            layers.append(rng.choice(ACTIVATIONS)())
        elif extra == "layernorm":
            layers.append(nn.LayerNorm(width))
        elif extra == "rmsnorm":
            layers.append(nn.RMSNorm(width))
        elif extra == "batchnorm":
            layers.append(nn.BatchNorm1d(width))
        elif extra == "scale-shift":
            layers.append(ScaleShift(width))
    classes = rng.randint(2, 4)
    layers.append(nn.Linear(width, classes))
    inputs = torch.randn(n, layers[0].weight.shape[1])
    if rng.random() < 0.5:
        return nn.Sequential(*layers), inputs, torch.randint(0, classes, (n,)), nn.CrossEntropyLoss()
    return nn.Sequential(*layers), inputs, torch.randn(n, classes), nn.MSELoss()


def convnet(rng: random.Random) -> tuple[nn.Module, torch.Tensor, Any, Any]:
    n, channels, size = rng.randint(2, 3), rng.randint(1, 3), rng.randint(4, 6)
    inputs = torch.randn(n, channels, size, size)
    layers: list[nn.Module] = []
    for _ in range(rng.randint(1, 3)):
        out = rng.randint(1, 4)
        kind = rng.choice(["conv", "conv", "conv-padding-mode", "my-conv"])
        if kind == "conv":
            layers.append(nn.Conv2d(channels, out, 3, padding=1))
        elif kind == "conv-padding-mode":
            mode = rng.choice(["reflect", "replicate", "circular"])
            layers.append(nn.Conv2d(channels, out, 3, padding=1, padding_mode=mode))
        else:
            layers.append(MyConv(channels, out))
        channels = out
        extra = rng.choice(["activation", "groupnorm", "batchnorm", "instancenorm", "gate", "none"])
        if extra == "activation":
            layers.append(rng.choice(ACTIVATIONS)())
        elif extra == "groupnorm":
            layers.append(nn.GroupNorm(1, channels))
        elif extra == "batchnorm":
            layers.append(nn.BatchNorm2d(channels))
        elif extra == "instancenorm":
            layers.append(nn.InstanceNorm2d(channels, affine=True))
        elif extra == "gate":
            layers.append(ChannelGate(channels))
        resample = rng.choice(["none", "none", "maxpool", "avgpool", "upsample"])
        if resample == "maxpool" and size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        elif resample == "avgpool" and size >= 4:
            layers.append(nn.AvgPool2d(2))
            size //= 2
        elif resample == "upsample" and size <= 6:
            layers.append(nn.Upsample(scale_factor=2, mode=rng.choice(["nearest", "bilinear"])))
            size *= 2
    classes = rng.randint(2, 4)
    layers += [nn.Flatten(), nn.Linear(channels * size * size, classes)]
    return nn.Sequential(*layers), inputs, torch.randint(0, classes, (n,)), nn.CrossEntropyLoss()


def sequence_model(rng: random.Random) -> tuple[nn.Module, torch.Tensor, Any, Any]:
    vocab, dim, hidden = rng.randint(4, 8), rng.randint(2, 4), rng.randint(2, 4)
    kind = rng.choice([nn.RNN, nn.LSTM, nn.GRU])
    bidirectional = rng.random() < 0.5
    rnn = kind(dim, hidden, num_layers=rng.randint(1, 2), batch_first=True, bidirectional=bidirectional)
    width = hidden * (2 if bidirectional else 1)
    middle: list[nn.Module] = [rng.choice([Swish, lambda: ScaleShift(width), nn.Tanh, nn.Identity])()]
    model = nn.Sequential(nn.Embedding(vocab, dim), Recurrent(rnn), *middle, nn.Linear(width, vocab), nn.Flatten(0, 1))
    n, steps = rng.randint(1, 3), rng.randint(2, 4)
    ids = torch.randint(0, vocab, (n, steps))
    return model, ids, torch.randint(0, vocab, (n * steps,)), nn.CrossEntropyLoss()


def random_model(seed: int) -> tuple[nn.Module, torch.Tensor, Any, Any]:
    """The seed's model, batch and loss: 40% perceptrons, 40% conv nets, 20% sequence models."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    build = rng.choice([mlp, mlp, convnet, convnet, sequence_model])
    return build(rng)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_no_false_alarm_on_random_correct_models(dtype: torch.dtype) -> None:
    failures, numerical = [], 0
    for seed in range(MODELS):
        model, inputs, targets, loss_fn = random_model(seed)
        try:
            report = gradscope.verify(model, inputs, targets, loss_fn, dtype=dtype)
        except Exception as error:  # a crash is a false alarm too; report it with the others
            failures.append(f"seed {seed}: {type(error).__name__}: {error}\n{model}")
            continue
        if not report.ok:
            failures.append(f"seed {seed}:\n{model}\n{report}")
        if any(c.method == "finite_difference" for c in report.gradients):
            numerical += 1
    assert not failures, f"{len(failures)} of {MODELS} correct models failed verify in {dtype}:\n\n" + "\n\n".join(
        failures
    )
    # The custom modules must really have gone through the numerical fallback in a good share of models.
    assert numerical >= MODELS // 4, f"only {numerical} of {MODELS} models had a gradient checked numerically"
