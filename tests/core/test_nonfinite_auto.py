"""The origin of the first NaN, located without being asked (issue 17, point 3).

Two persistent sources of NaN are planted in a plain training loop (SGD, CPU) and the user never
calls ``scope.locate_nonfinite``: a NaN written into one weight of a middle layer, and a layer that
takes the log of its (partly negative) input. The reference is the plant itself: the module path,
the torch function and the parameter named. By the time the NaN gradient is confirmed the update has
written NaN into every weight below the plant, so naming the plant shows that the weights before
the update were used. A run without NaN must never get a module hook.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope
from gradscope.capture.nonfinite import NonfiniteLocator


class LogLayer(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN where x < 0


def _net(mid: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), mid, nn.Linear(16, 3))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _train(model: nn.Module, steps: int, *, plant=None, positive_until: int = 0, **kw):
    """SGD steps; ``plant(step, model)`` runs before the forward; the module hooks seen after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=opt, activations=False, **kw)
    assert scope._diagnosis.first_nonfinite is not None, "auto_locate(scope) is not wired into the scope's parts"
    g = torch.Generator().manual_seed(1)
    hooks = []
    for step in range(1, steps + 1):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        if plant is not None:
            plant(step, model)
        loss = F.cross_entropy(model(x.abs() if step <= positive_until else x), y)
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad()
        hooks.append(_hooks(model))
    return scope, hooks


def _nan_finding(report):
    (f,) = [f for f in report.findings if f.kind == "nonfinite_gradients"]
    return f


def test_a_nan_weight_in_a_middle_layer_is_named_without_asking(caplog):
    def plant(step: int, model: nn.Module) -> None:
        if step == 6:
            with torch.no_grad():
                model[2].weight[1, 2] = float("nan")

    model = _net(nn.Identity())
    with caplog.at_level(logging.INFO, logger="gradscope"):
        scope, hooks = _train(model, 9, plant=plant)
    # the update of step 6 wrote NaN into every weight below the plant: the next forward reads NaN at '0'
    assert not torch.isfinite(model[0].weight).any()
    # none before the NaN; armed when step 6 is confirmed, removed during step 7's forward
    assert hooks[:5] == [0] * 5 and hooks[5] > 0 and hooks[6:] == [0] * 3
    report = scope.close()
    f = _nan_finding(report)
    origin = f.evidence["origin"]
    assert (f.step, origin["module"], origin["operation"], origin["cause"], origin["parameter"]) == (
        6,
        "2",
        "linear",
        "parameter",
        "2.weight",
    )
    assert origin["step"] == 6 and origin["input_stats"]["nonfinite"] == 0  # its input was finite
    assert "Origin: First non-finite value at step 6" in f.message and "Linear '2'" in f.message
    # the JSON holds it; the log says it once, at INFO (the finding itself was announced at its step)
    data = json.loads(report.to_json())
    (j,) = [x for x in data["findings"] if x["kind"] == "nonfinite_gradients"]
    assert j["evidence"]["origin"]["module"] == "2"
    said = [r for r in caplog.records if "Linear '2'" in r.getMessage() and "Origin" not in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert _hooks(model) == 0 and scope._hooks.count(NonfiniteLocator.GROUP) == 0


def test_a_layer_that_takes_the_log_of_a_negative_is_named_without_asking():
    # positive inputs for 4 steps: tanh(...) then a linear layer still feeds negatives to the log, so
    # the NaN starts at step 1; the log layer is the origin, an operation on finite inputs
    model = _net(LogLayer())
    scope, _ = _train(model, 4)
    f = _nan_finding(scope.close())
    origin = f.evidence["origin"]
    assert (origin["module"], origin["module_type"], origin["operation"], origin["cause"]) == (
        "3",
        "LogLayer",
        "log",
        "operation",
    )
    assert f.step == origin["step"] == 1
    assert origin["input_stats"]["negatives"] > 0 and origin["input_stats"]["nonfinite"] == 0


def test_a_run_without_nan_never_gets_a_module_hook():
    model = _net(nn.Tanh())
    scope, hooks = _train(model, 30, flush_every=10)
    report = scope.close()
    assert hooks == [0] * 30  # after step 1 (the forward order hook is gone) and at every step after
    assert not [f for f in report.findings if f.kind == "nonfinite_gradients"]
    assert scope._hooks.count(NonfiniteLocator.GROUP) == 0 and _hooks(model) == 0
    assert not model[0]._forward_pre_hooks and torch._C._len_torch_function_stack() == 0


def test_the_weight_copy_rides_on_the_recorders_own_optimizer_hook():
    """One optimizer pre-hook of the scope per step: the recorder's, which makes the NaN locator's weight
    copy once it has captured the gradients (not a hook of its own), and drops it after the one copy.
    With ``on_nonfinite="raise"`` there is no copy: the guard stops the step before the update."""
    planted = {}

    def plant(step: int, model: nn.Module) -> None:
        if step == 4:
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")
                planted.update({k: v.clone() for k, v in model.state_dict().items()})

    model = _net(nn.Identity())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=opt, activations=False)
    try:
        assert len(opt._optimizer_step_pre_hooks) == 1 and scope._recorder.before_update is not None
        g = torch.Generator().manual_seed(1)
        for step in range(1, 6):
            plant(step, model)
            F.cross_entropy(model(torch.randn(16, 8, generator=g)), torch.randint(0, 3, (16,), generator=g)).backward()
            opt.step()
            locator = gradscope.capture.nonfinite._locator(scope)
            if step < 4:
                assert scope._recorder.before_update is not None and locator._before is None  # finite: no copy
            if step == 4:  # the weights as the NaN step's forward saw them, before its update wrote NaN
                assert locator._before_step == 4 and set(locator._before) == set(planted)
                for name, value in planted.items():
                    torch.testing.assert_close(locator._before[name], value, equal_nan=True, rtol=0, atol=0)
                assert not torch.isfinite(model[0].weight).all()  # the update did write NaN below the plant
                assert scope._recorder.before_update is None  # one copy per run
            scope.step()
            opt.zero_grad()
    finally:
        scope.close()

    model = _net(nn.Identity())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, on_nonfinite="raise") as scope:
        assert len(opt._optimizer_step_pre_hooks) == 2 and scope._recorder.before_update is None
