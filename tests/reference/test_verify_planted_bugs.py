"""Bugs people actually hit, planted on purpose: verify must catch each and name the layer.

(a) a custom autograd.Function whose backward forgets a term of the product rule;
(b) hooks that rescale gradients (a module backward hook, a parameter hook);
(c) an in-place write through ``.data`` into a tensor autograd saved for backward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.reference import ReferenceLayer
from gradscope.reference.activations import SiLUReference
from gradscope.registry import REFERENCES

D = torch.float64


class _SwishFunction(torch.autograd.Function):
    """swish(x) = x σ(x), with a hand-written backward that forgets the x σ (1 - σ) term."""

    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(s)
        return x * s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad * s  # BUG: d(x σ)/dx = σ + x σ (1 - σ)


class Swish(nn.Module):
    def forward(self, x):
        return _SwishFunction.apply(x)


class SwishReference(ReferenceLayer):
    """The user's reference for Swish: y = x σ(x), dy/dx = σ (1 + x (1 - σ))."""

    def forward(self, x):
        self.x, self.s = x, torch.sigmoid(x)
        return x * self.s

    def backward(self, grad_out):
        return grad_out * self.s * (1 + self.x * (1 - self.s)), {}


class SigmoidGate(nn.Module):
    """x σ(x), then the gate is clamped in place through .data, which autograd's version counter misses."""

    def forward(self, x):
        s = torch.sigmoid(x)  # autograd saves s for the backward of sigmoid and of the product
        y = x * s
        s.data.clamp_(0.05, 0.95)  # BUG: corrupts the saved s; the forward value y is already computed
        return y


@pytest.fixture
def registered():
    """Register references for the test's modules, and remove them afterwards."""
    added = []

    def register(module_type, reference):
        gradscope.register_reference(module_type)(reference)
        added.append(module_type)

    yield register
    for module_type in added:
        REFERENCES.unregister(module_type)


def _mlp(middle: nn.Module, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), middle, nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(scale)
    return model


def _batch():
    torch.manual_seed(1)
    return torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))


def _names(report):
    return {(c.kind, c.name) for c in report.mismatches}


def test_wrong_custom_backward_is_named(registered):
    registered(Swish, SwishReference)
    model = _mlp(Swish())
    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())

    assert not report.ok
    assert report.first_mismatch.kind == "input" and report.first_mismatch.name == "1"
    # Downstream of the bug everything agrees; the bug and everything upstream of it differs.
    assert _names(report) == {
        ("input", "1"),
        ("input", "0"),
        ("input", "(model)"),
        ("parameter", "0.weight"),
        ("parameter", "0.bias"),
    }
    assert "The disagreement starts at layer '1'" in str(report)


def test_backward_hook_that_rescales_is_named():
    model = _mlp(nn.Tanh())
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 0.5,))
    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())

    assert not report.ok
    assert (report.first_mismatch.kind, report.first_mismatch.name) == ("input", "2")
    assert ("parameter", "2.weight") not in _names(report)  # the layer's own weight gradient is right
    assert {("parameter", "0.weight"), ("parameter", "0.bias"), ("input", "1")} <= _names(report)


def test_parameter_hook_that_rescales_is_named():
    model = _mlp(nn.ReLU())
    handle = model[0].weight.register_hook(lambda grad: grad * 10)
    report = gradscope.verify(model, _batch()[0], torch.randn(8, 3, dtype=D), nn.MSELoss())

    assert _names(report) == {("parameter", "0.weight")}
    assert report.first_mismatch.name == "0.weight"
    handle.remove()
    assert gradscope.verify(model, _batch()[0], torch.randn(8, 3, dtype=D), nn.MSELoss()).ok


def test_inplace_write_into_saved_tensor_is_named(registered):
    registered(SigmoidGate, SiLUReference)  # its math is SiLU's, so SiLU's reference applies
    model = _mlp(SigmoidGate(), scale=4.0)  # large pre-activations: some gates leave [0.05, 0.95]
    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())

    assert not report.ok
    assert (report.first_mismatch.kind, report.first_mismatch.name) == ("input", "1")
    forward = [c for c in report.comparisons if c.kind == "forward"]
    assert forward and all(c.ok for c in forward)  # the forward is right; only the saved tensor is wrong


def test_all_mismatches_are_listed_at_once(registered):
    registered(Swish, SwishReference)
    model = _mlp(Swish())
    model[0].bias.register_hook(lambda grad: grad + 1.0)
    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())

    text = str(report)
    for c in report.mismatches:
        assert f"{c.name} " in text
    assert text.count("MISMATCH") == len(report.mismatches) == 5
    with pytest.raises(gradscope.GradientHealthError, match=r"0\.bias"):
        report.raise_for_status()


def test_finite_difference_catches_a_bug_in_a_module_without_reference():
    model = _mlp(Swish())  # no reference registered: the module is checked numerically
    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss(), on_unsupported="finite_difference")

    assert not report.ok
    first = report.first_mismatch
    assert (first.kind, first.name, first.method) == ("input", "1", "finite_difference")


def test_a_tiny_loss_scale_does_not_hide_a_bug():
    # The default atol follows the model's own gradient scale, so a loss of order 1e-15 is checked as strictly.
    model = _mlp(nn.Tanh())
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 1.001,))
    report = gradscope.verify(model, *_batch(), lambda out, target: 1e-15 * nn.functional.cross_entropy(out, target))
    assert report.loss_method == "autograd"
    assert (report.first_mismatch.kind, report.first_mismatch.name) == ("input", "2")
