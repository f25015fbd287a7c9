"""Live diagnosis: report() before close(), provisional findings, on_finding, stop_on, the live cadence.

Each fault is built so that its kind is known independently of gradscope (a head the forward pass
never uses gets no gradient; a learning rate of 0 cannot lower the loss; a NaN written into a
gradient is non-finite; a deep sigmoid stack shrinks input-side gradients by ~0.25 per layer).
"""

from __future__ import annotations

import gc
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.capture.live import LiveCadence
from gradscope.errors import GradientHealthError, GradscopeWarning
from gradscope.rules.base import Rule, RuleContext
from gradscope.stats.frame import StatsFrame


class FakeClock:
    """A clock the test advances: training takes ``step`` seconds, gradscope's own work none."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 2)
        self.unused = nn.Linear(16, 2)  # trainable, never called: never gets a gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def deep_sigmoid() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 1))


def _run(fault: str, steps: int, *, report_at: int | None = None, clock: FakeClock | None = None, **kw):
    """Train a short faulty run; return (report before close or at ``report_at``, report of close(), scope)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = deep_sigmoid() if fault == "vanishing" else TwoHeads()
    lr = 0.0 if fault == "lr0" else 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scope = gradscope.watch(model, optimizer=opt, **kw)
    if clock is not None:
        scope._diagnosis.cadence.clock = clock
    live = None
    for step in range(1, steps + 1):
        if fault == "lr0":
            g.manual_seed(1)  # one fixed batch: with lr=0 the loss cannot move at all
        x = torch.randn(16, 16 if fault == "vanishing" else 8, generator=g)
        loss = model(x).pow(2).mean() + 1.0
        loss.backward()
        if fault == "nan" and step == 7:
            model.body.weight.grad[0, 0] = float("nan")
        opt.step()
        if clock is not None:
            clock.now += 1.0  # a slow step: the live cadence evaluates every step
        scope.step(loss=loss)
        opt.zero_grad()
        if step == (report_at or steps):
            live = scope.report()
    final = scope.close()
    return live, final, scope


FAULTS = {  # fault -> (steps, the kind it must produce)
    "vanishing": (40, "vanishing_gradients"),
    "unused_head": (30, "no_gradient"),
    "lr0": (40, "loss_not_decreasing"),
    "nan": (30, "nonfinite_gradients"),
}


def _kinds(report: gradscope.Report) -> set[str]:
    return {f.kind for f in report.findings}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_report_before_close_gives_the_kinds_close_gives(fault):
    steps, kind = FAULTS[fault]
    live, final, _ = _run(fault, steps)
    assert kind in _kinds(final), [str(f) for f in final.findings]
    assert _kinds(live) == _kinds(final), ([str(f) for f in live.findings], [str(f) for f in final.findings])
    # close() confirms everything; the live report says how recent it is
    assert not any(f.provisional for f in final.findings)
    assert live.meta["live"]["judged_to_step"] == steps and live.meta["live"]["pending_rows"] == 0
    assert live.meta["live"]["provisional"] == sum(f.provisional for f in live.findings)
    assert "live" not in final.meta


def test_a_partial_window_from_initialisation_is_provisional_until_close():
    # 40 steps of a fault present from step 1: fewer than the rule's 50-step window, so only the
    # final judgement (close(), or report()'s judgement "as if it ended now") finds it.
    live, final, _ = _run("vanishing", 40)
    (v_live,) = [f for f in live.findings if f.kind == "vanishing_gradients"]
    (v_final,) = [f for f in final.findings if f.kind == "vanishing_gradients"]
    assert v_live.provisional and not v_final.provisional
    assert (v_live.kind, v_live.layer, v_live.step) == (v_final.kind, v_final.layer, v_final.step)
    assert "(provisional)" in str(v_live) and "(provisional)" not in str(v_final)
    as_json = [f for f in json.loads(live.to_json())["findings"] if f["kind"] == "vanishing_gradients"]
    assert as_json[0]["provisional"] is True


def test_report_leaves_the_rules_state_alone():
    # The same run with and without report() calls along the way: close() gives the same findings.
    without = None
    for calls in (True, False):
        torch.manual_seed(0)
        model = deep_sigmoid()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1)
        scope = gradscope.watch(model, optimizer=opt, flush_every=10)
        for step in range(1, 36):
            model(torch.randn(16, 16, generator=g)).pow(2).mean().backward()
            opt.step()
            scope.step()
            opt.zero_grad()
            if calls and step % 3 == 0:
                before = [f.to_dict() for f in scope.engine.findings]
                scope.report()
                assert [f.to_dict() for f in scope.engine.findings] == before  # confirmed ones unchanged
        final = [f.to_dict() for f in scope.close().findings]
        if not calls:
            without = final
        else:
            got = final
    assert got == without


