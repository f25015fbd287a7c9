"""Where a NaN came from: NaNs planted in known places are named at the right module and operation.

Each case is a tiny model ``inp -> bad -> head`` (or a variant) with one planted source of NaN/Inf,
located by ``scope.locate_nonfinite`` (a replay of the batch, or the armed next forward for a NaN
weight). The reference is the plant itself: the module path, the torch function (forward) or the
autograd node (backward). The input statistics are checked against numpy on the module's input,
captured independently with a forward hook. Every case also checks that the replay changed no
weight, buffer or ``.grad`` and that no hook or mode is left installed.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope
from gradscope.capture.nonfinite import LOSS, NonfiniteLocator, NonfiniteOrigin, tensor_stats


class EmitInf(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by +Inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x.clamp(min=0.0))  # log(0) = -inf where x <= 0


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)  # NaN where x < 0


class SqrtAtZero(nn.Module):
    def forward(self, x):
        return torch.sqrt(F.relu(x))  # finite forward; d sqrt / dx = inf at 0 in the backward


class UnitNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("gate", torch.zeros(8))

    def forward(self, x):
        x = x * self.gate  # a dead gate: every row is 0
        return x / x.norm(dim=-1, keepdim=True)  # 0 / 0


class Attention(nn.Module):
    """Softmax written by hand without subtracting the row maximum: exp overflows."""

    def __init__(self, scale: float = 1e3, causal: bool = False):
        super().__init__()
        self.q, self.k, self.scale = nn.Linear(8, 8), nn.Linear(8, 8), scale
        self.register_buffer("mask", torch.full((16, 16), float("-inf")).triu(1) if causal else torch.zeros(16, 16))

    def forward(self, x):
        s = self.q(x) @ self.k(x).T * self.scale + self.mask
        e = torch.exp(s) if self.scale > 1 else torch.softmax(s, dim=-1)
        return (e / e.sum(-1, keepdim=True) if self.scale > 1 else e) @ x


class Custom(nn.Module):
    def forward(self, x):
        return EmitInf.apply(x)


class Pow(nn.Module):
    def forward(self, x):
        return torch.pow(x * 10, 40)  # > 3.4e38 in float32


class Acos(nn.Module):
    def forward(self, x):
        return torch.acos(x * 3)  # NaN where |3x| > 1


class BatchNorm0(nn.Module):
    """Normalisation over the batch without an epsilon: a constant feature gives (x - mean) / 0 = 0 / 0."""

    def forward(self, x):
        return (x - x.mean(0)) / x.std(0)


class Net(nn.Module):
    def __init__(self, bad: nn.Module):
        super().__init__()
        self.inp, self.bad, self.head = nn.Linear(4, 8), bad, nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.bad(self.inp(x))) if isinstance(self.bad, Pow) else self.bad(self.inp(x)))


def _batch(seed: int = 0, *, inf: bool = False, same_rows: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    if same_rows:
        x = x[:1].repeat(16, 1)
    if inf:
        x[3, 1] = float("inf")
    return x, torch.randn(16, 1, generator=g)


def _mse(out, y):
    return F.mse_loss(out, y)


def _no_hooks_left(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert not m._backward_hooks and not m._backward_pre_hooks, name
    assert torch._C._len_torch_function_stack() == 0


def _snapshot(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.grad.clone() for p in model.parameters()]


def _unchanged(model: nn.Module, snap) -> None:
    state, grads = snap
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], equal_nan=True, rtol=0, atol=0)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, equal_nan=True, rtol=0, atol=0)


def _module_input(model: nn.Module, path: str, x: torch.Tensor) -> np.ndarray:
    """The module's input, captured with a plain forward hook (independent of the locator)."""
    seen = []
    h = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0].double().numpy()


