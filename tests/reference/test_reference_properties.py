"""Property-based: random architectures from the supported layers, random shapes and seeds.

For every drawn model, batch and loss, gradscope.verify must find reference and autograd in agreement,
and every trainable parameter must be compared and agree to 1e-10 relative in float64:
|reference - autograd| <= 1e-10 * max(|reference|, |autograd|) + atol, where atol is 1e-13 times the
largest gradient in the model. That floor exists for gradients that are zero in exact arithmetic (a
bias followed by normalization, a LayerNorm over two features): on both sides they are rounding noise
of the terms that cancelled, and their relative error means nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradscope
from gradscope.reference import Residual, SelfAttention

D = torch.float64
RTOL = 1e-10
SETTINGS = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


def assert_agree(model: nn.Module, inputs: torch.Tensor, targets: Any, loss_fn: Any) -> None:
    report = gradscope.verify(model, inputs, targets, loss_fn)
    assert report.ok, str(report)
    params = {c.name: c for c in report.gradients if c.kind == "parameter"}
    assert set(params) == {n for n, p in model.named_parameters() if p.requires_grad}
    largest = max(c.scale for c in report.gradients)
    assert report.atol == pytest.approx(1e-3 * RTOL * largest, rel=1e-6)
    bad = [c for c in params.values() if c.abs_error > RTOL * c.scale + 1e-13 * largest]
    assert not bad, "\n".join(c.describe() for c in bad)


# --- layers ------------------------------------------------------------------------------------------
ACTIVATIONS = st.sampled_from(
    [
        lambda: nn.ReLU(),
        lambda: nn.LeakyReLU(0.1),
        lambda: nn.GELU(),
        lambda: nn.GELU(approximate="tanh"),
        lambda: nn.SiLU(),
        lambda: nn.Tanh(),
        lambda: nn.Sigmoid(),
        lambda: nn.Softmax(dim=-1),
        lambda: nn.LogSoftmax(dim=-1),
        lambda: nn.Identity(),
    ]
)
# In-place activations only right after a Linear or a convolution: after an op that saves its output
# (sigmoid, softmax, another ReLU) writing into that output breaks autograd itself, in any model.
AFTER_WEIGHTS = st.one_of(
    ACTIVATIONS, st.sampled_from([lambda: nn.ReLU(inplace=True), lambda: nn.LeakyReLU(0.2, inplace=True)])
)


@st.composite
def vector_block(draw: st.DrawFn, width: int) -> tuple[nn.Module, int]:
    """A block on [N, width] features; returns it and its output width."""
    kind = draw(st.sampled_from(["linear", "norm", "dropout", "residual", "nested"]))
    if kind == "linear":
        out = draw(st.integers(2, 7))
        return nn.Sequential(nn.Linear(width, out, bias=draw(st.booleans())), draw(AFTER_WEIGHTS)()), out
    if kind == "norm":
        if draw(st.booleans()):
            return nn.LayerNorm(width, elementwise_affine=draw(st.booleans()), bias=draw(st.booleans())), width
        return nn.BatchNorm1d(width, affine=draw(st.booleans())), width
    if kind == "dropout":
        return nn.Dropout(draw(st.sampled_from([0.0, 0.3, 0.5]))), width
    if kind == "residual":
        body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), draw(ACTIVATIONS)())
        shortcut = nn.Linear(width, width) if draw(st.booleans()) else None
        return Residual(body, shortcut), width
    inner, out = draw(vector_block(width))
    return nn.Sequential(inner, draw(ACTIVATIONS)()), out


@st.composite
def loss_and_targets(draw: st.DrawFn, batch: int, classes: int) -> tuple[Any, Any, list[nn.Module]]:
    """A loss, its targets for [batch, classes] outputs, and layers to append to the model (NLL's log-softmax)."""
    kind = draw(st.sampled_from(["ce", "mse", "bce", "nll"]))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    weight = torch.rand(classes, dtype=D) + 0.5 if draw(st.booleans()) else None
    if kind in ("ce", "nll"):
        targets = torch.randint(0, classes, (batch,))
        ignore = -100
        if draw(st.booleans()) and batch > 1:
            targets[0] = ignore = int(draw(st.sampled_from([-100, classes])))
        if kind == "nll":
            return nn.NLLLoss(weight=weight, ignore_index=ignore, reduction=reduction), targets, [nn.LogSoftmax(dim=1)]
        smoothing = draw(st.sampled_from([0.0, 0.1, 0.3]))
        if ignore == -100 and draw(st.booleans()):  # class probabilities (ignore_index is for indices)
            targets = torch.softmax(torch.randn(batch, classes, dtype=D), 1)
        loss = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore, label_smoothing=smoothing, reduction=reduction)
        return loss, targets, []
    if kind == "mse":
        return nn.MSELoss(reduction=reduction), torch.randn(batch, classes, dtype=D), []
    pos_weight = torch.rand(classes, dtype=D) * 2 if draw(st.booleans()) else None
    loss = nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight, reduction=reduction)
    return loss, torch.rand(batch, classes, dtype=D), []


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**16), batch=st.integers(2, 6), width=st.integers(2, 7))
def test_random_mlps(data, seed, batch, width):
    torch.manual_seed(seed)
    layers, current = [], width
    for _ in range(data.draw(st.integers(1, 4))):
        block, current = data.draw(vector_block(current))
        layers.append(block)
    classes = data.draw(st.integers(2, 4))
    loss_fn, targets, tail = data.draw(loss_and_targets(batch, classes))
    model = nn.Sequential(*layers, nn.Linear(current, classes), *tail).double().train(data.draw(st.booleans()))
    assert_agree(model, torch.randn(batch, width, dtype=D), targets, loss_fn)


