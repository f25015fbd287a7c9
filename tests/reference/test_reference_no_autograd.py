"""The reference pass never uses autograd: it runs with grad mode off, and nothing it returns has a graph."""

from __future__ import annotations

import pytest
import torch
from reference_cases import CASES, build
from torch import nn

import gradscope
from gradscope.reference import ReferenceLayer, manual_backward
from gradscope.registry import REFERENCES


def _tensors(result):
    yield "loss", result.loss
    yield "output", result.output
    yield "output_grad", result.output_grad
    yield from (("param " + n, t) for n, t in result.param_grads.items())
    yield from (("input " + str(k), t) for k, t in result.input_grads.items())
    yield from (("forward " + str(k), t) for k, t in result.outputs.items())


@pytest.mark.parametrize("case", [c for c in CASES if c["id"] != "unknown-loss-callable"], ids=lambda c: c["id"])
def test_no_reference_tensor_requires_grad(case):
    model, inputs, targets = build(case)
    # Everything autograd could track requires grad: the parameters, and the input when it is float.
    assert all(p.requires_grad for p in model.parameters())
    inputs = inputs.requires_grad_(inputs.is_floating_point())
    result = manual_backward(model, inputs, targets, case["loss"], masks=_all_kept(model, inputs))

    attached = [name for name, t in _tensors(result) if t.requires_grad or t.grad_fn is not None]
    assert not attached, f"tensors attached to an autograd graph: {attached}"
    assert result.loss_method == "reference"


def _all_kept(model, inputs):
    """Keep masks of all ones for every Dropout, found by a float forward (shapes only)."""
    masks = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, name=name: masks.__setitem__(name, torch.ones_like(out, dtype=torch.bool))
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd)
    ]
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    return masks


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        return x * self.weight


@pytest.fixture
def scale_reference():
    """A reference that records the grad mode it ran in; optionally cheats by enabling autograd."""
    seen = []

    class ScaleReference(ReferenceLayer):
        cheat = False

        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            self.x = x
            if self.cheat:
                with torch.enable_grad():
                    return x * self.module.weight
            return x * self.module.weight

        def backward(self, grad_out):
            seen.append(torch.is_grad_enabled())
            return grad_out * self.module.weight, {"weight": (grad_out * self.x).sum()}

    gradscope.register_reference(Scale)(ScaleReference)
    yield ScaleReference, seen
    REFERENCES.unregister(Scale)


def test_references_run_with_grad_mode_off(scale_reference):
    _, seen = scale_reference
    model = nn.Sequential(nn.Linear(3, 3), Scale()).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    result = manual_backward(model, x, y, nn.MSELoss())
    assert seen == [False, False]
    assert torch.is_grad_enabled()  # and the caller's grad mode is restored
    assert result.param_grads["1.weight"].shape == ()


def test_a_reference_that_uses_autograd_is_rejected(scale_reference):
    reference, _ = scale_reference
    reference.cheat = True
    model = nn.Sequential(nn.Linear(3, 3), Scale()).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="The output of the reference for '1' is attached to an autograd graph"):
        manual_backward(model, x, y, nn.MSELoss())


def test_an_input_that_requires_grad_is_read_as_a_value():
    model = nn.Sequential(nn.Identity(), nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    result = manual_backward(model, x, torch.randn(4, 2, dtype=torch.float64), nn.MSELoss())
    assert not result.outputs[("0", 0)].requires_grad and x.grad is None