def test_on_finding_is_called_once_per_confirmed_finding_with_its_step():
    seen: list[gradscope.Finding] = []
    _, final, _ = _run("nan", 30, on_finding=seen.append, flush_every=10)
    # every confirmed finding, as close() reports it, was handed over (none provisional)
    assert sorted((f.kind, f.layer, f.step) for f in seen) == sorted((f.kind, f.layer, f.step) for f in final.findings)
    assert len({(f.kind, f.layer) for f in seen}) == len(seen)  # once each
    (nan,) = [f for f in seen if f.kind == "nonfinite_gradients"]
    assert nan.step == 7 and not nan.provisional


def test_a_failing_on_finding_is_a_warning_and_training_goes_on():
    def broken(finding):
        raise RuntimeError("callback bug")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradscopeWarning)
        _, final, scope = _run("nan", 30, on_finding=broken, flush_every=10)
    assert scope.step_count == 30
    assert any("callback bug" in e for e in final.errors), final.errors
    assert any("callback bug" in str(w.message) for w in caught)


def test_stop_on_error_raises_from_step_soon_after_a_nan_and_the_report_names_it(tmp_path):
    path = tmp_path / "report.json"
    clock = FakeClock()
    with pytest.raises(GradientHealthError, match="nonfinite_gradients") as info:
        _run("nan", 30, stop_on="error", report_path=path, clock=clock)
    exc = info.value
    assert "stopped the run at step" in str(exc) and str(path) in str(exc)
    step = int(str(exc).split("stopped the run at step ")[1].split(":")[0])
    assert 7 <= step <= 10, step  # the NaN is at step 7
    written = gradscope.Report.from_json(path)
    assert "nonfinite_gradients" in {f.kind for f in written.findings}
    assert any(f.kind == "nonfinite_gradients" for f in exc.report.findings)
    # The stopped run's scope is still open (the traceback holds it): collected here, its finaliser
    # closes it now, not in whichever later test the garbage collector happens to run in.
    del info, exc
    gc.collect()


def test_stop_on_a_kind_that_never_shows_does_not_stop():
    _, final, scope = _run("nan", 20, stop_on="exploding_gradients", flush_every=5)
    assert scope.step_count == 20 and "nonfinite_gradients" in _kinds(final)


class StepsSeen(Rule):
    """Test rule: the new steps each engine run hands over."""

    name = "test_steps_seen"

    def reset(self) -> None:
        self.runs: list[list[int]] = []

    def check(self, ctx: RuleContext) -> list:
        self.runs.append([int(s) for s in ctx.steps[ctx.new_from :]])
        return []


def _probe_run(steps: int, clock: FakeClock | None, flush_every: int = 50) -> tuple[StepsSeen, gradscope.GradScope]:
    probe = StepsSeen()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    scope = gradscope.watch(model, rules=[probe], flush_every=flush_every, activations=False)
    if clock is not None:
        scope._diagnosis.cadence.clock = clock
    for _ in range(steps):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        if clock is not None:
            clock.now += 1.0
        scope.step()
        model.zero_grad()
    scope.close()
    return probe, scope


def test_slow_steps_are_judged_every_step_before_the_first_flush():
    probe, scope = _probe_run(30, FakeClock())
    # steps of 1 s, evaluations of ~0 s: k = 1; the first evaluation waits for one measured step
    assert scope._diagnosis.cadence.every == 1
    flat = [s for run in probe.runs for s in run]
    assert flat == list(range(1, 31))  # every step handed over once, in order
    assert [len(r) for r in probe.runs[:-1]] == [2] + [1] * 28, probe.runs


def test_tiny_steps_are_not_judged_every_step():
    probe, _ = _probe_run(120, None, flush_every=40)
    flat = [s for run in probe.runs for s in run]
    assert flat == list(range(1, 121))
    # a step of well under a millisecond against an evaluation of ~1 ms: k is far above 1
    assert len(probe.runs) < 20, [len(r) for r in probe.runs]


class SlowProbe(StepsSeen):
    """StepsSeen whose evaluation takes ``seconds`` on the fake clock."""

    name = "slow_probe"

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def check(self, ctx: RuleContext) -> list:
        self.clock.now += self.seconds
        return super().check(ctx)


def test_a_periodic_flush_between_live_evaluations_leaves_its_rows_to_the_next_one():
    # 1 s steps, 33 ms evaluations: k = ceil(0.033 / (0.5% x 1 s)) = 7, below flush_every=10. The
    # first flush (step 10) judges: the cadence has measured fewer than flush_every steps. The flushes
    # at 20, 30, ... add no evaluation: their rows are judged at the next k-th step.
    clock = FakeClock()
    probe = SlowProbe(clock, 0.033)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    scope = gradscope.watch(model, rules=[probe], flush_every=10, activations=False)
    scope._diagnosis.cadence.clock = clock
    for step in range(1, 61):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        clock.now += 1.0
        scope.step()
        model.zero_grad()
        if step == 41:
            assert scope.flush() == []  # an explicit flush always judges
    assert scope._diagnosis.cadence.every == 7
    ends = [run[-1] for run in probe.runs]
    assert ends == [2, 9, 10, 17, 24, 31, 38, 41, 48, 55], ends  # 2: the first, measured evaluation
    flat = [s for run in probe.runs for s in run]
    assert flat == list(range(1, 56))  # every row judged once, in order
    scope.close()
    assert [s for run in probe.runs for s in run] == list(range(1, 61))


