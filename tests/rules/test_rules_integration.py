"""The rules on real tiny models trained through gradscope.watch, end to end."""

from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread (tests/conftest.py)


def _teacher(seed: int = 0, d: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=g)

    def batch(step: int, n: int = 64):
        gg = torch.Generator().manual_seed(seed * 1000 + step)
        x = torch.randn(n, d, generator=gg)
        return x, (x @ w).argmax(dim=1)

    return batch


def _mlp(widths: list[int], act: type = nn.ReLU, d: int = 16, out: int = 4) -> nn.Sequential:
    mods: dict[str, nn.Module] = {}
    for i, w in enumerate(widths):
        mods[f"fc{i}"] = nn.Linear(d, w)
        mods[f"act{i}"] = act()
        d = w
    mods["head"] = nn.Linear(d, out)
    return nn.Sequential(OrderedDict(mods))


def _train(
    model: nn.Module,
    steps: int,
    *,
    lr: float = 0.05,
    opt: torch.optim.Optimizer | None = None,
    loss_fn=F.cross_entropy,
    batch=None,
    **watch,
):
    batch = batch or _teacher()
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with gradscope.watch(model, optimizer=opt, **watch) as scope:
        for step in range(1, steps + 1):
            x, y = batch(step)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    return scope.report()


def test_a_healthy_mlp_has_no_findings() -> None:
    torch.manual_seed(0)
    report = _train(_mlp([64, 64]), 150)
    assert report.findings == [] and report.ok


def test_deep_sigmoid_network_reports_vanishing_gradients_with_its_layer() -> None:
    torch.manual_seed(0)
    report = _train(_mlp([32] * 8, nn.Sigmoid), 60)
    (f,) = [f for f in report.findings if f.kind == "vanishing_gradients"]
    assert f.step == 1 and f.severity == "error" and not report.ok
    assert f.layer in {f"fc{i}" for i in range(8)} and f.evidence["collapsed_layers"][0] == "fc0"
    torch.manual_seed(0)
    silenced = _train(_mlp([32] * 8, nn.Sigmoid), 60, thresholds={"vanishing_gradients": {"ratio": 1e-20}})
    assert "vanishing_gradients" not in {f.kind for f in silenced.findings}
    torch.manual_seed(0)
    without = _train(_mlp([32] * 8, nn.Sigmoid), 60, rules=["all", "-vanishing_gradients"])
    assert "vanishing_gradients" not in {f.kind for f in without.findings}


class _WhereSqrt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(torch.relu(self.fc0(x)))
        # finite forward, NaN backward: sqrt's derivative at z < 0 is NaN and 0 * NaN = NaN
        return self.head(torch.where(z > 0, torch.sqrt(z), torch.zeros_like(z)))


def test_nonfinite_gradients_name_the_first_layer_in_backward_order() -> None:
    torch.manual_seed(0)
    report = _train(_WhereSqrt(), 5)
    (f,) = [f for f in report.findings if f.kind == "nonfinite_gradients"]
    assert (f.step, f.layer, f.severity) == (1, "fc1", "error")
    assert f.evidence["loss_finite"] is True and f.evidence["backward_order"] == ["fc1", "fc0"]
    assert not report.ok
    with pytest.raises(gradscope.GradientHealthError, match="nonfinite_gradients"):
        report.raise_for_status()


def test_on_nonfinite_raise_stops_at_the_step_with_the_finding_as_message() -> None:
    torch.manual_seed(0)
    model = _WhereSqrt()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = _teacher()
    steps_done = 0
    with pytest.raises(gradscope.NonFiniteGradientError) as info:
        with gradscope.watch(model, optimizer=opt, on_nonfinite="raise") as scope:
            for step in range(1, 6):
                x, y = batch(step)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                scope.step(loss=loss)
                steps_done = step
                opt.zero_grad()
    assert steps_done == 0  # raised inside scope.step() of step 1
    message = str(info.value)
    assert "nonfinite_gradients in 'fc1' at step 1" in message and "weights are intact" in message
    assert [f.kind for f in info.value.report.findings] == ["nonfinite_gradients"]
    assert scope.closed


def test_a_log_of_zero_in_the_loss_is_blamed_on_the_loss() -> None:
    torch.manual_seed(0)

    def naive_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits * 200.0, dim=1)
        return -torch.log(p[torch.arange(len(y)), y]).mean()

    report = _train(_mlp([32]), 5, loss_fn=naive_ce)
    (f,) = [f for f in report.findings if f.kind == "nonfinite_gradients"]
    assert f.layer == "head" and f.evidence["loss_finite"] is False and "log(0)" in f.suggestion


def test_an_unused_branch_has_no_gradient() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    report = _train(TwoHeads(), 60)
    assert [(f.kind, f.layer, f.step) for f in report.findings] == [("no_gradient", "aux", 1)]
    assert report.findings[0].evidence["params"] == ["aux.weight", "aux.bias"]


