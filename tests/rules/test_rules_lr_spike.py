"""learning_rate_too_high / _too_low and loss_spike on small real training runs (seeded, CPU, ~1 s each)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope


def _task(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 4, generator=g)

    def batch(step: int):
        gs = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(64, 16, generator=gs)
        return x, (x @ teacher).argmax(1)

    return batch


def _run(opt_name: str, lr: float, steps: int, *, rules, inject=None, phase=None, schedule=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        if opt_name == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=lr)
    )
    batch = _task()
    losses = []
    with gradscope.watch(model, optimizer=opt, rules=rules) as scope:
        for step in range(1, steps + 1):
            x, y = batch(step)
            if inject == step:
                y = (y + 1 + torch.arange(len(y)) % 3) % 4  # every label wrong: a bad batch
            for group in opt.param_groups:
                group["lr"] = lr * (schedule(step) if schedule else 1.0)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss=loss, **({"phase": phase(step)} if phase else {}))
            losses.append(loss.item())
    return scope.report(), np.array(losses)


def test_a_bad_batch_is_a_loss_spike_at_its_step_that_recovers():
    report, losses = _run("sgd", 0.05, 140, rules=["loss_spike"], inject=100)
    spikes = [f for f in report.findings if f.kind == "loss_spike"]
    assert [f.step for f in spikes] == [100]
    f = spikes[0]
    # the evidence against the losses recorded here: the trend is the median of the 50 losses before
    assert f.evidence["loss"] == np.float32(losses[99])
    assert math.isclose(f.evidence["trend"], float(np.median(losses[49:99])), rel_tol=1e-6)
    assert f.evidence["loss"] > f.evidence["trend"] + 10 * f.evidence["noise"]
    assert f.resolved_step is not None and 100 < f.resolved_step <= 110
    assert f.evidence["gradient_rises"]  # the layers' gradient rises, measured


def test_no_spike_without_a_fault_nor_across_declared_restarts():
    report, _ = _run("sgd", 0.05, 140, rules=["loss_spike"])
    assert not report.findings
    # warm restarts every 40 steps at 4x the learning rate, declared: never a spike
    report, _ = _run(
        "sgd", 0.05, 140, rules=["loss_spike"], schedule=lambda s: 4.0 if s % 40 < 3 else 1.0, phase=lambda s: s // 40
    )
    assert not [f for f in report.findings if f.kind == "loss_spike"]


def test_a_learning_rate_far_too_low_is_named_with_a_factor():
    report, _ = _run("adamw", 1e-4, 220, rules=["learning_rate_too_low", "learning_rate_too_high"])
    kinds = {f.kind: f for f in report.findings}
    assert set(kinds) == {"learning_rate_too_low"}
    f = kinds["learning_rate_too_low"]
    # the factor brings the median ratio to about 3e-3
    assert f.evidence["median_update_ratio"] < 1e-3
    assert 0.5 < f.evidence["factor"] * f.evidence["median_update_ratio"] / 3e-3 < 2
    assert f.evidence["loss_first_half"] > f.evidence["loss_second_half"]


def test_a_good_learning_rate_gives_no_learning_rate_finding():
    for opt_name, lr in (("sgd", 0.05), ("adamw", 3e-3)):
        report, _ = _run(opt_name, lr, 220, rules=["learning_rate_too_low", "learning_rate_too_high"])
        assert not report.findings, (opt_name, lr, report.findings)


def test_a_learning_rate_far_too_high_is_named():
    report, losses = _run("sgd", 3.0, 120, rules=["learning_rate_too_high", "learning_rate_too_low"])
    kinds = {f.kind: f for f in report.findings}
    assert "learning_rate_too_low" not in kinds  # small steps after a collapse are not a small learning rate
    assert "learning_rate_too_high" in kinds, (losses[:30], report.findings)
    f = kinds["learning_rate_too_high"]
    assert f.evidence["max_update_ratio"] >= 0.05 and f.evidence["loss"] > f.evidence["best_loss"]