@st.composite
def image_layer(draw: st.DrawFn, channels: int) -> nn.Module:
    kind = draw(st.sampled_from(["conv", "conv", "bn", "act", "maxpool", "avgpool", "residual"]))
    if kind == "conv":
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
        out = groups * draw(st.integers(1, 3))
        kernel = draw(st.integers(1, 3))
        padding = draw(st.one_of(st.integers(0, kernel), st.just("same")))
        stride = 1 if padding == "same" else draw(st.integers(1, 2))
        return nn.Conv2d(
            channels, out, kernel, stride, padding, draw(st.integers(1, 2)), groups, bias=draw(st.booleans())
        )
    if kind == "bn":
        return nn.BatchNorm2d(channels, affine=draw(st.booleans()))
    if kind == "act":
        return draw(ACTIVATIONS)()
    if kind == "residual":
        return Residual(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), draw(ACTIVATIONS)()))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, kernel // 2))
    ceil_mode = draw(st.booleans())
    if kind == "maxpool":
        return nn.MaxPool2d(kernel, stride, padding, dilation=draw(st.integers(1, 2)), ceil_mode=ceil_mode)
    return nn.AvgPool2d(
        kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=draw(st.booleans()),
        divisor_override=draw(st.sampled_from([None, 2])),
    )  # fmt: skip


