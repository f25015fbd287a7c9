"""gradscope.check / assert_healthy against a hand-run reference of the same training steps."""

from __future__ import annotations

import copy
import random
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ci_helpers import BigGradient, make_mlp

import gradscope
from gradscope.errors import ConfigurationError, GradientHealthError
from gradscope.health import failing_findings, seeded


@pytest.fixture
def mlp():
    torch.manual_seed(1234)
    return make_mlp()


def _replay(model, batch, loss_fn, steps, make_opt, seed=0):
    """The training steps check() documents, run by hand in float64 on a copy: losses and per-step layer norms."""
    net = copy.deepcopy(model).double()
    opt = make_opt(net)
    x, y = batch
    x = x.double() if x.is_floating_point() else x
    losses, norms = [], []
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        norms.append(
            {
                name: torch.sqrt(sum((p.grad**2).sum() for p in mod.parameters())).item()
                for name, mod in net.named_children()
                if any(True for _ in mod.parameters())
            }
        )
        losses.append(loss.item())
        opt.step()
    return losses, norms, net


def _stat(report, stat, layer, param="*"):
    df = report.stats
    sel = df[(df["stat"] == stat) & (df["layer"] == layer) & (df["param"] == param)]
    return dict(zip(sel["step"], sel["value"]))


def test_check_runs_the_documented_steps_with_adam(mlp):
    model, batch, loss_fn = mlp
    report = gradscope.check(model, batch, loss_fn, rules="none", steps=4)
    losses, norms, _ = _replay(model, batch, loss_fn, 4, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    assert report.steps == 4
    np.testing.assert_allclose(report.scalars["loss"].to_numpy(), losses, rtol=1e-5)
    for layer in ("0", "3"):
        got = _stat(report, "l2_norm", layer)
        np.testing.assert_allclose([got[s] for s in range(1, 5)], [n[layer] for n in norms], rtol=1e-4)
    info = report.meta["check"]
    assert (info["steps"], info["seed"], info["optimizer"], info["copied"]) == (4, 0, "Adam", True)
    assert info["seconds"] > 0


def test_every_statistic_at_every_step(mlp):
    report = gradscope.check(*mlp, rules="none", steps=3)
    df = report.stats
    for stat in ("mean", "std", "abs_max", "zero_fraction", "param_norm", "update_ratio", "act_zero_fraction"):
        assert sorted(set(df.loc[df["stat"] == stat, "step"])) == [1, 2, 3], stat


def test_check_uses_the_given_optimizer_and_leaves_it_alone(mlp):
    model, batch, loss_fn = mlp
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    before = copy.deepcopy(opt.state_dict())
    report = gradscope.check(model, batch, loss_fn, optimizer=opt, rules="none", steps=3)
    losses, _, _ = _replay(model, batch, loss_fn, 3, lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9))
    np.testing.assert_allclose(report.scalars["loss"].to_numpy(), losses, rtol=1e-5)
    assert report.meta["check"]["optimizer"] == "SGD"
    assert opt.state_dict() == before  # the copy moved, not yours


def test_model_left_untouched(mlp):
    model, batch, loss_fn = mlp
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    gradscope.check(model, batch, loss_fn, rules="none")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())  # its mode too
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_copy_false_trains_the_model_itself(mlp):
    model, batch, loss_fn = mlp
    model.eval()
    _, _, trained = _replay(model, batch, loss_fn, 5, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    report = gradscope.check(model, batch, loss_fn, rules="none", copy=False)
    assert report.meta["check"]["copied"] is False
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-7, msg=name)
    assert not model.training  # mode restored even though the weights moved


def test_seeded_and_restores_global_random_state():
    torch.manual_seed(7)
    model, batch, loss_fn = make_mlp(dropout=0.5)
    random.seed(3)
    np.random.seed(3)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = gradscope.check(model, batch, loss_fn, rules="none", seed=11)
    b = gradscope.check(model, batch, loss_fn, rules="none", seed=11)
    c = gradscope.check(model, batch, loss_fn, rules="none", seed=12)
    assert torch.equal(states[0], torch.get_rng_state())
    assert states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    assert a.stats.equals(b.stats)  # same seed, same dropout masks, same numbers
    assert not np.allclose(a.scalars["loss"].to_numpy(), c.scalars["loss"].to_numpy())


