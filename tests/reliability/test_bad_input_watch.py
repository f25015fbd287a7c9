"""Bad input to ``watch()``, ``scope.step()`` and ``scope.attach_optimizer()``: a ``ConfigurationError`` naming it.

Table-driven: one row per bad argument, with the exception type and the words its message must hold
(the argument's name and the fix). Every error comes from ``watch()`` itself, before anything is
attached to the model: the model carries no hook afterwards.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.errors import ConfigurationError


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def _wide() -> nn.Module:
    # 2,000 tensors: 10,000 buffered rows of their moments would be several GiB on the device
    return nn.Sequential(*[nn.Linear(1, 1) for _ in range(1000)])


# (parameter, bad value, extra watch() arguments, exception type, words the message must hold)
WATCH_CASES: list[tuple[str, Any, dict[str, Any], type[Exception], tuple[str, ...]]] = [
    ("report_path", "", {}, ConfigurationError, ("`report_path`", "gradscope.json")),
    ("report_path", 5, {}, ConfigurationError, ("`report_path`", "path")),
    ("log_dir", 123, {}, ConfigurationError, ("`log_dir`", "path")),
    ("log_dir", "  ", {}, ConfigurationError, ("`log_dir`", "runs/exp1")),
    ("stats", 5, {}, ConfigurationError, ("`stats`", "statistic name")),
    ("stats", ["l2_norm", "nope"], {}, ConfigurationError, ("nope",)),
    ("stats", [], {}, ConfigurationError, ("`stats`", "at least one")),
    ("thresholds", 5, {}, ConfigurationError, ("`thresholds`", "vanishing_gradients")),
    ("thresholds", {"vanishing_gradients": 5}, {}, ConfigurationError, ("thresholds['vanishing_gradients']",)),
    ("thresholds", {"vanishing_gradients": {"window": 2.5}}, {}, ConfigurationError, ("'window'", "window=2")),
    ("thresholds", {"nope": {}}, {}, ConfigurationError, ("nope",)),
    ("flush_every", 10**7, {"history": None}, ConfigurationError, ("`flush_every`", "10000")),
    ("flush_every", 10_000, {"history": None, "model": _wide}, ConfigurationError, ("flush_every=", "GiB")),
    ("flush_every", 0, {}, ConfigurationError, ("`flush_every`", "positive int")),
    ("every", 1.5, {}, ConfigurationError, ("`every`", "positive int")),
    ("sample_every", 3, {"every": 2}, ConfigurationError, ("`sample_every`", "sample_every=4")),
    ("rules", 5, {}, ConfigurationError, ("`rules`", '"all"')),
    ("rules", ["nope"], {}, ConfigurationError, ("nope",)),
    ("rules", [gradscope.Rule], {}, ConfigurationError, ("`rules`", "instance")),
    ("on_nonfinite", "stop", {}, ConfigurationError, ("`on_nonfinite`", "raise")),
    ("stop_on", "sometimes", {}, ConfigurationError, ("`stop_on`", "error")),
    ("history", 10, {}, ConfigurationError, ("`history`", "100")),
    ("distributed", "x", {}, ConfigurationError, ("`distributed`", "auto")),
    ("activations", "yes", {}, ConfigurationError, ("`activations`", "True or False")),
    ("sinks", "csv", {}, ConfigurationError, ("`sinks`", "list")),
    ("on_finding", 5, {}, ConfigurationError, ("`on_finding`", "function")),
    ("histogram_every", 0, {}, ConfigurationError, ("`histogram_every`", "None")),
    ("figure_every", -1, {}, ConfigurationError, ("`figure_every`", "None")),
    ("optimizer", 5, {}, ConfigurationError, ("`optimizer`", "torch.optim.Optimizer")),
]


@pytest.mark.parametrize(
    ("param", "bad", "extra", "exc", "words"), WATCH_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in WATCH_CASES]
)
def test_watch_rejects_bad_arguments_by_name(param, bad, extra, exc, words):
    extra = dict(extra)
    model = extra.pop("model", _mlp)()
    before = len(torch.nn.modules.module._global_forward_pre_hooks)
    with pytest.raises(exc) as info:
        gradscope.watch(model, **{param: bad}, **extra)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == before  # nothing attached
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# (what is passed as the model, words the message must hold)
MODEL_CASES: list[tuple[Any, tuple[str, ...]]] = [
    (lambda: nn.Sequential(nn.Linear(2, 3), nn.LazyLinear(3)), ("uninitialised", "in 1", "forward pass")),
    (lambda: torch.optim.SGD(_mlp().parameters(), lr=0.1), ("`model`", "watch(model, optimizer=opt)")),
    (lambda: list(_mlp().parameters()), ("`model`", "not its parameters")),
    (lambda: nn.ReLU(), ("no parameters",)),
]


@pytest.mark.parametrize(("make", "words"), MODEL_CASES, ids=["lazy", "optimizer", "parameters", "no-params"])
def test_watch_rejects_models_it_cannot_watch_by_name(make, words):
    with pytest.raises(ConfigurationError) as info:
        gradscope.watch(make())
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# (scope.step keyword, bad value, words)
STEP_CASES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("loss", "x", ("loss",)),
    ("val_loss", [1.0, 2.0], ("val_loss",)),
    ("lr", torch.ones(3), ("lr",)),
]


@pytest.mark.parametrize(("name", "bad", "words"), STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_step_rejects_bad_scalars_by_name(name, bad, words):
    model = _mlp()
    with gradscope.watch(model, rules="none") as scope:
        model(torch.randn(2, 3)).sum().backward()
        with pytest.raises(ConfigurationError) as info:
            scope.step(**{name: bad})
        scope.step()
    for word in words:
        assert word in str(info.value)


def test_attach_optimizer_rejects_what_is_not_an_optimizer_and_a_scope_without_one():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        with pytest.raises(ConfigurationError, match="`optimizer`"):
            scope.attach_optimizer(5)
    with pytest.raises(ConfigurationError, match="closed"):
        scope.attach_optimizer(opt)
    with gradscope.watch(model, rules="none") as scope:
        with pytest.raises(ConfigurationError, match="without an optimizer"):
            scope.attach_optimizer(opt)
