"""learning_rate_too_high / _too_low: their running state and helpers against NumPy, on small seeded runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope
from gradscope.rules.learning_rate import (
    _median,
    _model_update_ratio,
    _noise,
    _running_median,
)


def test_medians_and_noise_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 10, 51):
        x = rng.normal(size=n)
        assert _median(x) == np.median(x)
    x = rng.normal(size=40)
    want = np.median(np.lib.stride_tricks.sliding_window_view(x, 10), axis=1)
    np.testing.assert_allclose(_running_median(x, 10), want, rtol=0, atol=0)
    # the noise of a straight line plus N(0, s): second differences cancel the line, 1.4826 * MAD / sqrt(6)
    y = 3.0 - 0.01 * np.arange(400) + rng.normal(scale=0.2, size=400)
    d = np.diff(y, n=2)
    assert np.isclose(_noise(y), 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(6.0))
    assert 0.17 < _noise(y) < 0.23


def _run(opt_name: str, lr: float, steps: int, *, rules, probe_every: int = 0, kill_at: int = 0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        if opt_name == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=lr)
    )
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    probes = []
    with gradscope.watch(model, optimizer=opt, rules=rules) as scope:
        for step in range(1, steps + 1):
            if step == kill_at:
                with torch.no_grad():
                    model[0].bias[:60] -= 30.0  # 60 of 64 ReLUs stop firing: the steps shrink, the lr did not
            g = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(64, 16, generator=g)
            loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            if probe_every and step % probe_every == 0:
                probes.append(scope.report())
    return scope, probes


def test_model_update_ratio_is_the_frames_global_value():
    scope, _ = _run("sgd", 0.05, 30, rules="none")
    frame = scope.frame
    rows = np.flatnonzero(frame.sampled)
    want = frame.global_values("update_ratio", rows)
    np.testing.assert_allclose(_model_update_ratio(frame, rows), want, rtol=1e-12)
    # and by hand from the moments' definition: sqrt(sum ||dw||^2) / sqrt(sum ||w||^2) over the parameters
    pn = frame.param_values("param_norm", rows)
    ur = frame.param_values("update_ratio", rows)
    np.testing.assert_allclose(want, np.sqrt(((ur * pn) ** 2).sum(1)) / np.sqrt((pn**2).sum(1)), rtol=1e-12)


def test_state_is_incremental_and_survives_report_probes():
    """The same findings whether the rules run at each flush only or also in report()'s provisional copies."""
    rules = ["learning_rate_too_low", "learning_rate_too_high"]
    plain, _ = _run("adamw", 1e-4, 220, rules=rules)
    probed, _ = _run("adamw", 1e-4, 220, rules=rules, probe_every=11)
    a = [(f.kind, f.step, f.evidence["median_update_ratio"]) for f in plain.report().findings]
    b = [(f.kind, f.step, f.evidence["median_update_ratio"]) for f in probed.report().findings]
    assert a == b and [k for k, _, _ in a] == ["learning_rate_too_low"]
    # the buffers stay bounded: at most 2 windows (+ smooth) of losses, whatever the run's length
    rule = next(r for r in probed.engine.rules if r.name == "learning_rate_too_high")
    assert len(rule._loss) <= 2 * 50 + 10 and len(rule._ratio) <= (2 * 50 + 10) // 10 + 1
    # a deep copy (what report() judges on) carries the state: same answer on the same frame
    twin = copy.deepcopy(rule)
    assert twin._seen == rule._seen and np.array_equal(twin._loss, rule._loss) and twin._best == rule._best


def test_steps_that_shrank_after_a_collapse_are_not_a_low_learning_rate():
    # ReLUs killed at step 60: SGD's steps shrink with the gradient and the loss crawls; lr is not the cause
    scope, _ = _run("sgd", 0.05, 260, rules=["learning_rate_too_low"], kill_at=60)
    assert not scope.report().findings
    rule = scope.engine.rules[0]
    assert rule._top > 3 * np.median(rule._ratio)  # the window medians before the kill were > 3x today's


def test_large_steps_that_gain_nothing_are_too_high():
    # plain momentum SGD at lr 30 on this task: the update ratio stays far above 5 %, the loss never gets below
    # where it started
    scope, _ = _run("sgd", 30.0, 120, rules=["learning_rate_too_high", "learning_rate_too_low"])
    found = {f.kind: f for f in scope.report().findings}
    assert set(found) == {"learning_rate_too_high"}
    ev = found["learning_rate_too_high"].evidence
    assert max(ev["max_update_ratio"], ev["median_update_ratio"]) >= 0.05
    assert ev["loss"] > ev["best_loss"]


def test_a_loss_that_jumps_after_the_first_updates_is_an_overshoot():
    # AdamW at lr 0.3 on this task: its first step moves every entry by about lr (update ratio 2.2), the loss
    # goes 1.46 -> 5.83, 4.28, 1.34 at steps 2-4, then recovers: a median of 3 of 4.28, 2.9x the loss before
    # any update, far above its noise. At lr 0.03 the loss falls from the first step on: silent.
    scope, _ = _run("adamw", 0.3, 60, rules=["learning_rate_too_high", "learning_rate_too_low"])
    frame = scope.frame
    loss = frame.scalar("loss")
    (f,) = scope.report().findings
    ev = f.evidence
    assert f.kind == "learning_rate_too_high" and ev["signal"] == "overshoot" and f.step == 1
    # the peak median of 3 over steps 2..11 (the `smooth` steps after the first update), by numpy
    med3 = np.median(np.lib.stride_tricks.sliding_window_view(loss[1:11], 3), axis=1)
    i = int(np.argmax(med3))
    assert ev["window"] == [1, i + 4] and ev["loss"] == med3[i] and ev["best_loss"] == ev["start_loss"] == loss[0]
    assert ev["noise"] == _noise(loss[:50])
    assert ev["loss"] > 1.1 * loss[0] and ev["loss"] > loss[0] + 4 * ev["noise"]  # rise and z
    # the largest model update ratio among the sampled steps up to the peak, from the frame's own aggregate
    rows = np.flatnonzero(frame.sampled & (frame.steps <= i + 4))
    assert ev["max_update_ratio"] == pytest.approx(float(np.max(frame.global_values("update_ratio", rows))), rel=1e-12)
    assert ev["max_update_ratio"] >= 0.05

    calm, _ = _run("adamw", 0.03, 60, rules=["learning_rate_too_high"])
    calm_loss = calm.frame.scalar("loss")
    calm_med3 = np.median(np.lib.stride_tricks.sliding_window_view(calm_loss[1:11], 3), axis=1)
    assert calm_med3.max() < calm_loss[0]  # the loss never rose above where it started: nothing to report
    assert not calm.report().findings