def test_seeded_context_seeds_everything_and_restores():
    before = torch.rand(1)  # advance; the state after this is what must survive
    state = torch.get_rng_state()
    with seeded(5):
        first = (torch.rand(1).item(), random.random(), np.random.rand())
    with seeded(5):
        again = (torch.rand(1).item(), random.random(), np.random.rand())
    assert first == again
    assert torch.equal(state, torch.get_rng_state())
    assert before.shape == (1,)


def test_assert_healthy_passes_and_fails_with_the_table():
    torch.manual_seed(0)
    report = gradscope.assert_healthy(*make_mlp(), rules=[BigGradient()])
    assert report.ok and not report.findings
    torch.manual_seed(0)
    with pytest.raises(GradientHealthError) as info:
        gradscope.assert_healthy(*make_mlp(scale=1e6), rules=[BigGradient()])
    text = str(info.value)
    assert text.startswith("gradscope: Sequential is unhealthy: 2 finding(s) at or above 'error'")
    assert "ci_big_gradient in '0'" in text and "ci_big_gradient in '3'" in text
    assert "layers, latest values up to step 5 (! = named in a finding):" in text  # the per-layer table
    assert "0 !" in text and "3 !" in text
    assert isinstance(info.value.report, gradscope.Report)
    assert [f.kind for f in info.value.report.findings] == ["ci_big_gradient"] * 2


def test_fail_on_decides_which_findings_fail():
    torch.manual_seed(0)
    model, batch, loss_fn = make_mlp(scale=1e6)
    warn = [BigGradient(level="warning")]
    report = gradscope.assert_healthy(model, batch, loss_fn, rules=warn)  # warnings pass at fail_on="error"
    assert [f.severity for f in report.findings] == ["warning", "warning"]
    assert failing_findings(report, "error") == [] and len(failing_findings(report, "warning")) == 2
    with pytest.raises(GradientHealthError, match="at or above 'warning'"):
        gradscope.assert_healthy(model, batch, loss_fn, rules=warn, fail_on="warning")
    with pytest.raises(ConfigurationError, match="Expected `fail_on` to be one of 'warning', 'error'"):
        gradscope.assert_healthy(model, batch, loss_fn, fail_on="info")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch": torch.zeros(3)}, "Expected `batch` to be a pair (inputs, targets)"),
        ({"loss_fn": "mse"}, "Expected `loss_fn` to be callable"),
        ({"steps": 0}, "Expected `steps` to be a positive int, but got 0."),
        ({"seed": 1.5}, "Expected `seed` to be an int"),
        ({"copy": "yes"}, "Expected `copy` to be True or False"),
        ({"model": [nn.Linear(2, 2)]}, "Expected `model` to be a torch.nn.Module, but got list."),
        ({"optimizer": "adam"}, "Expected `optimizer` to be a torch.optim.Optimizer or None"),
        ({"rules": ["no_such_rule"]}, "Unknown rule 'no_such_rule'"),
    ],
)
def test_invalid_arguments(mlp, kwargs, message):
    model, batch, loss_fn = mlp
    args = {"model": model, "batch": batch, "loss_fn": loss_fn, **kwargs}
    with pytest.raises(ConfigurationError) as info:
        gradscope.check(args.pop("model"), args.pop("batch"), args.pop("loss_fn"), **args)
    assert message in str(info.value)


def test_loss_must_be_a_scalar_that_depends_on_the_model(mlp):
    model, batch, _ = mlp
    with pytest.raises(ConfigurationError, match=r"got shape \[32\]\. Reduce it to one number"):
        gradscope.check(model, batch, lambda out, y: F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ConfigurationError, match="does not require a gradient"):
        gradscope.check(model, batch, lambda out, y: torch.tensor(1.0))


def test_optimizer_of_another_model_is_refused(mlp):
    model, batch, loss_fn = mlp
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ConfigurationError, match="holds 2 parameter"):
        gradscope.check(model, batch, loss_fn, optimizer=other)


def test_model_that_cannot_be_copied(mlp):
    model, batch, loss_fn = mlp
    model.lock = threading.Lock()  # deepcopy cannot copy a lock
    with pytest.raises(ConfigurationError, match="Pass copy=False to train the model itself"):
        gradscope.check(model, batch, loss_fn, rules="none")
    report = gradscope.check(model, batch, loss_fn, rules="none", copy=False)
    assert report.steps == 5


def test_errors_from_the_model_propagate(mlp):
    model, (x, y), loss_fn = mlp
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        gradscope.check(model, (x[:, :3], y), loss_fn, rules="none")
