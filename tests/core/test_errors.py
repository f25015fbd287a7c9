"""Bad input gets a clear error at construction; monitoring never crashes training; nothing is lost."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.errors import ConfigurationError, GradscopeWarning
from gradscope.sinks.base import Sink

from .helpers import mlp


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every": 0}, r"Expected `every` to be a positive int, but got 0"),
        ({"every": 1.5}, r"`every` to be a positive int"),
        ({"every": True}, r"`every` to be a positive int"),
        ({"flush_every": -1}, r"`flush_every`"),
        ({"every": 2, "sample_every": 5}, r"multiple of `every`.*sample_every=4"),
        ({"stats": ["l2_norm", "l2_nrom"]}, r"Unknown statistic 'l2_nrom'.*Registered statistics:.*l2_norm"),
        ({"stats": []}, r"at least one statistic"),
        ({"stats": ["update_ratio"]}, r"needs the optimizer.*optimizer=opt"),
        ({"on_nonfinite": "explode"}, r"`on_nonfinite` to be one of"),
        ({"rules": ["vanishing_gradientz"]}, r"Unknown rule 'vanishing_gradientz'"),
        ({"rules": 3}, r"Expected `rules`"),
        ({"thresholds": {"nope": {}}}, r"Unknown rule 'nope'"),
        ({"optimizer": "adam"}, r"Expected `optimizer` to be a torch.optim.Optimizer, but got str"),
        ({"log_dir": "x", "writer": object()}, r"either `log_dir` or `writer`"),
        ({"activations": "yes"}, r"`activations` to be True or False"),
        ({"sinks": [42]}, r"Sink instance or a registered name"),
        ({"sinks": ["nosuchsink"]}, r"Unknown sink 'nosuchsink'"),
    ],
)
def test_bad_arguments_raise_before_anything_is_attached(kwargs, match):
    model = mlp()
    with pytest.raises(ConfigurationError, match=match):
        gradscope.watch(model, **kwargs)
    gradscope.watch(model).close()  # nothing was left attached or registered


def test_not_a_module():
    model = mlp()
    with pytest.raises(ConfigurationError, match=r"torch.nn.Module, but got generator\. Pass the model itself"):
        gradscope.watch(model.parameters())
    with pytest.raises(ConfigurationError, match=r"got list\. Pass the model itself, not its parameters"):
        gradscope.watch(list(model.parameters()))


def test_no_parameters_and_no_trainable_parameters():
    with pytest.raises(ConfigurationError, match="no parameters"):
        gradscope.watch(nn.ReLU())
    model = mlp()
    model.requires_grad_(False)
    with pytest.raises(ConfigurationError, match=r"no trainable parameters: all 6 have requires_grad=False"):
        gradscope.watch(model)


@pytest.mark.parametrize(
    "loss, expected",
    [
        (torch.tensor(0.25), 0.25),
        (torch.tensor([0.5]), 0.5),
        (0.75, 0.75),
        (3, 3.0),
        (np.float32(1.5), 1.5),
        (torch.tensor(float("nan")), math.nan),
        (float("inf"), math.inf),
        (torch.tensor(2, dtype=torch.int64), 2.0),
        (torch.tensor(0.125, dtype=torch.float64, requires_grad=True) * 2, 0.25),
        (torch.tensor(0.5, dtype=torch.bfloat16), 0.5),
    ],
)
def test_loss_values_are_recorded_exactly(loss, expected):
    model = mlp()
    with gradscope.watch(model, rules="none") as scope:
        model(torch.randn(2, 6)).sum().backward()
        scope.step(loss=loss, val_loss=None, lr=1e-3)
    sc = scope.report().scalars
    assert "val_loss" not in sc.columns
    got = float(sc.loc[1, "loss"])
    assert (math.isnan(got) and math.isnan(expected)) or got == expected
    assert float(sc.loc[1, "lr"]) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "loss, match",
    [
        (
            torch.ones(4),
            r"`loss` passed to scope.step\(\) to be a scalar, but got a tensor of shape \[4\]. Pass loss=tensor.mean\(\)",
        ),
        ("0.3", r"number or a one-element tensor, but got str"),
        (True, r"number or a one-element tensor, but got bool"),
        (torch.tensor(1 + 2j), r"complex"),
    ],
)
def test_bad_scalars_name_the_argument_and_the_fix(loss, match):
    model = mlp()
    with gradscope.watch(model, rules="none") as scope:
        with pytest.raises(ConfigurationError, match=match):
            scope.step(loss=loss)
        assert scope.step_count == 0  # the bad call recorded nothing


@pytest.mark.gpu
def test_a_loss_on_another_device_is_recorded():
    model = mlp()
    with gradscope.watch(model, rules="none") as scope:
        model(torch.randn(2, 6)).sum().backward()
        scope.step(loss=torch.tensor(0.5, device="cuda"))
    assert float(scope.report().scalars.loc[1, "loss"]) == 0.5


def test_step_after_close_is_an_error():
    model = mlp()
    scope = gradscope.watch(model)
    scope.close()
    with pytest.raises(ConfigurationError, match="closed"):
        scope.step()


class _ExplodingSink(Sink):
    def write(self, update):
        raise OSError("disk full")


class _BrokenRule(gradscope.Rule):
    name = "broken_for_test"

    def check(self, ctx):
        raise ZeroDivisionError("bug in rule")


def test_a_failing_sink_or_rule_warns_and_training_goes_on():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(GradscopeWarning) as record:
        with gradscope.watch(
            model, optimizer=opt, sinks=[_ExplodingSink()], rules=[_BrokenRule()], flush_every=2
        ) as scope:
            for _ in range(5):
                model(torch.randn(2, 6)).sum().backward()
                opt.step()
                scope.step()
                opt.zero_grad()
    messages = " ".join(str(w.message) for w in record)
    assert "disk full" in messages and "bug in rule" in messages
    report = scope.report()
    assert report.steps == 5 and sorted(report.stats.step.unique()) == [1, 2, 3, 4, 5]
    assert any("disk full" in e for e in report.errors) and any("broken_for_test" in e for e in report.errors)
    assert "monitoring problem" in str(report)


def test_statistics_are_flushed_when_the_training_loop_raises():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = None
    with pytest.raises(KeyboardInterrupt):
        with gradscope.watch(model, optimizer=opt, flush_every=100) as scope:
            for i in range(7):
                model(torch.randn(2, 6)).sum().backward()
                opt.step()
                scope.step(loss=float(i))
                opt.zero_grad()
                if i == 5:
                    raise KeyboardInterrupt
    report = scope.report()
    assert scope.closed and sorted(report.stats.step.unique()) == [1, 2, 3, 4, 5, 6]
    assert report.scalars["loss"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_buffered_statistics_are_written_at_interpreter_exit(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch, gradscope
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        scope = gradscope.watch(model, log_dir={str(tmp_path / "run")!r}, flush_every=1000)
        for i in range(9):
            model(torch.randn(5, 3)).sum().backward()
            scope.step(loss=float(i))
            model.zero_grad()
        # no close(): the process just ends
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    events = acc.Scalars("gradscope/scalar/loss")
    assert [e.step for e in events] == list(range(1, 10))
    assert [e.value for e in events] == [float(i) for i in range(9)]
    assert len(acc.Scalars("gradscope/l2_norm/0")) == 9
