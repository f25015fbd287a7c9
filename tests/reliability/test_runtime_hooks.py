"""Watching never breaks checkpoints or copies of the watched model (issue 14, item 1).

Nothing gradscope registers lives on the user's modules: ``torch.save(model)``, ``pickle`` and
``copy.deepcopy`` work at every step (before step 1 too, while the forward order is being learned,
and between the steps that arm the activation hook), and a deep copy's forward passes never reach
the scope's statistics.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import torch
import torch.nn as nn

import gradscope


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _assert_checkpointable(model: nn.Module, x: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))  # the same function, and a plain model
    twin = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    torch.testing.assert_close(twin(x), model(x))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in twin.modules())


def test_save_pickle_and_deepcopy_work_at_every_step_including_before_step_one():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with gradscope.watch(model, optimizer=opt, sample_every=2, rules="none") as scope:
        _assert_checkpointable(model, x)  # before step 1: the forward-order hook is registered
        for _ in range(5):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            scope.step()
            opt.zero_grad()
            _assert_checkpointable(model, x)  # after steps 2, 4: the activation hook is armed
    assert scope.report().steps == 5


def _run(with_copy: bool) -> tuple[np.ndarray, list[str]]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    ema = None
    with gradscope.watch(model, optimizer=opt, sample_every=1, rules="none") as scope:
        for step in range(1, 7):
            x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
            if with_copy and step == 3:
                ema = copy.deepcopy(model)  # an EMA copy taken mid-run, in training mode
            if ema is not None:
                ema(x * 10.0 - 5.0)  # its forward runs first in the step, on very different inputs
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            scope.step()
            opt.zero_grad()
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.mul_(0.9).add_(pm, alpha=0.1)
    stats = scope.report().stats
    act = stats[stats.stat.str.startswith("act_")].sort_values(["step", "layer", "stat"])
    return act.value.to_numpy(), scope.layers_by_depth()


def test_a_deep_copy_never_feeds_the_live_scope():
    plain, order_plain = _run(with_copy=False)
    copied, order_copied = _run(with_copy=True)
    assert len(plain) == 6 * 2 * 2  # 6 steps x 2 activation modules x (fraction, dead or saturated)
    np.testing.assert_array_equal(copied, plain)
    assert order_copied == order_plain == ["0", "2", "4"]
