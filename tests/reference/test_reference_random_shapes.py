"""Each newer reference layer and loss against autograd on random sizes and options, in float64 and float32.

For every layer family a hypothesis strategy draws the sizes and options, builds a small model around the
layer, and compares :func:`gradscope.reference.manual_backward` with a plain ``loss.backward()`` on every
parameter gradient, the input gradient and the loss. Both sides run in the dtype under test.

Tolerance, per gradient tensor: ``max |reference - autograd| <= rtol * scale + atol``, where ``scale`` is the
larger of the two tensors' largest magnitudes. ``rtol`` and ``atol`` follow the rule ``gradscope.verify``
applies by default (``DEFAULT_RTOL`` and ``default_atol`` in ``gradscope/reference/verify.py``): ``rtol`` is
1e-10 in float64 and 1e-4 in float32, and ``atol`` is ``max(1e-3 * rtol, 256 * eps(dtype))`` times the
largest gradient magnitude in the model, a floor for gradients that are zero in exact arithmetic.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradscope.reference import Recurrent, manual_backward
from gradscope.reference.verify import DEFAULT_RTOL, default_atol

SETTINGS = settings(
    max_examples=5, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]

Case = tuple[nn.Module, torch.Tensor, Any, Any]
Draw = Callable[[st.SearchStrategy[Any]], Any]


def check(model: nn.Module, inputs: torch.Tensor, targets: Any, loss_fn: Any, dtype: torch.dtype) -> None:
    """Reference against autograd, both in ``dtype``, within verify's default tolerance for ``dtype``."""
    model = model.to(dtype)
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        targets = targets.to(dtype)
    loss_fn = copy.deepcopy(loss_fn).to(dtype) if isinstance(loss_fn, nn.Module) else loss_fn

    auto = copy.deepcopy(model)
    x = inputs.clone().requires_grad_(inputs.is_floating_point())
    auto_loss = loss_fn(auto(x), targets)
    auto_loss.backward()
    want = {n: p.grad for n, p in auto.named_parameters() if p.requires_grad}

    result = manual_backward(model, inputs, targets, loss_fn)
    got = {n: result.param_grads.get(n) for n in want}
    if x.requires_grad:
        want["(input)"], got["(input)"] = x.grad, result.input_grads[("", 0)]

    rtol = DEFAULT_RTOL[dtype]
    largest = max(t.abs().max().item() for t in want.values() if t is not None and t.numel())
    atol = default_atol(dtype, rtol, largest)
    bad = []
    for name, expected in want.items():
        actual = got[name]
        if actual is None or expected is None:
            bad.append(f"{name}: reference {actual is not None}, autograd {expected is not None}")
            continue
        err = (actual - expected).abs().max().item() if expected.numel() else 0.0
        scale = max(actual.abs().max().item(), expected.abs().max().item()) if expected.numel() else 0.0
        if not err <= rtol * scale + atol:
            bad.append(f"{name}: max abs err {err:.3g}, scale {scale:.3g}, allowed {rtol * scale + atol:.3g}")
    loss_err = abs(result.loss.item() - auto_loss.item())
    if not loss_err <= rtol * abs(auto_loss.item()) + torch.finfo(dtype).eps:
        bad.append(f"loss: reference {result.loss.item()!r}, autograd {auto_loss.item()!r}")
    assert not bad, f"{model}\ninput {tuple(inputs.shape)}:\n" + "\n".join(bad)


def mse() -> nn.Module:
    return nn.MSELoss(reduction="sum")


def around(layer: nn.Module, inputs: torch.Tensor, *, before: nn.Module | None = None) -> Case:
    """``layer`` (after ``before``, if any) with a summed squared error against a random target."""
    model = nn.Sequential(before, layer) if before is not None else nn.Sequential(layer)
    with torch.no_grad():
        out = model(inputs.clone())
    return model, inputs, torch.randn_like(out), mse()


def seeded(draw: Draw) -> None:
    torch.manual_seed(draw(st.integers(0, 2**16)))


# --- normalization ----------------------------------------------------------------------------------


def group_norm(draw: Draw) -> Case:
    groups, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2).filter(lambda s: per_group * _prod(s) >= 4))
    channels = groups * per_group
    layer = nn.GroupNorm(groups, channels, eps=draw(st.sampled_from([1e-5, 1e-2])), affine=draw(st.booleans()))
    _randomize(layer)
    return around(layer, torch.randn(draw(st.integers(1, 3)), channels, *spatial))


