"""Every loss reference and option against autograd in float64, on random shapes: value and d loss / d output.

``reduction="none"`` is checked too: the reference returns the unreduced loss and the gradient of its
sum, which autograd gives as the vector-Jacobian product with ones.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradscope.errors import ConfigurationError
from gradscope.reference.losses import resolve_loss

D = torch.float64
RTOL = 1e-10
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None)
REDUCTIONS = ["mean", "sum", "none"]


def _check(loss_fn: Callable[..., torch.Tensor], output: torch.Tensor, target: Any) -> None:
    """The reference's loss and gradient equal autograd's to RTOL."""
    reference = resolve_loss(loss_fn) if getattr(loss_fn, "reduction", "mean") != "none" else None
    if reference is None:  # reduction="none": resolve_loss refuses it, so build the reference directly
        from gradscope.registry import REFERENCES

        reference = REFERENCES.get(type(loss_fn))(loss_fn)
    x = output.clone().requires_grad_(True)
    want = loss_fn(x, target)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    with torch.no_grad():
        got = reference.forward(output, target)
        got_grad = reference.backward()
    assert got.shape == want.shape
    scale = max(want.abs().max().item(), 1e-300)
    assert (got - want).abs().max().item() <= RTOL * scale, (got, want)
    gscale = max(want_grad.abs().max().item(), got_grad.abs().max().item())
    assert (got_grad - want_grad).abs().max().item() <= RTOL * gscale + 1e-15, (got_grad - want_grad).abs().max()


def _shape(data: st.DataObject) -> tuple[int, ...]:
    return tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_cross_entropy_every_option(data, seed):
    torch.manual_seed(seed)
    n, classes = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 5))
    spatial = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    logits = torch.randn(n, classes, *spatial, dtype=D) * 3
    target = torch.randint(0, classes, (n, *spatial))
    ignore = data.draw(st.sampled_from([-100, 0, classes - 1]))
    if ignore != -100 or data.draw(st.booleans()):
        target.view(-1)[0] = ignore if ignore != -100 else -100
    for reduction in REDUCTIONS:
        for weight in (None, torch.rand(classes, dtype=D) + 0.2):
            for smoothing in (0.0, 0.2):
                loss = nn.CrossEntropyLoss(
                    weight=weight, ignore_index=ignore, label_smoothing=smoothing, reduction=reduction
                )
                if reduction == "mean" and (target != ignore).sum() == 0:
                    continue  # 0 / 0: no loss to compare
                _check(loss, logits, target)
    probabilities = torch.softmax(torch.randn(n, classes, *spatial, dtype=D), 1)
    for reduction in REDUCTIONS:
        _check(nn.CrossEntropyLoss(weight=torch.rand(classes, dtype=D), label_smoothing=0.1, reduction=reduction),
               logits, probabilities)  # fmt: skip


def test_cross_entropy_unbatched_none():
    logits = torch.randn(4, dtype=D)
    _check(nn.CrossEntropyLoss(reduction="none", label_smoothing=0.3), logits, torch.tensor(2))


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_nll_and_regression_losses(data, seed):
    torch.manual_seed(seed)
    shape = _shape(data)
    output, target = torch.randn(shape, dtype=D) * 2, torch.randn(shape, dtype=D) * 2
    beta = data.draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    delta = data.draw(st.sampled_from([0.1, 1.0, 2.5]))
    for reduction in REDUCTIONS:
        _check(nn.MSELoss(reduction=reduction), output, target)
        _check(nn.L1Loss(reduction=reduction), output, target)
        _check(nn.SmoothL1Loss(reduction=reduction, beta=beta), output, target)
        _check(nn.HuberLoss(reduction=reduction, delta=delta), output, target)
        log_probs = torch.log_softmax(output.reshape(shape[0], -1), 1)
        classes = log_probs.shape[1]
        _check(nn.NLLLoss(weight=torch.rand(classes, dtype=D), reduction=reduction), log_probs,
               torch.randint(0, classes, (shape[0],)))  # fmt: skip


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_kl_divergence(data, seed):
    torch.manual_seed(seed)
    n, classes = data.draw(st.integers(1, 5)), data.draw(st.integers(2, 5))
    log_probs = torch.log_softmax(torch.randn(n, classes, dtype=D), 1)
    q = torch.softmax(torch.randn(n, classes, dtype=D), 1)
    q[0, 0] = 0.0  # a zero target entry: q log q is taken as 0
    for reduction in ["batchmean", *REDUCTIONS]:
        _check(nn.KLDivLoss(reduction=reduction), log_probs, q)
        _check(
            nn.KLDivLoss(reduction=reduction, log_target=True),
            log_probs,
            torch.log_softmax(torch.randn(n, classes, dtype=D), 1),
        )


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_binary_cross_entropies(data, seed):
    torch.manual_seed(seed)
    shape = _shape(data)
    logits = torch.randn(shape, dtype=D) * 3
    target = torch.rand(shape, dtype=D)
    if data.draw(st.booleans()):
        target = target.round()  # hard labels
    last = shape[-1]
    for reduction in REDUCTIONS:
        for weight in (None, torch.rand(last, dtype=D) + 0.1):
            _check(nn.BCELoss(weight=weight, reduction=reduction), torch.sigmoid(logits), target)
            for pos_weight in (None, torch.rand(last, dtype=D) * 3):
                _check(nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight, reduction=reduction), logits, target)


def test_bce_saturated_probabilities_follow_pytorchs_clamps():
    p = torch.tensor([0.0, 1.0, 1e-30, 1 - 1e-16, 0.5], dtype=D)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=D)
    _check(nn.BCELoss(reduction="sum"), p, t)


@pytest.mark.parametrize(
    ("function", "module"),
    [
        (F.l1_loss, nn.L1Loss),
        (functools.partial(F.smooth_l1_loss, beta=0.3), nn.SmoothL1Loss),
        (functools.partial(F.huber_loss, delta=0.7, reduction="sum"), nn.HuberLoss),
        (functools.partial(F.kl_div, reduction="batchmean", log_target=True), nn.KLDivLoss),
        (F.binary_cross_entropy, nn.BCELoss),
    ],
)
def test_functional_losses_resolve_to_their_module(function, module):
    reference = resolve_loss(function)
    assert reference is not None and type(reference.loss) is module
    for name, value in getattr(function, "keywords", {}).items():
        assert getattr(reference.loss, name) == value


def test_reduction_none_is_refused_for_verify():
    with pytest.raises(ConfigurationError, match=r"reduction='none'.*Use reduction='mean' or 'sum'"):
        resolve_loss(nn.HuberLoss(reduction="none"))


# --- planted bugs: a one-element error in a loss gradient is caught by the comparison above ---------------
@pytest.mark.parametrize(
    ("loss", "output", "target"),
    [
        (nn.CrossEntropyLoss(label_smoothing=0.1, weight=torch.rand(4, dtype=D) + 0.5), torch.randn(5, 4, dtype=D),
         torch.tensor([0, 1, 2, 3, -100])),
        (nn.SmoothL1Loss(beta=0.5), torch.randn(6, 3, dtype=D), torch.randn(6, 3, dtype=D)),
        (nn.HuberLoss(delta=0.5), torch.randn(6, 3, dtype=D), torch.randn(6, 3, dtype=D)),
        (nn.L1Loss(), torch.randn(6, 3, dtype=D), torch.randn(6, 3, dtype=D)),
        (nn.KLDivLoss(reduction="batchmean"), torch.log_softmax(torch.randn(4, 3, dtype=D), 1),
         torch.softmax(torch.randn(4, 3, dtype=D), 1)),
        (nn.BCELoss(), torch.rand(5, 2, dtype=D), torch.rand(5, 2, dtype=D)),
        (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 0.5], dtype=D)), torch.randn(5, 2, dtype=D),
         torch.rand(5, 2, dtype=D)),
    ],
    ids=["cross-entropy", "smooth-l1", "huber", "l1", "kl-div", "bce", "bce-with-logits"],
)  # fmt: skip
def test_a_planted_one_element_error_in_a_loss_gradient_is_caught(monkeypatch, loss, output, target):
    cls = type(resolve_loss(loss))
    original = cls.backward

    def wrong(self):
        grad = original(self).clone()
        grad.view(-1)[grad.numel() // 2] *= -1  # one sign flip
        return grad

    _check(loss, output, target)
    monkeypatch.setattr(cls, "backward", wrong)
    with pytest.raises(AssertionError):
        _check(loss, output, target)
