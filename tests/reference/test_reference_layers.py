"""Every reference layer and loss option against autograd in float64 (the micrograd mirror test).

Two independent checks per case: manual_backward's gradients against a plain ``loss.backward()`` on
the same model, and gradscope.verify's own verdict, which must agree on every gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference_cases import CASES, build
from torch import nn

import gradscope
from gradscope.reference import manual_backward

RTOL = 1e-10
ATOL = 1e-12  # for gradients that are zero in exact arithmetic (a bias before BatchNorm)


def autograd_gradients(model, inputs, targets, loss_fn):
    """Plain autograd on a copy: parameter gradients, input gradient, and the Dropout masks it drew."""
    model = copy.deepcopy(model)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            module.register_forward_hook(lambda m, a, out, name=name: masks.__setitem__(name, out != 0))
    x = inputs.clone().requires_grad_(inputs.is_floating_point())
    loss = loss_fn(model(x), targets)
    loss.backward()
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in model.named_parameters()}
    return loss.detach(), grads, (x.grad if x.requires_grad else None), masks


def mismatches(reference, expected):
    """Every entry that differs beyond RTOL (relative to the larger magnitude) and ATOL."""
    bad = []
    for name, want in expected.items():
        got = reference.get(name)
        if got is None:
            bad.append(f"{name}: missing from the reference")
            continue
        err = (got - want).abs().max().item()
        scale = max(got.abs().max().item(), want.abs().max().item())
        if err > ATOL + RTOL * scale:
            bad.append(f"{name}: max abs err {err:.3g}, scale {scale:.3g}")
    return bad


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_manual_backward_matches_autograd(case):
    model, inputs, targets = build(case)
    loss, expected, input_grad, masks = autograd_gradients(model, inputs, targets, case["loss"])
    result = manual_backward(model, inputs, targets, case["loss"], masks=masks)

    got = dict(result.param_grads)
    if input_grad is not None:
        expected["(input)"], got["(input)"] = input_grad, result.input_grads[("", 0)]
    bad = mismatches(got, expected)
    assert not bad, "reference and autograd disagree:\n" + "\n".join(bad)
    assert torch.allclose(result.loss, loss, rtol=RTOL, atol=0)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_verify_agrees(case):
    model, inputs, targets = build(case)
    report = gradscope.verify(model, inputs, targets, case["loss"])

    assert report.ok, str(report)
    compared = {c.name for c in report.comparisons if c.kind == "parameter"}
    assert compared == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(c.method == "reference" for c in report.gradients)
    assert report.rtol == RTOL