def instance_norm(dims: int) -> Callable[[Draw], Case]:
    def build(draw: Draw) -> Case:
        channels = draw(st.integers(1, 3))
        spatial = draw(st.lists(st.integers(2, 5), min_size=dims, max_size=dims).filter(lambda s: _prod(s) >= 4))
        kind = nn.InstanceNorm1d if dims == 1 else nn.InstanceNorm2d
        layer = kind(channels, affine=draw(st.booleans()))
        _randomize(layer)
        conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(2, channels, 1)
        return around(layer, torch.randn(draw(st.integers(1, 3)), 2, *spatial), before=conv)

    return build


def rms_norm(draw: Draw) -> Case:
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2).filter(lambda s: _prod(s) >= 2))
    eps = draw(st.sampled_from([None, 1e-6, 1e-3]))
    layer = nn.RMSNorm(shape, eps=eps, elementwise_affine=draw(st.booleans()))
    _randomize(layer)
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    return around(layer, torch.randn(*lead, *shape))


def batch_norm3d(draw: Draw) -> Case:
    channels, n = draw(st.integers(1, 3)), draw(st.integers(2, 3))
    # At least 4 values per channel: over 2 the normalized output is +-1 whatever the input, its input
    # gradient is 0 in exact arithmetic, and both sides return rounding noise.
    spatial = draw(st.lists(st.integers(1, 3), min_size=3, max_size=3).filter(lambda s: n * _prod(s) >= 4))
    layer = nn.BatchNorm3d(channels, affine=draw(st.booleans()))
    _randomize(layer)
    if draw(st.booleans()):
        layer.eval()
        with torch.no_grad():
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    return around(layer, torch.randn(n, channels, *spatial))


# --- convolutions -----------------------------------------------------------------------------------


def conv3d(draw: Draw) -> Case:
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    layer = nn.Conv3d(
        cin,
        cout,
        kernel,
        stride=draw(st.integers(1, 2)),
        padding=draw(st.integers(0, 1)),
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
    )
    size = dilation * (kernel - 1) + 1
    spatial = [draw(st.integers(size, size + 2)) for _ in range(3)]
    return around(layer, torch.randn(draw(st.integers(1, 2)), cin, *spatial))


