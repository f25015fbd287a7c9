"""Faults that start mid-run (steps 158 to 311), after a stretch of healthy training: the alert-latency set.

A live monitor must see a fault within a few steps of its onset however long the run has been
healthy, and without the slack a rule may give the transients of initialisation. Each scenario trains
normally, then one event at a known step breaks it: a bad update, a learning-rate change, a NaN, a
branch that stops being used. The onset is that step; none is a multiple of the default
``flush_every`` (50) or ``sample_every`` (10), so that no onset falls on a flush or a sampled step
by luck.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .catalog import _at, _TanhBottleneck
from .data import TeacherTask
from .harness import Scenario, Setup
from .models import MLP, TwoHeadMLP

__all__ = ["MIDRUN"]

CE = F.cross_entropy
V, E, N = "vanishing_gradients", "exploding_gradients", "nonfinite_gradients"
D, S, G, L = "dead_units", "saturated_activations", "no_gradient", "loss_not_decreasing"

# The onsets (steps): off the flush and sampling grids (multiples of 50 and 10).
PIN, JUMP, NAN, KILL, DROP, ZERO = 203, 237, 311, 206, 158, 162


def tanh_pinned_late() -> Setup:
    task = TeacherTask(seed=200)
    model = _TanhBottleneck()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        if step == PIN:
            # a bad update: fc2's pre-activations jump to +-8, pinning the tanh; gradients below it die
            with torch.no_grad():
                g = torch.Generator().manual_seed(1)
                m.fc2.bias.copy_(8.0 * (torch.randint(0, 2, (128,), generator=g) * 2 - 1))
            for st in o.state.values():
                st.pop("momentum_buffer", None)

    return Setup(model, opt, task.batch, CE, before_step=before)


def lr_jump_late() -> Setup:
    task = TeacherTask(seed=201)
    model = MLP(32, [128, 128], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        if step == JUMP:
            for group in o.param_groups:
                group["lr"] = 20.0

    return Setup(model, opt, task.batch, CE, before_step=before)


def nan_late() -> Setup:
    task = TeacherTask(seed=202)
    model = MLP(32, [64, 64], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = {"step": 0}

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        state["step"] = step

    def poison(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if state["step"] >= NAN:
            # a corrupted intermediate value: NaN enters the backward pass at act0, so fc0's gradient
            out = out.clone()
            out.register_hook(lambda g: torch.where(torch.arange(g.shape[1]) == 0, torch.nan, g))
        return out

    model.act0.register_forward_hook(poison)
    return Setup(model, opt, task.batch, CE, before_step=before)


def relu_killed_late() -> Setup:
    task = TeacherTask(seed=203)
    model = MLP(32, [128, 128], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        if step == KILL:
            with torch.no_grad():
                m.fc0.bias[:100] -= 20.0  # a bad update pushes most units of act0 far negative

    return Setup(model, opt, task.batch, CE, before_step=before)


def aux_head_dropped() -> Setup:
    task = TeacherTask(seed=204)
    model = TwoHeadMLP(32, 64, 10, use_aux=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        if step == DROP:
            m.use_aux = False  # a refactor drops the auxiliary loss term: the aux head is left behind

    return Setup(model, opt, task.batch, CE, before_step=before)


def lr_zeroed_after_progress() -> Setup:
    task = TeacherTask(seed=205)
    model = MLP(32, [128, 128], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def before(step: int, m: nn.Module, o: torch.optim.Optimizer) -> None:
        if step == ZERO:
            # a scheduler bug sets the learning rate to 0 after real progress: the loss stops falling
            for group in o.param_groups:
                group["lr"] = 0.0
            for st in o.state.values():
                st.pop("momentum_buffer", None)

    return Setup(model, opt, task.batch, CE, before_step=before)


def _late(name: str, group: str, desc: str, fn, expected, allowed=(), steps: int = 350) -> Scenario:
    return Scenario(name, group, desc, fn, expected, frozenset(allowed), steps=steps)


MIDRUN: list[Scenario] = [
    _late(
        "tanh_pinned_late",
        V,
        f"ReLU MLP with a tanh stage, healthy until step {PIN}, when its inputs jump to +-8",
        tanh_pinned_late,
        {V: _at(PIN, "fc2"), S: _at(PIN, "squash")},
        (L, "loss_spike"),  # the inputs jump at one step: the loss jumps with them
    ),
    _late(
        "lr_jump_late",
        E,
        f"healthy ReLU MLP until step {JUMP}, then SGD lr x1000",
        lr_jump_late,
        {E: _at(JUMP)},
        (N, L, D, V, "learning_rate_too_high", "loss_spike"),
    ),
    _late(
        "nan_late", N, f"from step {NAN} a NaN enters the backward pass at act0", nan_late, {N: _at(NAN, "fc0")}, (L,)
    ),
    _late(
        "relu_killed_late",
        D,
        f"at step {KILL} a bad update drives 100 of act0's 128 units negative",
        relu_killed_late,
        {D: _at(KILL, "act0")},
        (L,),
    ),
    _late(
        "aux_head_dropped",
        G,
        f"an auxiliary head trained until step {DROP}, then left out of the loss",
        aux_head_dropped,
        {G: _at(DROP, "aux")},
    ),
    _late(
        "lr_zeroed_after_progress",
        L,
        f"ReLU MLP trains until step {ZERO}, when the learning rate is set to 0",
        lr_zeroed_after_progress,
        {L: _at(ZERO)},
    ),
]
