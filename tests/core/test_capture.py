"""The capture pieces on their own: the buffer's public row methods, the forward order, the step in progress.

The buffer is checked against a hand-built tensor (each entry's value says where it belongs); the
forward order against a model whose registration order is not its forward order; a flush while a
sampled step is in progress against statistics computed by hand on the same batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.capture.hooks import HookManager
from gradscope.capture.layout import ParamLayout
from gradscope.capture.order import ForwardOrder
from gradscope.stats.buffer import StatsBuffer

from .helpers import np_stats, value

P, C, A, K, S = 3, 4, 2, 3, 5  # params, moment columns, activation modules, activation columns, scalars


def _buffer(rows: int) -> tuple[StatsBuffer, np.ndarray]:
    """A buffer with ``rows`` claimed rows whose entries are 1000 * row + column, and the same on the host."""
    buf = StatsBuffer(
        capacity=rows + 1, n_params=P, n_cols=C, n_act=A, n_act_cols=K, n_scalars=S, device=torch.device("cpu")
    )
    width = P * C + A * K + S
    host = 1000.0 * np.arange(rows)[:, None] + np.arange(width)[None, :]
    for r in range(rows):
        slot = buf.claim()
        buf.moments(slot).copy_(torch.from_numpy(host[r, : P * C].reshape(P, C)))
        buf.activations(slot).copy_(torch.from_numpy(host[r, P * C : P * C + A * K].reshape(A, K)))
        buf.scalars(slot).copy_(torch.from_numpy(host[r, P * C + A * K :]))
    return buf, host


def _split(host: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = host.shape[0]
    return (
        host[:, : P * C].reshape(n, P, C),
        host[:, P * C : P * C + A * K].reshape(n, A, K),
        host[:, P * C + A * K :].reshape(n, S),
    )


def test_a_row_claimed_again_after_drop_reads_nan_everywhere():
    # A CPU buffer clears the rows drop() frees, all at once, so that claim() is a counter: a row
    # claimed again must not show the values of the step that used it before.
    buf, host = _buffer(4)
    buf.drop(3)  # the fourth row moves to the front and stays claimed
    np.testing.assert_array_equal(buf.storage[0].numpy(), host[3])
    for expected in (1, 2, 3):
        assert buf.claim() == expected
        assert torch.isnan(buf.storage[expected]).all(), f"row {expected} was not cleared"
    buf.moments(1).fill_(7.0)
    buf.drop(4)
    assert buf.used == 0 and torch.isnan(buf.storage).all()


def test_snapshot_of_n_rows_keeps_the_row_after_them_at_the_front():
    buf, host = _buffer(4)
    got = buf.snapshot(3)
    bad = [
        name
        for name, a, b in zip(("moments", "activations", "scalars"), got, _split(host[:3]))
        if not np.array_equal(a, b)
    ]
    assert not bad, f"snapshot(3) differs from the hand-built rows in {bad}"
    assert buf.used == 1
    np.testing.assert_array_equal(buf.storage[0].numpy(), host[3])  # the step in progress, now row 0
    # The kept row is still claimed: the next claim is row 1, cleared to NaN.
    assert buf.claim() == 1 and torch.isnan(buf.storage[1]).all()


def test_snapshot_of_all_rows_empties_the_buffer():
    buf, host = _buffer(2)
    for a, b in zip(buf.snapshot(), _split(host)):
        np.testing.assert_array_equal(a, b)
    assert buf.used == 0 and buf.claim() == 0


def test_snapshot_refuses_more_rows_than_used():
    buf, _ = _buffer(2)
    with pytest.raises(ValueError, match=r"0 <= n <= 2"):
        buf.snapshot(3)


def test_rows_are_views_that_the_snapshot_sees():
    buf, host = _buffer(3)
    moments, act, scalars = buf.rows(2)
    assert moments.shape == (2, P, C) and act.shape == (2, A, K) and scalars.shape == (2, S)
    moments.mul_(-1)
    act.add_(0.5)
    scalars[:, -1] = 7.0
    exp_m, exp_a, exp_s = _split(host[:2])
    exp_s = exp_s.copy()
    exp_s[:, -1] = 7.0
    got = buf.snapshot(2)
    np.testing.assert_array_equal(got[0], -exp_m)
    np.testing.assert_array_equal(got[1], exp_a + 0.5)
    np.testing.assert_array_equal(got[2], exp_s)
    np.testing.assert_array_equal(buf.storage[0].numpy(), host[2])  # row 2 untouched, moved to the front


class _Backwards(nn.Module):
    """Registered output side first; runs input side first; a Sigmoid after the last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.act_out = nn.Sigmoid()
        self.body = nn.Linear(3, 4)
        self.act_mid = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_out(self.head(self.act_mid(self.body(x))))


def test_forward_order_is_learned_from_the_first_forward_and_its_hooks_removed():
    from gradscope.capture.activations import find_activations

    model = _Backwards()
    layout = ParamLayout.from_model(model)
    hooks = HookManager()
    order = ForwardOrder(layout, hooks)
    acts = find_activations(model)
    order.attach(model, acts)
    assert order.layers_by_depth() == ["head", "body"]  # nothing ran yet: layout order
    assert hooks.count(ForwardOrder.GROUP) == 1  # one process-wide pre-hook; nothing on the modules
    assert all(not m._forward_pre_hooks for m in model.modules())
    model(torch.randn(2, 3))
    assert order.layers_by_depth() == ["body", "head"]
    index = {info.path: info.index for info, _ in acts}
    assert order.output_activations() == [index["act_out"]]  # act_mid feeds a layer
    order.detach()
    order.detach()  # idempotent
    assert hooks.count() == 0
    model(torch.randn(2, 3))
    assert order.layers_by_depth() == ["body", "head"]


def _grad(loss: torch.Tensor, weight: torch.Tensor) -> np.ndarray:
    return torch.autograd.grad(loss, weight, retain_graph=True)[0].double().numpy()


def test_a_flush_inside_a_sampled_step_keeps_that_steps_activations_and_gradients():
    # The flush moves the row of the step in progress to the front of the buffer; the activation
    # hooks armed for it must follow it, and the gradient moments must land in it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(9, 5) for _ in range(3)]
    expected: dict[int, tuple[float, float]] = {}
    with gradscope.watch(model, optimizer=opt, rules="none", sample_every=1) as scope:
        for step, x in enumerate(xs, start=1):
            if step >= 2:
                scope.flush()  # the finished rows leave; the row of this step, already claimed, stays
            hidden = model[1](model[0](x))
            expected[step] = (
                float(np.mean(hidden.detach().numpy() <= 0)),
                np_stats(_grad(model[2](hidden).pow(2).mean(), model[0].weight))["l2_norm"],
            )
            model[2](hidden).pow(2).mean().backward()
            opt.step()
            scope.step()
            opt.zero_grad()
    df = scope.report().stats
    got = {s: (value(df, s, "1", "*", "act_zero_fraction"), value(df, s, "0", "weight", "l2_norm")) for s in expected}
    bad = [
        f"step {s}: got {got[s]}, expected {expected[s]}"
        for s in expected
        if not np.allclose(got[s], expected[s], rtol=1e-6, atol=1e-9)
    ]
    assert not bad, "\n".join(bad)
