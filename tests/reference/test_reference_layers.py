"""Every reference layer and loss option against autograd in float64 (the micrograd mirror test).

Two independent checks per case: manual_backward's gradients against a plain ``loss.backward()`` on
the same model, and gradscope.verify's own verdict, which must agree on every gradient.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from reference_cases import CASES, build
from torch import nn

import gradscope
from gradscope.reference import manual_backward
from gradscope.reference.embedding import EmbeddingBagReference
from gradscope.registry import REFERENCES

RTOL = 1e-10
ATOL = 1e-12  # for gradients that are zero in exact arithmetic (a bias before BatchNorm)


def autograd_gradients(model, inputs, targets, loss_fn):
    """Plain autograd on a copy: parameter gradients, input gradient, and the Dropout masks it drew."""
    model = copy.deepcopy(model)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
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


@pytest.mark.parametrize(
    ("dropout", "shape"),
    [(nn.Dropout1d(0.4), (3, 4, 6)), (nn.Dropout2d(0.5), (3, 4, 3, 3)), (nn.Dropout3d(0.3), (2, 4, 2, 3, 2))],
    ids=["1d", "2d", "3d"],
)
def test_channel_dropout_in_training_with_the_drawn_masks(dropout, shape):
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(shape)](shape[1], 4, 1)
    torch.manual_seed(3)
    model = nn.Sequential(conv, dropout, nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(shape))
    model = model.double().train()
    inputs, targets = torch.randn(shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    loss, expected, input_grad, masks = autograd_gradients(model, inputs, targets, nn.CrossEntropyLoss())
    # Whole channels are dropped: the mask is constant over each (sample, channel).
    mask = masks["1"].flatten(2)
    assert (mask.all(2) | ~mask.any(2)).all() and not mask.all()
    result = manual_backward(model, inputs, targets, nn.CrossEntropyLoss(), masks=masks)
    expected["(input)"], got = input_grad, {**result.param_grads, "(input)": result.input_grads[("", 0)]}
    assert not mismatches(got, expected)
    assert torch.allclose(result.loss, loss, rtol=RTOL, atol=0)


def _bag_autograd(bag, indices, offsets, per_sample_weights, grad):
    """EmbeddingBag's gradients by autograd; with scale_grad_by_freq through F.embedding, whose frequency
    scaling follows the documentation (PyTorch 2.13's CPU embedding_bag kernel divides some rows by another
    index's count, pytorch/pytorch#190063)."""
    weight = bag.weight.detach().clone().requires_grad_(True)
    psw = per_sample_weights.clone().requires_grad_(True) if per_sample_weights is not None else None
    if not bag.scale_grad_by_freq:
        out = nn.functional.embedding_bag(
            indices, weight, offsets, mode=bag.mode, per_sample_weights=psw,
            include_last_offset=bag.include_last_offset, padding_idx=bag.padding_idx,
        )  # fmt: skip
    else:
        rows = nn.functional.embedding(indices.reshape(-1), weight, scale_grad_by_freq=True)
        bags = indices.reshape(indices.shape[0], -1) if offsets is None else None
        assert bags is not None and bag.padding_idx is None
        rows = rows.reshape(*bags.shape, -1)
        if psw is not None:
            rows = rows * psw[..., None]
        out = rows.sum(1) if bag.mode == "sum" else rows.mean(1)
    wanted = [weight] + ([psw] if psw is not None else [])
    return out.detach(), torch.autograd.grad(out, wanted, grad)


@pytest.mark.parametrize(
    ("mode", "padding_idx", "last_offset", "weighted", "two_d", "freq"),
    [
        (mode, pad, last, weighted, two_d, freq)
        for mode, pad, last, weighted, two_d, freq in itertools.product(
            ["sum", "mean", "max"], [None, 2], [False, True], [False, True], [False, True], [False, True]
        )
        if not (weighted and mode != "sum")
        and not (two_d and last)
        and not (freq and (mode == "max" or pad or not two_d))
    ],
)
def test_embedding_bag_offsets_and_per_sample_weights(mode, padding_idx, last_offset, weighted, two_d, freq):
    torch.manual_seed(5)
    bag = nn.EmbeddingBag(
        7, 3, mode=mode, padding_idx=padding_idx, include_last_offset=last_offset, scale_grad_by_freq=freq
    ).double()
    if two_d:
        indices, offsets = torch.randint(0, 7, (4, 3)), None
    else:
        indices = torch.randint(0, 7, (10,))
        offsets = torch.tensor([0, 3, 3, 6] + ([10] if last_offset else []))  # an empty bag; the end as documented
    psw = torch.randn(indices.shape, dtype=torch.float64) if weighted else None
    bag_grad = torch.randn(4, 3, dtype=torch.float64)
    want, grads = _bag_autograd(bag, indices, offsets, psw, bag_grad)
    with torch.no_grad():
        reference = EmbeddingBagReference(bag)
        got = reference.forward(indices, offsets, psw)
        _, param_grads = reference.backward(bag_grad)
    assert torch.allclose(got, want, rtol=RTOL, atol=0)
    assert torch.allclose(param_grads["weight"], grads[0], rtol=RTOL, atol=ATOL)
    if weighted:
        assert torch.allclose(reference.grad_per_sample_weights, grads[1], rtol=RTOL, atol=ATOL)


# --- planted bugs: one wrong element in a reference's backward, caught and named by verify -----------------
PLANTED = {
    "norm": (nn.GroupNorm, "groupnorm"),
    "instance-norm": (nn.InstanceNorm2d, "instancenorm2d-affine"),
    "rms-norm": (nn.RMSNorm, "rmsnorm"),
    "conv-padding-mode": (nn.Conv2d, "conv2d-reflect"),
    "conv3d": (nn.Conv3d, "conv3d"),
    "conv-transpose": (nn.ConvTranspose2d, "conv-transpose2d-groups-dilation"),
    "pooling-1d": (nn.MaxPool1d, "maxpool1d"),
    "pooling-3d": (nn.AvgPool3d, "avgpool3d"),
    "adaptive-max": (nn.AdaptiveMaxPool2d, "adaptive-maxpool2d-relu-ties"),
    "upsample": (nn.Upsample, "upsample-bilinear"),
    "pixel-shuffle": (nn.PixelShuffle, "upsample-pixel-shuffle"),
    "embedding-bag": (nn.EmbeddingBag, "embedding-bag-mean"),
    "activation": (nn.Mish, "mish"),
    "activation-inplace": (nn.Hardtanh, "hardtanh-inplace"),
}


@pytest.mark.parametrize("family", sorted(PLANTED))
@pytest.mark.parametrize("target", ["input", "parameter"])
def test_a_planted_one_element_bug_is_caught_and_named(monkeypatch, family, target):
    module_type, case_id = PLANTED[family]
    model, inputs, targets = build(next(c for c in CASES if c["id"] == case_id))
    path = next(name for name, m in model.named_modules() if type(m) is module_type)
    has_params = any(True for _ in model.get_submodule(path).parameters(recurse=False))
    if target == "parameter" and not has_params:
        pytest.skip(f"{module_type.__name__} has no parameters here")
    if target == "input" and inputs.dtype == torch.long and path == "0":
        pytest.skip("the first layer's input is token indices")
    cls = REFERENCES.get(module_type)
    original = cls.backward

    def planted(self, grad_out):
        grad_in, grads = original(self, grad_out)
        if target == "input":
            grad_in = grad_in.clone()
            grad_in.view(-1)[grad_in.numel() // 3] += 1.0 + grad_in.abs().max()
        else:
            name = sorted(grads)[0]
            grads = {**grads, name: grads[name].clone()}
            grads[name].view(-1)[0] += 1.0 + grads[name].abs().max()
        return grad_in, grads

    monkeypatch.setattr(cls, "backward", planted)
    report = gradscope.verify(model, inputs, targets, nn.CrossEntropyLoss())
    assert not report.ok
    first = report.first_mismatch
    if target == "input":
        assert (first.kind, first.name) == ("input", path)
    else:
        assert first.kind == "parameter" and first.name.startswith(path + ".")