@pytest.mark.parametrize(
    ("step_time", "eval_time", "k"),
    [(1.0, 0.005, 1), (1.0, 0.02, 2), (0.1, 0.005, 5), (0.001, 0.002, 50), (0.01, 0.0, 1)],
)
def test_cadence_follows_the_budget(step_time, eval_time, k):
    # the full evaluations get half the budget (the screen the other half): 0.02 / 2 = 1% here
    clock = FakeClock()
    c = LiveCadence(50, budget=0.02, clock=clock)
    assert c.every == 50  # nothing measured: no live evaluation
    for _ in range(3):
        c.step_started()
        clock.now += eval_time
        c.evaluated(eval_time)
        c.step_ended()
        clock.now += step_time
    c.step_started()
    want = min(50, max(1, math.ceil(eval_time / (0.02 / 2 * step_time) - 1e-9)))
    assert c.every == want == k
    c.waiting = k
    assert c.due() == (k < 50)


def test_a_slow_first_measurement_does_not_pin_the_cadence():
    """The first screens of a run cost several times a later one (first calls, the warm-up's full path).
    Kept as the estimate, such a figure made ``k_s`` ``flush_every``, where only live screens were timed:
    nothing corrected it. A flush's screen and evaluation now refresh the estimates (without counting as
    live ones), and a time under half the estimate replaces it; above, it is averaged in."""
    clock = FakeClock()
    c = LiveCadence(50, clock=clock)  # budget 1%: the screen gets 0.25% of the step time
    for _ in range(3):
        c.step_started()
        c.step_ended()
        clock.now += 0.002  # 2 ms steps
    c.step_started()
    c.screened(600e-6)  # 600 us: ceil(600 / 5) = 120 steps, clamped
    assert c.screen_every == 50 and c.screens == 1
    c.screened(None, live=False)  # the screen's warm-up: not timed
    assert c.screen_time == pytest.approx(600e-6) and c.screens == 1
    c.screened(60e-6, live=False)  # a flush's screen
    assert c.screen_time == pytest.approx(60e-6) and c.screen_every == 12 and c.screens == 1
    c.screened(100e-6)  # above half the estimate: averaged (0.8 / 0.2)
    assert c.screen_time == pytest.approx(0.8 * 60e-6 + 0.2 * 100e-6) and c.screens == 2
    c.evaluated(0.004)  # the same for evaluations (0.5 / 0.5)
    c.evaluated(0.001, live=False)
    assert c.eval_time == pytest.approx(0.001) and c.evaluations == 1 and c.every == 50
    c.evaluated(0.0015)
    assert c.eval_time == pytest.approx(0.00125) and c.evaluations == 2


def test_frame_append_is_amortised_and_exact():
    from gradscope.stats.frame import FrameSchema

    schema = FrameSchema(
        param_names=["w"], param_layers=["l"], param_leaves=["w"], numels=np.ones(1), layers=["l"],
        layer_members=[[0]], stats=["l2_norm"], custom={},
    )  # fmt: skip
    frame = StatsFrame(schema, history=None)
    rng = np.random.default_rng(0)
    chunks, reallocations, last = [], 0, None
    for i in range(1, 1001):
        names = ["loss"] if i < 500 else ["loss", "lr"]  # a scalar that appears late
        chunk = {
            "steps": np.array([i]),
            "skipped": np.array([False]),
            "has_grad": np.ones((1, 1), bool),
            "trainable": np.ones((1, 1), bool),
            "sampled": np.array([i % 2 == 0]),
            "moments": rng.normal(size=(1, 1, frame.moments.shape[2])),
            "act": np.zeros((1, 0, 3)),
            "scalars": rng.normal(size=(1, len(names))),
        }
        chunks.append(chunk)
        frame.append(chunk, names, thin=False)
        data = frame._data["moments"]
        reallocations += data is not last
        last = data
    assert reallocations <= 12  # capacity doubling: O(log n) copies, not one per append
    np.testing.assert_array_equal(frame.moments, np.concatenate([c["moments"] for c in chunks]))
    np.testing.assert_array_equal(frame.steps, np.arange(1, 1001))
    lr = frame.scalar("lr")
    assert np.isnan(lr[:499]).all() and np.array_equal(lr[499:], [c["scalars"][0, 1] for c in chunks[499:]])
    copy = frame.copy()
    copy.append(chunks[0], ["loss", "lr"], thin=False)
    assert len(copy) == 1001 and len(frame) == 1000
