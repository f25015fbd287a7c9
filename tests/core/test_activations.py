"""Activation statistics: values against NumPy on the same outputs, taken on sampled steps only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.capture.activations import activation_statistics, find_activations

from .helpers import value


def _np_dead(inactive: np.ndarray, unit_axis: int) -> float:
    other = tuple(a for a in range(inactive.ndim) if a != unit_axis)
    return float(np.mean(np.all(inactive, axis=other)))


@pytest.mark.parametrize("shape, unit_axis", [((8, 5), 1), ((4, 3, 6, 6), 1), ((2, 7, 5), 2)])
def test_relu_statistics_match_numpy(shape, unit_axis):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    # make two units dead for the whole batch
    idx = [slice(None)] * len(shape)
    idx[unit_axis] = slice(0, 2)
    x[tuple(idx)] = -1.0
    y = torch.relu(x)
    zero, dead, sat = activation_statistics(y, "relu", nn.ReLU(), channel_first_3d=False)
    ina = y.numpy() <= 0
    assert float(zero) == pytest.approx(float(np.mean(ina)))
    assert float(dead) == pytest.approx(_np_dead(ina, unit_axis))
    assert float(dead) >= 2 / shape[unit_axis]
    assert np.isnan(float(sat))


def test_tanh_and_sigmoid_saturation_match_numpy():
    torch.manual_seed(1)
    x = torch.randn(16, 10) * 4
    x[:, 0] = 50.0  # one unit saturated on every sample
    y = torch.tanh(x)
    zero, dead, sat = activation_statistics(y, "tanh", nn.Tanh(), channel_first_3d=False)
    sat_np = np.abs(y.numpy()) > np.sqrt(0.99)
    assert float(sat) == pytest.approx(float(np.mean(sat_np)))
    assert float(dead) == pytest.approx(_np_dead(sat_np, 1))
    assert np.isnan(float(zero))
    s = torch.sigmoid(x)
    _, _, sat_s = activation_statistics(s, "sigmoid", nn.Sigmoid(), channel_first_3d=False)
    sn = s.double().numpy()
    assert float(sat_s) == pytest.approx(float(np.mean(4 * sn * (1 - sn) < 0.01)))


def test_conv1d_outputs_are_read_channel_first():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3), nn.ReLU())
    info = {i.path: i for i, _ in find_activations(model)}
    assert info["1"].channel_first_3d and not info["4"].channel_first_3d


def test_activations_are_measured_on_sampled_steps_only_and_hooks_do_not_linger():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # units 0-2 of the first ReLU never fire
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    outputs = {}
    with gradscope.watch(model, optimizer=opt, sample_every=3, rules="none") as scope:
        for step in range(1, 8):
            x = torch.randn(10, 4)
            h = model[0](x)
            outputs[step] = (torch.relu(h).detach().numpy(), torch.tanh(model[2](torch.relu(h))).detach().numpy())
            # nothing on the user's modules ever; one global hook, on sampled steps only
            assert sum(len(m._forward_hooks) for m in model.modules()) == 0, step
            n_global = len(torch.nn.modules.module._global_forward_hooks)
            assert n_global == (1 if step in (1, 4, 7) else 0), step
            model(x).sum().backward()
            opt.step()
            scope.step()
            opt.zero_grad()
    df = scope.report().stats
    act = df[df.stat.str.startswith("act_")]
    assert sorted(act.step.unique()) == [1, 4, 7]
    for step in (1, 4, 7):
        relu_out, tanh_out = outputs[step]
        assert value(df, step, "1", "*", "act_zero_fraction") == pytest.approx(float(np.mean(relu_out <= 0)))
        assert value(df, step, "1", "*", "act_dead_fraction") == pytest.approx(_np_dead(relu_out <= 0, 1))
        assert value(df, step, "1", "*", "act_dead_fraction") >= 0.5
        sat = np.abs(tanh_out) > np.sqrt(0.99)
        assert value(df, step, "3", "*", "act_saturated_fraction") == pytest.approx(float(np.mean(sat)), abs=1e-6)


def test_eval_mode_forwards_are_ignored_and_activations_can_be_switched_off():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with gradscope.watch(model, sample_every=1, rules="none") as scope:
        model.eval()
        model(torch.full((3, 4), 5.0))
        model.train()
        x = torch.randn(3, 4)
        out = torch.relu(model[0](x)).detach().numpy()
        model(x).sum().backward()
        scope.step()
    assert value(scope.report().stats, 1, "1", "*", "act_zero_fraction") == pytest.approx(float(np.mean(out <= 0)))
    model2 = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with gradscope.watch(model2, activations=False, sample_every=1, rules="none") as scope2:
        model2(torch.randn(3, 4)).sum().backward()
        assert sum(len(m._forward_hooks) for m in model2.modules()) == 0
        scope2.step()
    assert not scope2.report().stats.stat.str.startswith("act_").any()


def test_report_in_the_middle_of_a_sampled_step_keeps_its_activations():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    with gradscope.watch(model, sample_every=1, flush_every=50, rules="none") as scope:
        for _ in range(2):
            x = torch.randn(5, 4)
            out = torch.relu(model[0](x)).detach().numpy()
            model(x).sum().backward()
            scope.report()  # flushes while the step is in progress
            scope.step()
            model.zero_grad()
    assert value(scope.report().stats, 2, "1", "*", "act_zero_fraction") == pytest.approx(float(np.mean(out <= 0)))


@pytest.mark.slow
def test_channels_last_outputs_are_read_in_place_and_match_numpy(cpu_kernel, monkeypatch):
    """A channels-last CNN's activation outputs are [N, H, W, C] in memory: the compiled kernel reads
    them in place as [N*H*W, C] (a unit is still a channel) instead of the per-module operator path."""
    from gradscope.capture import activations

    operator_path = []
    slow = activations._unit_counts_cpu
    monkeypatch.setattr(activations, "_unit_counts_cpu", lambda *a: operator_path.append(a) or slow(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh())
    with torch.no_grad():
        model[0].bias[:2] = -50.0  # channels 0 and 1 dead for every sample and position
        model[2].bias[0] = 50.0  # channel 0 of the tanh saturated everywhere
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    seen: dict[str, torch.Tensor] = {}
    for i in (1, 3):
        model[i].register_forward_hook(lambda m, a, y, i=i: seen.__setitem__(str(i), y.detach().clone()))
    scope = gradscope.watch(model, sample_every=1, rules="none")
    model(x).sum().backward()
    scope.step()
    df = scope.close().stats
    assert not seen["1"].is_contiguous() and seen["1"].is_contiguous(memory_format=torch.channels_last)
    assert operator_path == []  # both modules went through the kernel
    relu = seen["1"].numpy() <= 0
    sat = np.abs(seen["3"].numpy()) > np.sqrt(0.99)
    assert value(df, 1, "1", "*", "act_zero_fraction") == pytest.approx(float(np.mean(relu)), rel=1e-6)
    assert value(df, 1, "1", "*", "act_dead_fraction") == pytest.approx(_np_dead(relu, 1))
    assert value(df, 1, "1", "*", "act_dead_fraction") >= 2 / 6
    assert value(df, 1, "3", "*", "act_saturated_fraction") == pytest.approx(float(np.mean(sat)), rel=1e-6)
    assert value(df, 1, "3", "*", "act_dead_fraction") == pytest.approx(_np_dead(sat, 1))
    assert value(df, 1, "3", "*", "act_dead_fraction") >= 1 / 6