@SETTINGS
@given(
    data=st.data(),
    seed=st.integers(0, 2**16),
    batch=st.integers(2, 4),
    size=st.integers(5, 9),
    channels=st.integers(1, 4),
)
def test_random_cnns(data, seed, batch, size, channels):
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, size, size + data.draw(st.integers(-1, 1)), dtype=D)
    layers, probe = [], x
    for _ in range(data.draw(st.integers(1, 4))):
        layer = data.draw(image_layer(probe.shape[1])).double()
        try:
            with torch.no_grad():
                out = layer.eval()(probe)
        except RuntimeError:
            continue  # an output size below 1 for this input: draw on
        if out.shape[-1] < 1 or out.shape[-2] < 1:
            continue
        layers.append(layer)
        probe = out
    pool = nn.AdaptiveAvgPool2d(data.draw(st.sampled_from([1, 2, (2, None)])))
    with torch.no_grad():
        features = pool(probe).flatten(1).shape[1]
    classes = data.draw(st.integers(2, 4))
    loss_fn, targets, tail = data.draw(loss_and_targets(batch, classes))
    model = nn.Sequential(*layers, pool, nn.Flatten(), nn.Linear(features, classes), *tail).double()
    assert_agree(model.train(data.draw(st.booleans())), x, targets, loss_fn)


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**16), batch=st.integers(2, 4), length=st.integers(3, 10))
def test_random_conv1d_stacks(data, seed, batch, length):
    torch.manual_seed(seed)
    channels = data.draw(st.integers(1, 4))
    x = torch.randn(batch, channels, length, dtype=D)
    layers, probe = [], x
    for _ in range(data.draw(st.integers(1, 3))):
        groups = data.draw(st.sampled_from([g for g in (1, 2) if probe.shape[1] % g == 0]))
        kernel = data.draw(st.integers(1, 4))
        padding = data.draw(st.one_of(st.integers(0, 2), st.just("same")))
        stride = 1 if padding == "same" else data.draw(st.integers(1, 2))
        conv = nn.Conv1d(
            probe.shape[1],
            groups * data.draw(st.integers(1, 3)),
            kernel,
            stride,
            padding,
            data.draw(st.integers(1, 2)),
            groups,
        )
        block = [conv.double(), data.draw(AFTER_WEIGHTS)()]
        if data.draw(st.booleans()):
            block.append(nn.BatchNorm1d(conv.out_channels).double())
        with torch.no_grad():
            try:
                out = nn.Sequential(*block).eval()(probe)
            except RuntimeError:
                continue
        layers.extend(block)
        probe = out
    classes = data.draw(st.integers(2, 4))
    loss_fn, targets, tail = data.draw(loss_and_targets(batch, classes))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(probe[0].numel(), classes), *tail).double()
    assert_agree(model.train(data.draw(st.booleans())), x, targets, loss_fn)


@settings(SETTINGS, max_examples=60)
@given(data=st.data(), seed=st.integers(0, 2**16), batch=st.integers(1, 3), length=st.integers(1, 5))
def test_random_transformers(data, seed, batch, length):
    torch.manual_seed(seed)
    heads = data.draw(st.integers(1, 3))
    width = heads * data.draw(st.integers(1, 3))
    vocab = data.draw(st.integers(3, 8))
    batch_first = data.draw(st.booleans())
    train = data.draw(st.booleans())
    if data.draw(st.booleans()):  # a GPT-style block: Residual + causal SelfAttention + MLP
        blocks = [
            nn.Sequential(
                Residual(
                    nn.Sequential(
                        nn.LayerNorm(width),
                        SelfAttention(width, heads, causal=data.draw(st.booleans()), batch_first=batch_first),
                    )
                ),
                Residual(
                    nn.Sequential(
                        nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
                    )
                ),
            )
            for _ in range(data.draw(st.integers(1, 2)))
        ]
    else:
        blocks = [
            nn.TransformerEncoderLayer(
                width,
                heads,
                data.draw(st.integers(2, 8)),
                dropout=0.0 if train else 0.1,  # attention dropout has no module: training needs p = 0
                activation=data.draw(st.sampled_from(["relu", "gelu"])),
                batch_first=batch_first,
                norm_first=data.draw(st.booleans()),
                bias=data.draw(st.booleans()),
            )
            for _ in range(data.draw(st.integers(1, 2)))
        ]
    model = nn.Sequential(
        nn.Embedding(vocab, width),
        *blocks,
        nn.LayerNorm(width),
        nn.Linear(width, vocab),
        nn.Flatten(0, 1),
    ).double()
    shape = (batch, length) if batch_first else (length, batch)
    tokens = torch.randint(0, vocab, shape)
    assert_agree(model.train(train), tokens, torch.randint(0, vocab, (batch * length,)), nn.CrossEntropyLoss())