# (name, bad module, batch kwargs, expected phase, module, operation, cause)
CASES = [
    ("log-of-0", Log(), {}, "forward", "bad", "log", "operation"),
    ("sqrt-of-negative", Sqrt(), {}, "forward", "bad", "sqrt", "operation"),
    ("division-by-zero-norm", UnitNorm(), {}, "forward", "bad", "div", "operation"),
    ("exp-overflow-in-attention", Attention(), {}, "forward", "bad", "exp", "operation"),
    ("custom-backward-emits-inf", Custom(), {}, "backward", "bad", "EmitInfBackward", "operation"),
    ("bad-batch", nn.ReLU(), {"inf": True}, "forward", "inp", "linear", "input"),
    ("pow-overflow", Pow(), {}, "forward", "bad", "pow", "operation"),
    ("acos-above-1", Acos(), {}, "forward", "bad", "acos", "operation"),
    ("std-of-a-constant", BatchNorm0(), {"same_rows": True}, "forward", "bad", "div", "operation"),
    ("sqrt-at-0-in-backward", SqrtAtZero(), {}, "backward", "bad", "SqrtBackward0", "operation"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_planted_nan_is_named_at_its_module_and_operation(case):
    name, bad, batch_kwargs, phase, path, op, cause = case
    torch.manual_seed(0)
    model = Net(bad)
    x, y = _batch(**batch_kwargs)
    _mse(model(x), y).backward()  # a real step's gradients: the replay must leave them as they are
    snap = _snapshot(model)
    with gradscope.watch(model) as scope:
        origin = scope.locate_nonfinite((x, y), _mse)
        _unchanged(model, snap)
        _no_hooks_left(model)
        assert isinstance(origin, NonfiniteOrigin)
        assert (origin.phase, origin.module, origin.operation, origin.cause) == (phase, path, op, cause)
        assert origin.module_type == type(model.get_submodule(path)).__name__
        # the input statistics against numpy on the module's input, captured independently
        ref = _module_input(model, path, x)
        fin = ref[np.isfinite(ref)]
        stats = origin.input_stats
        assert stats["shape"] == list(ref.shape) and stats["numel"] == ref.size
        assert stats["nonfinite"] == int((~np.isfinite(ref)).sum())
        assert stats["zeros"] == int((ref == 0).sum()) and stats["negatives"] == int((ref < 0).sum())
        assert stats["min"] == pytest.approx(float(fin.min()), rel=1e-6)
        assert stats["max"] == pytest.approx(float(fin.max()), rel=1e-6)
        assert path in origin.message and op in origin.message
        if name == "log-of-0":  # the operation's input is clamp(x, min=0): its zeros are where log gave -inf
            assert origin.operand_stats["zeros"] == int((ref <= 0).sum()) > 0
            assert origin.operand_stats["min"] == 0.0
        if name == "exp-overflow-in-attention":  # exp overflows float32 above log(3.4e38) = 88.7
            assert origin.operand_stats["max"] > 88.73
        # no gradscope finding existed: the locator's own nonfinite_gradients finding carries it
        found = [f for f in scope.report().findings if f.kind == "nonfinite_gradients"]
        assert len(found) == 1 and found[0].evidence["origin"] == origin.to_dict()
    _no_hooks_left(model)


def test_persistent_nan_weight_is_found_on_the_next_forward():
    torch.manual_seed(0)
    model = Net(nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with gradscope.watch(model, optimizer=opt) as scope:
        _mse(model(x), y).backward()
        opt.step()
        scope.step()
        opt.zero_grad()
        with torch.no_grad():
            model.head.weight[0, 3] = float("nan")  # the weights now hold a NaN
        _no_hooks_left(model)  # the default: nothing armed, no mode, no read
        assert scope._hooks.count(NonfiniteLocator.GROUP) == 0
        assert scope.locate_nonfinite() is None  # armed for the next forward
        assert model._forward_pre_hooks and model.head._forward_hooks
        out = model(x)  # the armed forward (the training loop's own)
        _no_hooks_left(model)  # removed after that one forward
        assert scope._hooks.count(NonfiniteLocator.GROUP) == 0
        origin = scope.locate_nonfinite()
        assert origin is not None
        assert (origin.phase, origin.module, origin.operation, origin.cause) == (
            "forward",
            "head",
            "linear",
            "parameter",
        )
        assert origin.parameter == "head.weight" and origin.step == 2
        assert origin.input_stats["nonfinite"] == 0  # head's input was finite: the weight is to blame
        assert not torch.isfinite(out).all()


def test_existing_finding_is_not_duplicated_and_origin_is_logged(caplog):
    torch.manual_seed(0)
    model = Net(Sqrt())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with gradscope.watch(model, optimizer=opt, on_nonfinite="raise") as scope:
        loss = _mse(model(x), y)
        loss.backward()
        with pytest.raises(gradscope.NonFiniteGradientError):
            opt.step()
        snap = _snapshot(model)
        with caplog.at_level(logging.WARNING, logger="gradscope"):
            origin = scope.locate_nonfinite((x, y), _mse)
        _unchanged(model, snap)
        assert (origin.module, origin.operation) == ("bad", "sqrt")
        found = [f for f in scope.report().findings if f.kind == "nonfinite_gradients"]
        # one NaN, one finding: the origin is added to the finding the rule confirmed (issue 17: the
        # report and the JSON show it), and logged
        assert len(found) == 1 and found[0].evidence["origin"] == origin.to_dict()
        assert found[0].message.endswith(origin.message) and found[0].step == 1
        assert any("sqrt" in r.getMessage() for r in caplog.records)


def test_masks_on_purpose_and_healthy_batches_name_nothing():
    torch.manual_seed(0)
    model = Net(Attention(scale=1.0, causal=True))  # -inf causal mask buffer, max-subtracting softmax
    x, y = _batch()
    with gradscope.watch(model) as scope:
        assert scope.locate_nonfinite((x, y), _mse) is None
        assert not scope.report().findings
    _no_hooks_left(model)


class Encoder(nn.Module):
    """A transformer encoder layer under an additive causal mask kept as a plain attribute (not a buffer)."""

    def __init__(self):
        super().__init__()
        self.inp, self.layer, self.head = (
            nn.Linear(4, 8),
            nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True),
            nn.Linear(8, 1),
        )
        self.mask = nn.Transformer.generate_square_subsequent_mask(16)

    def forward(self, x):
        return self.head(self.layer(self.inp(x)[None], src_mask=self.mask)[0])


def test_transformer_with_a_causal_mask_names_nothing_until_a_nan_is_planted():
    torch.manual_seed(0)
    model = Encoder()
    x, y = _batch()
    with gradscope.watch(model) as scope:
        assert scope.locate_nonfinite((x, y), _mse) is None
        with torch.no_grad():
            model.layer.linear1.bias[2] = float("inf")
        origin = scope.locate_nonfinite((x, y), _mse)
    assert (origin.module, origin.operation, origin.cause) == ("layer.linear1", "linear", "parameter")
    assert origin.parameter == "layer.linear1.bias"
    _no_hooks_left(model)


def test_loss_function_origin_and_stats_reference():
    torch.manual_seed(0)
    model = Net(nn.Identity())
    x, y = _batch()
    with gradscope.watch(model) as scope:
        origin = scope.locate_nonfinite((x, y), lambda out, t: torch.log(out - out.max()).mean())
    assert (origin.module, origin.operation, origin.module_type) == (LOSS, "log", "loss_fn")
    t = torch.tensor([0.0, -1.5, 2.0, float("nan"), float("inf"), -float("inf")])
    s = tensor_stats(t)
    assert (s["min"], s["max"], s["zeros"], s["negatives"], s["nan"], s["posinf"], s["neginf"]) == (
        -1.5, 2.0, 1, 2, 1, 1, 1,
    )  # fmt: skip


def test_bad_arguments_are_named():
    model = Net(nn.Identity())
    with gradscope.watch(model) as scope:
        with pytest.raises(gradscope.ConfigurationError, match="loss_fn"):
            scope.locate_nonfinite(_batch())
        with pytest.raises(gradscope.ConfigurationError, match="batch"):
            scope.locate_nonfinite(torch.zeros(3), _mse)


class InPlace(nn.Module):
    """Uninitialised memory filled with NaN, then overwritten, then an in-place log of values <= 0."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 8)

    def forward(self, x):
        buf = torch.empty(x.shape[0], 8).fill_(float("nan"))
        buf.copy_(self.l(x))
        return buf.log_()


def test_in_place_operations_and_uninitialised_memory():
    torch.manual_seed(0)
    model = InPlace()
    x, y = torch.randn(16, 4), torch.randn(16, 8)
    with gradscope.watch(model) as scope:
        origin = scope.locate_nonfinite((x, y), _mse)
    assert (origin.module, origin.module_type, origin.operation, origin.cause) == ("", "InPlace", "log_", "operation")


def test_a_failing_replay_leaves_nothing_installed():
    model = Net(Log())

    def broken(out, t):
        raise ValueError("loss_fn failed")

    with gradscope.watch(model) as scope:
        with pytest.raises(ValueError, match="loss_fn failed"):
            scope.locate_nonfinite(_batch(), broken)
        _no_hooks_left(model)


class Uncopyable(Net):
    """A model deepcopy refuses (a lock among its attributes), with BatchNorm running statistics."""

    def __init__(self):
        super().__init__(Sqrt())
        self.norm = nn.BatchNorm1d(8)
        self.lock = threading.Lock()

    def forward(self, x):
        return self.head(self.bad(self.norm(self.inp(x))))


def test_a_model_that_cannot_be_copied_is_replayed_itself_and_left_as_it_was():
    torch.manual_seed(0)
    model = Uncopyable()
    x, y = _batch()
    _mse(model(x), y).backward()
    snap = _snapshot(model)
    with gradscope.watch(model) as scope:
        origin = scope.locate_nonfinite((x, y), _mse)
        _unchanged(model, snap)  # BatchNorm's running statistics included
        _no_hooks_left(model)
    assert (origin.module, origin.operation) == ("bad", "sqrt")


def test_replay_inside_the_steps_autocast_finds_a_float16_overflow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    x, y = torch.randn(16, 4) * 3e4, torch.randn(16, 1)  # |x @ W.T| > 65504, the float16 maximum
    with gradscope.watch(model) as scope:
        assert scope.locate_nonfinite((x, y), _mse) is None  # finite in float32
        with torch.autocast("cpu", dtype=torch.float16):
            origin = scope.locate_nonfinite((x, y), lambda out, t: _mse(out.float(), t))
    assert (origin.module, origin.operation, origin.cause) == ("0", "linear", "operation")
    assert origin.input_stats["max"] > 65504


def test_closing_an_armed_scope_removes_its_checks():
    model = Net(nn.Tanh())
    with gradscope.watch(model) as scope:
        assert scope.locate_nonfinite() is None
        assert model.inp._forward_pre_hooks
    _no_hooks_left(model)
    with pytest.raises(gradscope.ConfigurationError, match="closed"):
        scope.locate_nonfinite()
