"""The report survives a forgotten close(), and on_nonfinite="raise" stops before the update (items 6, 7)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope import NonFiniteGradientError


def _train_and_forget(model, opt, path, steps=3):
    # A train() helper that never closes its scope.
    scope = gradscope.watch(model, optimizer=opt, report_path=path, rules="none")
    for _ in range(steps):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        scope.step()
        opt.zero_grad()


def test_an_unclosed_scope_writes_its_report_when_collected(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "report.json"
    hooks_before = len(torch.nn.modules.module._global_forward_pre_hooks)
    _train_and_forget(model, opt, path)
    gc.collect()
    report = json.loads(path.read_text())
    assert report["meta"]["steps"] == 3 and report["meta"]["ended_by"] == "garbage collection"
    # model and optimizer live on, and nothing of the scope is left on them
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == hooks_before
    with gradscope.watch(model, optimizer=opt) as scope:  # not "already watched"
        pass
    assert scope.closed


def test_an_unclosed_scope_writes_its_report_at_interpreter_exit(tmp_path):
    path = tmp_path / "report.json"
    script = textwrap.dedent(
        f"""
        import gc, torch, torch.nn as nn, gradscope
        gc.disable()  # the scope's reference cycles stay uncollected until exit
        def train():
            model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            scope = gradscope.watch(model, optimizer=opt, report_path={str(path)!r}, rules="none")
            for _ in range(4):
                model(torch.randn(8, 4)).pow(2).mean().backward()
                opt.step(); scope.step(); opt.zero_grad()
        train()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert json.loads(path.read_text())["meta"]["steps"] == 4


def test_raise_on_nonfinite_stops_before_the_optimizer_writes_into_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteGradientError) as info:
        with gradscope.watch(model, optimizer=opt, on_nonfinite="raise", rules="none") as scope:
            for step in range(1, 5):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                if step == 3:
                    loss = loss * float("inf")  # inf * 0 somewhere: NaN and Inf gradients
                loss.backward()
                before = [p.detach().clone() for p in model.parameters()]
                state_steps = [s["step"].clone() for s in opt.state.values()]
                opt.step()
                scope.step()
                opt.zero_grad()
    assert step == 3
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # bit for bit: the update never ran
        assert torch.isfinite(p).all()
    assert [s["step"] for s in opt.state.values()] == state_steps  # Adam never counted the step
    assert "weights are intact" in str(info.value)
    assert info.value.report.meta["steps"] == 3
    assert scope.closed


def test_raise_on_nonfinite_without_an_optimizer_still_raises_at_step():
    model = nn.Linear(3, 1)
    with pytest.raises(NonFiniteGradientError, match=r"Non-finite|nonfinite|NaN"):
        with gradscope.watch(model, on_nonfinite="raise", rules="none") as scope:
            (model(torch.randn(2, 3)).sum() * float("nan")).backward()
            scope.step()