def test_dead_units_with_every_and_sample_every() -> None:
    torch.manual_seed(0)
    model = _mlp([64, 64])
    with torch.no_grad():
        model.fc1.bias[:48] = -20.0  # 75% of act1 never fires
    report = _train(model, 80, every=2, sample_every=4)
    dead = [f for f in report.findings if f.kind == "dead_units"]
    assert [(f.layer, f.step) for f in dead] == [("act1", 1)]
    assert dead[0].evidence["value"] == pytest.approx(0.75, abs=0.02)


def test_gradscaler_skipped_steps_are_not_explosions_nor_nonfinite() -> None:
    torch.manual_seed(0)
    model = _mlp([64, 64])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    batch = _teacher()
    with gradscope.watch(model, optimizer=opt) as scope:
        for step in range(1, 81):
            x, y = batch(step)
            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if step in (1, 2, 3, 40):
                with torch.no_grad():
                    model.fc1.weight.grad[0, 0] = math.inf  # what an fp16 overflow looks like
            scaler.step(opt)
            scaler.update()
            scope.step(loss=loss)
            opt.zero_grad()
    report = scope.report()
    assert report.skipped_steps == [1, 2, 3, 40]
    assert report.findings == []


def test_scope_tells_rules_which_activations_are_outputs_and_the_dtypes() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid()).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt) as scope:
        loss = model(torch.randn(8, 4, dtype=torch.float64)).mean()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        assert scope._order.output_activations() == [1]  # the Sigmoid; the Tanh feeds a layer
        assert scope.schema.dtypes == ["float64"] * 4


def test_fast_subset_of_the_detection_benchmark() -> None:
    sys.path.insert(0, os.path.abspath(BENCHMARKS))
    try:
        from scenarios.catalog import by_name
        from scenarios.harness import run_scenario
    finally:
        sys.path.pop(0)
    for name in ("healthy_cnn", "deep_sigmoid", "log_zero_loss", "negative_bias_dead_relu", "lr_zero"):
        sc = by_name(name)
        run = run_scenario(sc)
        kinds = {f.kind for f in run.findings}
        assert set(sc.expected) <= kinds, (name, kinds)
        assert kinds <= set(sc.expected) | set(sc.allowed), (name, kinds)
        for kind, exp in sc.expected.items():
            if exp.origin is not None:
                assert {f.layer for f in run.findings if f.kind == kind} & exp.origin, (name, kind)


def test_rules_from_all_that_cannot_run_are_left_out_but_named_rules_are_strict() -> None:
    model = _mlp([8])
    with gradscope.watch(model, activations=False) as scope:
        assert {r.name for r in scope.engine.rules}.isdisjoint({"dead_units", "saturated_activations"})
        # no optimizer: the learning-rate rules have no update_ratio either
        assert scope.engine.inactive == [
            "dead_units (needs activation statistics)",
            "saturated_activations (needs activation statistics)",
            "learning_rate_too_high (needs update_ratio)",
            "learning_rate_too_low (needs update_ratio)",
            "batch_size_too_small (needs noise_scale)",
            "batch_size_too_large (needs noise_scale)",
        ]
    with gradscope.watch(model, stats=["l2_norm", "rms"]) as scope:
        assert scope.engine.inactive == [
            "nonfinite_gradients (needs nonfinite_count)",
            "learning_rate_too_high (needs update_ratio)",
            "learning_rate_too_low (needs update_ratio)",
            "batch_size_too_small (needs noise_scale)",
            "batch_size_too_large (needs noise_scale)",
        ]
    with pytest.raises(gradscope.ConfigurationError, match="needs activation statistics"):
        gradscope.watch(model, activations=False, rules=["all", "dead_units"])
    with pytest.raises(gradscope.ConfigurationError, match="nonfinite_count"):
        gradscope.watch(model, stats=["l2_norm"], thresholds={"nonfinite_gradients": {}})


def test_findings_are_the_same_when_the_frame_thins_old_rows() -> None:
    class Memoriser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(16, 128), nn.Linear(128, 4), nn.Linear(128, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))  # `aux` is never used

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    xv, yv = torch.randn(128, 16, generator=g), torch.randint(0, 4, (128,), generator=g)

    def run(history: int | None) -> list[tuple[str, int, str | None]]:
        torch.manual_seed(0)
        model = Memoriser()
        model.aux.requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        with gradscope.watch(model, optimizer=opt, history=history, flush_every=50) as scope:
            for step in range(1, 401):
                if step == 200:
                    model.aux.requires_grad_(True)  # unfrozen, still unused: episodes start after thinning
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                val = F.cross_entropy(model(xv), yv).item() if step >= 200 and step % 10 == 0 else None
                scope.step(loss=loss, val_loss=val)
                opt.zero_grad()
        report = scope.report()
        if history is not None:
            assert report.meta["history"]["dropped_rows"] > 0  # rows were thinned
        return [(f.kind, f.step, f.layer) for f in report.findings]

    full = run(None)
    assert ("no_gradient", 200, "aux") in full and "overfitting" in {k for k, _, _ in full}
    assert run(100) == full