def conv_transpose(dims: int) -> Callable[[Draw], Case]:
    def build(draw: Draw) -> Case:
        groups = draw(st.integers(1, 2))
        cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
        kernel, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
        padding = draw(st.integers(0, dilation * (kernel - 1) // 2))
        output_padding = draw(st.integers(0, max(stride, dilation) - 1))
        kind = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
        layer = kind(
            cin,
            cout,
            kernel,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
        )
        spatial = draw(st.lists(st.integers(2, 4), min_size=dims, max_size=dims))
        return around(layer, torch.randn(draw(st.integers(1, 2)), cin, *spatial))

    return build


def padded_conv(dims: int) -> Callable[[Draw], Case]:
    def build(draw: Draw) -> Case:
        mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
        groups = draw(st.integers(1, 2))
        cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
        kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        padding = draw(st.integers(1, 2))
        kind = nn.Conv1d if dims == 1 else nn.Conv2d
        layer = kind(
            cin,
            cout,
            kernel,
            stride=draw(st.integers(1, 2)),
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
            padding_mode=mode,
        )
        spatial = draw(st.lists(st.integers(max(3, dilation * (kernel - 1) + 1), 6), min_size=dims, max_size=dims))
        return around(layer, torch.randn(draw(st.integers(1, 2)), cin, *spatial))

    return build


# --- resampling -------------------------------------------------------------------------------------


def upsample(mode: str) -> Callable[[Draw], Case]:
    return lambda draw: _upsample(mode, draw)


def _upsample(mode: str, draw: Draw) -> Case:
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if draw(st.booleans()):
        resize: dict[str, Any] = {"size": (draw(st.integers(1, 7)), draw(st.integers(1, 7)))}
    else:
        resize = {"scale_factor": draw(st.sampled_from([1, 2, 3, (2, 3)]))}
    if mode == "nearest":
        layer = nn.Upsample(mode="nearest", **resize)
    else:
        layer = nn.Upsample(mode="bilinear", align_corners=mode == "bilinear-corners", **resize)
    channels = draw(st.integers(1, 3))
    return around(layer, torch.randn(draw(st.integers(1, 2)), 2, h, w), before=nn.Conv2d(2, channels, 1))


def pixel_shuffle(draw: Draw) -> Case:
    r, c = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return around(nn.PixelShuffle(r), torch.randn(draw(st.integers(1, 2)), 2, h, w), before=nn.Conv2d(2, c * r * r, 1))


def _pool_options(draw: Draw, *, average: bool) -> dict[str, Any]:
    kernel = draw(st.integers(1, 3))
    options: dict[str, Any] = {
        "kernel_size": kernel,
        "stride": draw(st.sampled_from([None, 1, 2, 3])),
        "padding": draw(st.integers(0, kernel // 2)),
        "ceil_mode": draw(st.booleans()),
    }
    if average:
        options["count_include_pad"] = draw(st.booleans())
    else:
        options["dilation"] = draw(st.integers(1, 2))
    return options


def pool(kind: type[nn.Module], dims: int) -> Callable[[Draw], Case]:
    def build(draw: Draw) -> Case:
        options = _pool_options(draw, average=kind in (nn.AvgPool1d, nn.AvgPool3d))
        reach = options.get("dilation", 1) * (options["kernel_size"] - 1) + 1
        spatial = [draw(st.integers(reach, reach + 3 if dims == 1 else reach + 1)) for _ in range(dims)]
        conv = (nn.Conv1d if dims == 1 else nn.Conv3d)(2, 2, 1)
        return around(kind(**options), torch.randn(draw(st.integers(1, 2)), 2, *spatial), before=conv)

    return build


def adaptive_max_pool2d(draw: Draw) -> Case:
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    size = (draw(st.sampled_from([None, 1, 2, 3, 4])), draw(st.integers(1, 4)))
    return around(nn.AdaptiveMaxPool2d(size), torch.randn(draw(st.integers(1, 2)), 2, h, w), before=nn.Conv2d(2, 2, 1))


def embedding_bag(draw: Draw) -> Case:
    num, dim = draw(st.integers(3, 9)), draw(st.integers(1, 4))
    padding_idx = draw(st.sampled_from([None, 0, 1]))
    layer = nn.EmbeddingBag(num, dim, mode=draw(st.sampled_from(["sum", "mean", "max"])), padding_idx=padding_idx)
    ids = torch.randint(0, num, (draw(st.integers(1, 4)), draw(st.integers(1, 4))))
    return around(nn.Sequential(layer, nn.Linear(dim, 2)), ids)


# --- activations ------------------------------------------------------------------------------------


def activation(which: str) -> Callable[[Draw], Case]:
    return lambda draw: _activation(which, draw)


def _activation(which: str, draw: Draw) -> Case:
    inplace = draw(st.booleans())
    if which == "elu":
        layer: nn.Module = nn.ELU(alpha=draw(st.floats(0.1, 2.0)), inplace=inplace)
    elif which == "hardtanh":
        low = draw(st.floats(-2.0, -0.1))
        layer = nn.Hardtanh(low, draw(st.floats(0.1, 2.0)), inplace=inplace)
    elif which == "relu6":
        layer = nn.ReLU6(inplace=inplace)
    elif which == "hardswish":
        layer = nn.Hardswish(inplace=inplace)
    elif which == "softplus":
        layer = nn.Softplus(beta=draw(st.floats(0.5, 3.0)), threshold=draw(st.floats(1.0, 20.0)))
    elif which == "mish":
        layer = nn.Mish(inplace=inplace)
    elif which == "leaky_relu":
        layer = nn.LeakyReLU(draw(st.floats(0.0, 0.5)), inplace=inplace)
    else:
        layer = nn.GELU(approximate="tanh")
    features, width = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    # Scale the input so that the activations' kinks and saturated ranges (Hardtanh, ReLU6 at 6, Hardswish
    # at +-3, Softplus past its threshold) are all reached.
    inputs = 4 * torch.randn(draw(st.integers(1, 5)), features)
    return around(nn.Sequential(layer, nn.Linear(width, 2)), inputs, before=nn.Linear(features, width))


# --- recurrent --------------------------------------------------------------------------------------


def recurrent(kind: type[nn.RNNBase]) -> Callable[[Draw], Case]:
    return lambda draw: _recurrent(kind, draw)


def _recurrent(kind: type[nn.RNNBase], draw: Draw) -> Case:
    size, hidden = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    batch_first, bidirectional = draw(st.booleans()), draw(st.booleans())
    options: dict[str, Any] = {
        "num_layers": draw(st.integers(1, 2)),
        "bias": draw(st.booleans()),
        "batch_first": batch_first,
        "bidirectional": bidirectional,
    }
    if kind is nn.RNN:
        options["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    layer = Recurrent(kind(size, hidden, **options))
    seq, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    if draw(st.booleans()):
        shape: tuple[int, ...] = (seq, size)  # unbatched
    else:
        shape = (batch, seq, size) if batch_first else (seq, batch, size)
    return around(layer, torch.randn(*shape))


# --- losses -----------------------------------------------------------------------------------------


def loss(which: str) -> Callable[[Draw], Case]:
    return lambda draw: _loss(which, draw)


def _loss(which: str, draw: Draw) -> Case:
    n, classes, features = draw(st.integers(1, 5)), draw(st.integers(2, 5)), draw(st.integers(1, 4))
    inputs = torch.randn(n, features)
    model: nn.Module = nn.Linear(features, classes)
    reduction = draw(st.sampled_from(["mean", "sum"]))
    targets: Any = torch.randn(n, classes)
    if which == "l1":
        loss_fn: nn.Module = nn.L1Loss(reduction=reduction)
    elif which == "smooth_l1":
        loss_fn = nn.SmoothL1Loss(reduction=reduction, beta=draw(st.floats(0.1, 2.0)))
    elif which == "huber":
        loss_fn = nn.HuberLoss(reduction=reduction, delta=draw(st.floats(0.1, 2.0)))
    elif which == "kl_div":
        log_target = draw(st.booleans())
        model = nn.Sequential(model, nn.LogSoftmax(dim=1))
        targets = torch.randn(n, classes).log_softmax(1)
        targets = targets if log_target else targets.exp()
        kl_reduction = draw(st.sampled_from(["batchmean", "sum", "mean"]))
        loss_fn = nn.KLDivLoss(reduction=kl_reduction, log_target=log_target)
    elif which == "bce":
        model = nn.Sequential(model, nn.Sigmoid())
        targets = torch.rand(n, classes)
        weight = torch.rand(classes) + 0.5 if draw(st.booleans()) else None
        loss_fn = nn.BCELoss(weight=weight, reduction=reduction)
    elif which == "bce_logits":
        targets = torch.rand(n, classes)
        pos_weight = torch.rand(classes) * 3 if draw(st.booleans()) else None
        weight = torch.rand(classes) + 0.5 if draw(st.booleans()) else None
        loss_fn = nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight, reduction=reduction)
    else:
        targets = torch.randint(0, classes, (n,))
        ignore_index = draw(st.sampled_from([-100, 0]))
        # At least one target not ignored, so that a mean over the kept targets is defined.
        if (targets == ignore_index).all():
            targets[0] = 1
        weight = torch.rand(classes) + 0.5 if draw(st.booleans()) else None
        loss_fn = nn.CrossEntropyLoss(
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.3])),
            reduction=reduction,
        )
    return model, inputs, targets, loss_fn


# --- the test ---------------------------------------------------------------------------------------

FAMILIES: dict[str, Callable[[Draw], Case]] = {
    "GroupNorm": group_norm,
    "InstanceNorm1d": instance_norm(1),
    "InstanceNorm2d": instance_norm(2),
    "RMSNorm": rms_norm,
    "BatchNorm3d": batch_norm3d,
    "Conv3d": conv3d,
    "ConvTranspose1d": conv_transpose(1),
    "ConvTranspose2d": conv_transpose(2),
    "Conv1d-padding-mode": padded_conv(1),
    "Conv2d-padding-mode": padded_conv(2),
    "Upsample-nearest": upsample("nearest"),
    "Upsample-bilinear": upsample("bilinear"),
    "Upsample-bilinear-align-corners": upsample("bilinear-corners"),
    "PixelShuffle": pixel_shuffle,
    "MaxPool1d": pool(nn.MaxPool1d, 1),
    "MaxPool3d": pool(nn.MaxPool3d, 3),
    "AvgPool1d": pool(nn.AvgPool1d, 1),
    "AvgPool3d": pool(nn.AvgPool3d, 3),
    "AdaptiveMaxPool2d": adaptive_max_pool2d,
    "EmbeddingBag": embedding_bag,
    "ELU": activation("elu"),
    "Hardtanh": activation("hardtanh"),
    "ReLU6": activation("relu6"),
    "Hardswish": activation("hardswish"),
    "Softplus": activation("softplus"),
    "Mish": activation("mish"),
    "LeakyReLU": activation("leaky_relu"),
    "GELU-tanh": activation("gelu_tanh"),
    "Recurrent-RNN": recurrent(nn.RNN),
    "Recurrent-LSTM": recurrent(nn.LSTM),
    "Recurrent-GRU": recurrent(nn.GRU),
    "L1Loss": loss("l1"),
    "SmoothL1Loss": loss("smooth_l1"),
    "HuberLoss": loss("huber"),
    "KLDivLoss": loss("kl_div"),
    "BCELoss": loss("bce"),
    "BCEWithLogitsLoss": loss("bce_logits"),
    "CrossEntropyLoss": loss("cross_entropy"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", list(FAMILIES))
@SETTINGS
@given(data=st.data())
def test_reference_matches_autograd_on_random_shapes(family: str, dtype: torch.dtype, data: st.DataObject) -> None:
    seeded(data.draw)
    model, inputs, targets, loss_fn = FAMILIES[family](data.draw)
    check(model, inputs, targets, loss_fn, dtype)


# --- helpers ----------------------------------------------------------------------------------------


def _prod(sizes: list[int]) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _randomize(layer: nn.Module) -> None:
    # Away from the identity initialisation (weight 1, bias 0), so a swapped weight and bias would show.
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
