"""The live screen, the findings log and the zero_grad trap, on real runs of tiny models.

Each fault is known independently of gradscope: a NaN written into a gradient is non-finite; a
ReLU layer whose bias is set to -100 outputs zero for every sample; ``zero_grad()`` before
``scope.step()`` leaves every ``.grad`` None (torch's default ``set_to_none=True``).
"""

from __future__ import annotations

import copy
import gc
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.capture.live import _NEVER, HOT_STEPS, LiveScreen


@pytest.fixture(autouse=True)
def _no_stale_scope():
    """Collect first: a scope an earlier test left open (a run stopped by an exception) is closed by
    its finaliser, which logs the findings its final judgement confirms; here that would land in
    the records these tests count."""
    gc.collect()


class FakeClock:
    """A clock the test advances: training takes ``step`` seconds, gradscope's own work none."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def _train(steps: int, *, fault=None, zero_grad_first: bool = False, clock: FakeClock | None = None, **kw):
    """``steps`` SGD steps of a 3-layer ReLU MLP; ``fault(step, model)`` runs after backward()."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch_kw = {} if zero_grad_first else {"optimizer": opt}
    scope = gradscope.watch(model, **watch_kw, **kw)
    if clock is not None:
        scope._diagnosis.cadence.clock = clock
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if fault is not None:
            fault(step, model)
        opt.step()
        if zero_grad_first:
            opt.zero_grad()  # the trap: gradients cleared before gradscope reads them
        if clock is not None:
            clock.now += 1.0
        scope.step(loss=loss)
        if not zero_grad_first:
            opt.zero_grad()
    return scope


def test_a_nan_is_announced_at_its_own_step_with_the_default_cadence(caplog):
    # A ~1 ms step: the rules themselves run only at flushes (every 50 steps), but a CPU row is host
    # memory, so the row holding the NaN makes them run at that very step.
    def nan_at_37(step: int, model: nn.Module) -> None:
        if step == 37:
            model[2].weight.grad[0, 0] = float("nan")

    seen: list[tuple[int, str]] = []
    steps = {"now": 0}

    def on_finding(f):
        seen.append((steps["now"], f.kind))

    with caplog.at_level(logging.WARNING, logger="gradscope"):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scope = gradscope.watch(model, optimizer=opt, on_finding=on_finding)
        g = torch.Generator().manual_seed(1)
        for step in range(1, 46):
            steps["now"] = step
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            nan_at_37(step, model)
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
            if step == 37:
                assert "nonfinite_gradients" in {k for _, k in seen}, "not announced at its own step"
        scope.close()
    assert (37, "nonfinite_gradients") in seen
    # NaN stays in the weights: later rows flag only the parameters it newly reaches, not every step
    assert 1 <= scope._diagnosis.cadence.triggered <= 3
    records = [r for r in caplog.records if r.name == "gradscope" and "nonfinite_gradients" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert records[0].getMessage().startswith("step 37: nonfinite_gradients in '2'")


def test_each_finding_is_logged_once_at_the_step_it_became_visible(caplog):
    # Two faults mid-run with slow (fake) steps: the ReLU after layer 0 dies at step 70 (bias -100),
    # a NaN at step 90. Every finding on_finding receives is logged exactly once, at the same step.
    def faults(step: int, model: nn.Module) -> None:
        if step == 69:
            with torch.no_grad():
                model[0].bias.fill_(-100.0)
        if step == 90:
            model[4].weight.grad[0, 0] = float("nan")

    handed: list[tuple[int, str, object]] = []
    clock = FakeClock()
    holder: dict = {}

    def on_finding(f):
        handed.append((holder["scope"]._step, f.kind, f.layer))

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.WARNING, logger="gradscope"):
        scope = gradscope.watch(model, optimizer=opt, on_finding=on_finding)
        holder["scope"] = scope
        scope._diagnosis.cadence.clock = clock
        g = torch.Generator().manual_seed(1)
        for step in range(1, 101):
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            faults(step, model)
            opt.step()
            clock.now += 1.0
            scope.step(loss=loss)
            opt.zero_grad()
        final = scope.close()
    logged = [r for r in caplog.records if r.name == "gradscope"]
    kinds = {k for _, k, _ in handed}
    assert {"dead_units", "nonfinite_gradients"} <= kinds, handed
    assert len(logged) == len(handed)  # once each, nothing else
    for (step, kind, layer), record in zip(handed, logged):
        where = "the model" if layer is None else repr(layer)
        assert record.getMessage().startswith(f"step {step}: {kind} in {where}")
    dead = {layer: step for step, kind, layer in handed if kind == "dead_units"}
    # the first sampled step after the onset (steps 1, 11, ..., 71): one sample confirms a mid-run
    # onset (the layer after it sees only its biases: the units whose bias is negative die too)
    assert dead["1"] == 71
    assert {f.kind for f in final.findings} >= {"dead_units", "nonfinite_gradients"}


def test_logging_can_be_silenced(caplog):
    def nan_at_5(step: int, model: nn.Module) -> None:
        if step == 5:
            model[2].weight.grad[0, 0] = float("nan")

    log = logging.getLogger("gradscope")
    before = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with caplog.at_level(logging.WARNING):
            log.setLevel(logging.CRITICAL)
            report = _train(12, fault=nan_at_5).close()
    finally:
        log.setLevel(before)
    assert "nonfinite_gradients" in {f.kind for f in report.findings}
    assert not [r for r in caplog.records if r.name == "gradscope"]


def test_zero_grad_before_scope_step_is_one_model_level_finding():
    report = _train(30, zero_grad_first=True).close()
    (f,) = [f for f in report.findings if f.kind == "no_gradient"]
    assert f.layer is None and f.step == 1 and f.last_step == 30
    assert "scope.step() after opt.step() and before opt.zero_grad()" in f.suggestion
    assert "optimizer=" in f.suggestion and f.evidence["steps_without_any_grad"] == 10  # confirmed after `confirm`
    # the same run in the right order: no finding at all
    assert _train(30).close().findings == []


def test_the_screen_makes_the_rules_run_when_a_parameter_stops_getting_a_gradient():
    # slow (fake) steps of 1 s: the screen runs at every step and flags the stop after 5 rows
    clock = FakeClock()

    def detach_last(step: int, model: nn.Module) -> None:
        if step >= 80:
            model[4].bias.grad = None  # the output bias stops getting a gradient from step 80

    scope = _train(110, fault=detach_last, clock=clock)
    d = scope._diagnosis
    assert d.last_trigger is not None and d.last_trigger[1] == ["no_gradient"]
    assert 84 <= d.last_trigger[0] <= 85  # 5 rows without a gradient (steps 80-84)
    report = scope.close()
    (f,) = [f for f in report.findings if f.kind == "no_gradient"]
    assert (f.step, f.layer) == (80, "4")


def test_live_screen_on_rows():
    # The screen alone, on a frame grown row by row: what it flags, and only when new.
    from gradscope.stats.frame import FrameSchema, StatsFrame
    from gradscope.stats.moments import MOMENT_INDEX as M
    from gradscope.stats.moments import MOMENTS

    schema = FrameSchema(
        param_names=["a.w", "b.w"],
        param_layers=["a", "b"],
        param_leaves=["w", "w"],
        numels=np.array([4.0, 4.0]),
        layers=["a", "b"],
        layer_members=[[0], [1]],
        stats=("l2_norm", "nonfinite_count"),
        custom={},
        sampled_stats=(),
        act_modules=["r"],
        act_kinds=["relu"],
        dtypes=["float32", "float32"],
    )
    frame = StatsFrame(schema)
    screen = LiveScreen()

    def add(step: int, rms=(1e-2, 1e-2), has=(True, True), nonfinite=0.0, dead=np.nan) -> list[str]:
        mom = np.full((1, 2, len(MOMENTS)), np.nan)
        mom[0, :, M["sumsq"]] = np.square(rms) * 4
        mom[0, :, M["nonfinite"]] = nonfinite
        act = np.full((1, 1, 3), np.nan)
        act[0, 0, 1] = dead
        frame.append(
            {
                "steps": np.array([step]),
                "skipped": np.zeros(1, bool),
                "has_grad": np.array([has]),
                "trainable": np.ones((1, 2), bool),
                "moments": mom,
                "sampled": np.array([not np.isnan(dead)]),
                "act": act,
                "scalars": np.zeros((1, 0)),
            },
            [],
        )
        return screen(frame)

    assert all(add(s) == [] for s in range(1, 21))  # healthy: nothing
    assert add(21, rms=(1e-2, 2e-1)) == []  # 20x, more than a decade, at one row: a spike
    assert add(22, rms=(1e-2, 2e-1)) == ["shift"]  # at a second row: it lasts
    assert add(23, rms=(1e-2, 2e-1)) == []  # still shifted: not new
    assert add(24, nonfinite=1.0) == ["nonfinite"]
    assert add(25, dead=0.9) == ["activation"] and add(26, dead=0.95) == []
    flags = [add(s, has=(True, False)) for s in range(27, 33)]
    assert flags == [[], [], [], [], ["no_gradient"], []]  # the 5th row without one
    assert add(33, has=(False, False)) == ["no_gradient"]  # no gradient anywhere
    assert HOT_STEPS >= 10  # a rule's `confirm` span fits in the hot period


def test_after_a_flag_about_activations_alone_the_rules_run_at_sampled_steps_only():
    # Most units of the first ReLU dead from step 1 (bias -3 on unit inputs of about +-1): the screen
    # flags the activation module on the first sampled row. Activation statistics arrive on sampled
    # steps (1, 11, 21, ...) alone, so the hot period evaluates there, over 3 x sample_every steps,
    # not at every step in between; dead_units (3 sampled steps) is confirmed at step 21 all the same.
    model = _mlp()
    with torch.no_grad():
        model[0].bias.fill_(-3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    evaluated: list[int] = []
    confirmed: dict[str, int] = {}
    step_now = {"n": 0}
    scope = gradscope.watch(model, optimizer=opt, on_finding=lambda f: confirmed.setdefault(f.kind, step_now["n"]))
    diagnosis = scope._diagnosis
    ticks = iter(range(10**6))
    # every reading of the clock one second later: a step, a screen and an evaluation all "take" about one
    # tick, so the cadence alone would evaluate every flush_every steps (and screen as rarely), whatever
    # this machine's speed: every evaluation before the flush at 50 comes from the flag
    diagnosis.cadence.clock = lambda: float(next(ticks))
    g = torch.Generator().manual_seed(1)
    for step in range(1, 46):
        step_now["n"] = step
        before = diagnosis.cadence.evaluations
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        scope.step()
        opt.zero_grad()
        if diagnosis.cadence.evaluations > before:
            evaluated.append(step)
    scope.close()
    assert diagnosis.last_trigger == (1, ["activation"])
    assert confirmed.get("dead_units") == 21
    # the live evaluations: the flag's own step, then the sampled steps of the hot period (ends at 1 + 30)
    assert evaluated == [1, 11, 21, 31], evaluated


def _screen_block(P: int, n: int, seed: int):
    """A CPU buffer whose rows ``3..3+n-1`` hold sums of squares around a known level, and a warmed screen."""
    from gradscope.capture.live import _SUMSQ

    n_cols = 6
    rng = np.random.default_rng(seed)
    storage = torch.full((8, P * n_cols + 5), np.nan, dtype=torch.float64)
    level = rng.uniform(-8, 0, P)
    host = storage.numpy()
    sumsq = host[:, _SUMSQ : P * n_cols : n_cols]
    sumsq[:] = 10 ** (level + rng.uniform(-0.5, 0.5, (8, P)))
    screen = LiveScreen()
    screen.block(1, 10 ** level[None], np.zeros((1, P)), None, None, None)  # the first row sets the levels
    screen._rows = screen.warm_rows  # past the warm-up: the fast path may run
    return storage, sumsq, screen


def _both(screen: LiveScreen, storage, sumsq, first: int, n: int):
    """The NumPy path and the kernel path on copies of the same screen: (result, level) of each."""
    a, b = copy.deepcopy(screen), copy.deepcopy(screen)
    block = sumsq[first : first + n]
    ra = a._fast(block, np.zeros_like(block), None)
    rb = b._fast(block, np.zeros_like(block), None, (storage, first, 6))
    assert a._rows == b._rows
    np.testing.assert_allclose(b._dev, a._dev, rtol=1e-12, atol=1e-12)  # the mean deviations move alike
    return (ra, a._level, a._inv), (rb, b._level, b._inv)


def test_the_compiled_screen_moves_the_levels_as_the_numpy_path_does(cpu_kernel):
    for P, n, seed in ((1, 1, 0), (18, 4, 1), (258, 5, 2), (40, 3, 3)):
        storage, sumsq, screen = _screen_block(P, n, seed)
        if seed == 3:  # a screen that ran the kernel before it is copied: the copy's levels are its own
            assert screen._fast(sumsq[1:2], np.zeros((1, P)), None, (storage, 1, 6))
        (ra, la, ia), (rb, lb, ib) = _both(screen, storage, sumsq, 3, n)
        assert ra is True and rb is True
        np.testing.assert_allclose(lb, la, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ib, ia, rtol=1e-12)
        # every level moved by the weighted log-ratios of its n rows (worked out here, independently)
        w = 0.2 * 0.8 ** np.arange(n)[::-1]
        before = screen._level
        expect = before + w @ (np.log10(sumsq[3 : 3 + n]) - before)
        np.testing.assert_allclose(lb, expect, rtol=1e-12, atol=1e-12)
        # and the mean deviation: one row at a time, dev <- 0.9 dev + 0.1 |log10 sumsq - level before the block|
        dev = screen._dev.copy()
        for row in np.log10(sumsq[3 : 3 + n]):
            dev = 0.9 * dev + 0.1 * np.abs(row - before)
        moved = copy.deepcopy(screen)
        assert moved._fast(sumsq[3 : 3 + n], np.zeros((n, P)), None, (storage, 3, 6))
        np.testing.assert_allclose(moved._dev, dev, rtol=1e-12, atol=1e-12)


def test_the_compiled_screen_leaves_out_what_the_numpy_path_leaves_out(cpu_kernel):
    storage, sumsq, screen = _screen_block(12, 3, 4)
    # a parameter without a level (its gradient was always 0): not judged, its level stays NaN
    screen._level[[2, 7]] = np.nan
    screen._inv[[2, 7]] = np.nan
    screen._watch = np.flatnonzero(~np.isnan(screen._level))
    screen._inv_w = screen._inv[screen._watch]
    sumsq[3:6, 2] = 1e30  # far outside the band, but it has no level
    sumsq[4, 5] = 0.0  # a gradient exactly 0 (a unit silent for the batch): left out
    (ra, la, _), (rb, lb, _) = _both(screen, storage, sumsq, 3, 3)
    assert ra is True and rb is True
    np.testing.assert_allclose(lb, la, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isnan(lb[[2, 7]]).all()
    # what sends the block to the full path, with nothing written: a jump out of the band, NaN, Inf
    for value in (1e6 * sumsq[5, 9], np.nan, np.inf):
        storage2, sumsq2, screen2 = _screen_block(12, 3, 5)
        sumsq2[5, 9] = value
        before = screen2._level.copy()
        (ra, la, _), (rb, lb, _) = _both(screen2, storage2, sumsq2, 3, 3)
        assert ra is False and rb is False
        np.testing.assert_array_equal(lb, before)
    # no parameter with a level at all: the full path
    storage3, sumsq3, screen3 = _screen_block(4, 2, 6)
    screen3._level[:] = np.nan
    screen3._inv[:] = np.nan
    screen3._watch = np.zeros(0, dtype=np.int64)
    (ra, _, _), (rb, _, _) = _both(screen3, storage3, sumsq3, 3, 2)
    assert ra is False and rb is False


def test_the_compiled_activation_check_flags_what_the_numpy_path_flags(cpu_kernel):
    from gradscope.capture.live import _ACT_DEAD, _ACT_SATURATED

    rng = np.random.default_rng(7)
    kinds = ["relu", "tanh", "sigmoid", "gelu", "relu", "hardtanh", "relu", "tanh"]
    skip = [7]  # an output activation: saturated by design, not judged
    A, n_act_cols, a = len(kinds), 3, 11
    storage = torch.full((12, a + A * n_act_cols + 2), np.nan, dtype=torch.float64)
    host = storage.numpy()
    stats = host[:, a : a + A * n_act_cols].reshape(12, A, n_act_cols)
    stats[:, :, _ACT_DEAD] = rng.uniform(0, 1, (12, A))
    stats[:, :, _ACT_SATURATED] = rng.uniform(0, 1, (12, A))
    stats[3, 2, _ACT_SATURATED] = np.nan  # a module that did not run
    stats[5, :, _ACT_DEAD] = 0.5  # exactly at the threshold: flagged (>=)
    np_screen, k_screen = LiveScreen(), LiveScreen()
    for rows in ([0], [1, 2], [3], [4, 5, 6], [7], [8], [9, 10, 11]):
        act = (stats[rows][:, :, _ACT_DEAD], stats[rows][:, :, _ACT_SATURATED])
        want = np_screen._activations(act, kinds, skip)
        got = k_screen._activations_at((storage, rows, a, n_act_cols), kinds, skip)
        assert got == want, rows
        np.testing.assert_array_equal(k_screen._act, np_screen._act)
    # worked by hand: relu 0 dead at 0.5 or more, tanh 1 saturated at 0.5 or more; gelu (3) never
    fresh = LiveScreen()
    stats[0, :, :] = 0.0
    stats[0, 3, _ACT_DEAD] = stats[0, 3, _ACT_SATURATED] = 1.0
    stats[0, 7, _ACT_SATURATED] = 1.0  # skipped
    assert fresh._activations_at((storage, [0], a, n_act_cols), kinds, skip) is False
    stats[1, :, :] = 0.0
    stats[1, 1, _ACT_SATURATED] = 0.6
    assert fresh._activations_at((storage, [1], a, n_act_cols), kinds, skip) is True
    # module 1 flagged (0 rows since), the others clearly below (re-armed); gelu (3) never counted
    assert fresh._act.tolist() == [10, 0, 10, 10, 10, 10, 10, 10]


def _hover_storage(dead: list[float]) -> tuple[torch.Tensor, int, int]:
    """A CPU buffer block with one ReLU module whose dead fraction is ``dead[r]`` at row ``r``."""
    from gradscope.capture.live import _ACT_DEAD, _ACT_SATURATED

    a, n_act_cols = 2, 3
    storage = torch.zeros((len(dead), a + n_act_cols), dtype=torch.float64)
    storage[:, a + _ACT_DEAD] = torch.tensor(dead, dtype=torch.float64)
    storage[:, a + _ACT_SATURATED] = 0.0
    return storage, a, n_act_cols


@pytest.mark.parametrize("path", ["numpy", "kernel"])
def test_a_dead_fraction_hovering_about_the_threshold_is_flagged_once(path, request):
    from gradscope.capture.live import _ACT_DEAD, _ACT_SATURATED, ACT_REARM_ROWS

    if path == "kernel":
        request.getfixturevalue("cpu_kernel")
    # threshold 0.5: 0.56, 0.48, 0.53, 0.47, ... hovers about it for 30 sampled rows, then 12 rows at
    # 0.4 (below, not clearly), flagged again (re-armed after 10); then 0.1 (clearly below) and 0.6
    hover = [0.56 if r % 2 == 0 else 0.48 for r in range(30)]
    dead = hover + [0.4] * 12 + [0.7, 0.4, 0.6, 0.1, 0.6]
    storage, a, n_act_cols = _hover_storage(dead)
    screen = LiveScreen(dead_threshold=0.5)
    fresh_at = []
    for r in range(len(dead)):
        if path == "kernel":
            got = screen._activations_at((storage, [r], a, n_act_cols), ["relu"], [])
        else:
            row = storage.numpy()[[r], a:].reshape(1, 1, n_act_cols)
            got = screen._activations((row[:, :, _ACT_DEAD], row[:, :, _ACT_SATURATED]), ["relu"], [])
        if got:
            fresh_at.append(r)
    assert ACT_REARM_ROWS == 10
    # row 0: first crossing; row 42: after 12 quiet rows; row 46: after one clearly-below row (0.1)
    assert fresh_at == [0, 42, 46]


def test_a_hovering_activation_module_does_not_keep_the_rules_running():
    """A ReLU layer whose dead fraction sits at the threshold: the rules run a few times, not at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        # 30 units off for every sample, 30 on; 4 units off for a whole batch of 32 about half the time
        # (w.x ~ N(0, 1), bias -2.03: P(on) = 0.0214 per sample, (1 - 0.0214) ** 32 = 0.5): the dead
        # fraction (30 + k) / 64, k ~ Binomial(4, 0.5), sits at the 0.5 threshold and moves with the batch
        model[0].weight.zero_()
        model[0].bias[:30] = -1.0
        model[0].bias[30:60] = 1.0
        model[0].weight[60:] = 0.25
        model[0].bias[60:] = -2.03
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scope = gradscope.watch(model, optimizer=opt, sample_every=1, flush_every=1000)
    triggers = []
    original = scope._diagnosis._triggered

    def spy(reasons, step_count):
        triggers.append((step_count, tuple(reasons)))
        original(reasons, step_count)

    scope._diagnosis._triggered = spy
    crossings = 0
    prev = None
    for _ in range(200):
        x = torch.randn(32, 16)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad()
        # the dead fraction of the ReLU, worked independently of gradscope
        with torch.no_grad():
            dead = float((model[1](model[0](x)) <= 0).all(0).float().mean())
        over = dead >= 0.5
        crossings += prev is not None and over and not prev
        prev = over
    scope.close()
    assert crossings >= 20  # the fraction really hovers: it crossed upwards again and again
    act_triggers = [s for s, r in triggers if "activation" in r]
    assert 1 <= len(act_triggers) <= 3, act_triggers


def test_the_compiled_screen_takes_a_noisy_parameter_within_its_own_band_as_the_numpy_path_does(cpu_kernel):
    # Parameter 4 is noisy (its mean deviation widens its band to 2 decades of RMS, 4 in log10 sum of
    # squares); parameter 6 is steady (the one-decade band). The same jump of 1.5 decades (3 in log10
    # sum of squares) passes for the first, and sends the block to the full path for the second.
    storage, sumsq, screen = _screen_block(12, 3, 8)
    screen._dev[4] = 1.5
    assert np.clip(screen._factor() * screen._dev[4], 2.0, 4.0) == 4.0
    sumsq[4, 4] *= 1e3
    (ra, la, _), (rb, lb, _) = _both(screen, storage, sumsq, 3, 3)
    assert ra is True and rb is True
    np.testing.assert_allclose(lb, la, rtol=1e-12, atol=1e-12)
    # its deviation counts up to the common band (2) in the mean, as in the full path
    moved = copy.deepcopy(screen)
    assert moved._fast(sumsq[3:6], np.zeros((3, 12)), None, (storage, 3, 6))
    before = screen._level[4]
    dev = screen._dev[4]
    for y in np.log10(sumsq[3:6, 4]):
        dev = 0.9 * dev + 0.1 * min(abs(y - before), 2.0)
    assert moved._dev[4] == pytest.approx(dev, rel=1e-12)
    for p, factor in ((6, 1e3), (4, 1e5)):  # the steady one at 1.5 decades; the noisy one beyond 2
        storage2, sumsq2, screen2 = _screen_block(12, 3, 8)
        screen2._dev[4] = 1.5
        sumsq2[4, p] *= factor
        level = screen2._level.copy()
        (ra, la, _), (rb, lb, _) = _both(screen2, storage2, sumsq2, 3, 3)
        assert ra is False and rb is False
        np.testing.assert_array_equal(lb, level)


def _two_relus(dead: list[tuple[float, float]]) -> tuple[torch.Tensor, int, int]:
    from gradscope.capture.live import _ACT_DEAD

    a, n_act_cols = 2, 3
    storage = torch.zeros((len(dead), a + 2 * n_act_cols), dtype=torch.float64)
    for j in range(2):
        storage[:, a + j * n_act_cols + _ACT_DEAD] = torch.tensor([d[j] for d in dead], dtype=torch.float64)
    return storage, a, n_act_cols


@pytest.mark.parametrize("path", ["numpy", "kernel"])
def test_a_module_a_rule_has_reported_is_not_flagged_again(path, request):
    from gradscope.capture.live import _ACT_DEAD, _ACT_SATURATED

    if path == "kernel":
        request.getfixturevalue("cpu_kernel")
    # both modules cross, fall clearly below (re-armed), then module 0 alone, then both again
    dead = [(0.7, 0.7), (0.1, 0.1), (0.7, 0.1), (0.1, 0.1), (0.7, 0.7)]
    storage, a, n_act_cols = _two_relus(dead)
    screen = LiveScreen(dead_threshold=0.5)

    def fresh(r: int) -> bool:
        if path == "kernel":
            return screen._activations_at((storage, [r], a, n_act_cols), ["relu", "relu"], [])
        row = storage.numpy()[[r], a:].reshape(1, 2, n_act_cols)
        return screen._activations((row[:, :, _ACT_DEAD], row[:, :, _ACT_SATURATED]), ["relu", "relu"], [])

    assert fresh(0) is True and fresh(1) is False
    screen.reported("dead", 0)  # dead_units reported module 0
    assert fresh(2) is False  # module 0 again: only an update of its finding
    assert fresh(3) is False and fresh(4) is True  # module 1 still flags


def test_a_dead_units_finding_quiets_the_screen_for_its_module():
    # A real run: the first ReLU is dead from step 1 (every pre-activation negative); once dead_units
    # reports it, the screen leaves that module out and keeps watching the other.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, sample_every=1) as scope:
        for _ in range(40):
            loss = model(torch.randn(16, 8)).square().mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
        screen = scope._diagnosis.screen
        found = [f for f in scope.report().findings if f.kind == "dead_units"]
        assert [f.layer for f in found] == ["1"]
        assert screen._act_reported == {("dead", scope.schema.act_modules.index("1"))}
        relu = screen._masks(scope.schema.act_kinds, [])[1]
        assert relu.tolist() == [False, True]  # module "1" left out, module "3" still judged


def test_gradient_findings_quiet_their_direction_of_the_screen():
    from gradscope.findings import Finding

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    scope = gradscope.watch(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    screen = scope._diagnosis.screen
    assert not screen.mute_down and not screen.mute_up

    def finding(kind: str) -> Finding:
        return Finding(kind=kind, severity="error", step=1, layer="0", message="m", suggestion="s")

    scope._diagnosis._announce([finding("vanishing_gradients")], 1)
    assert screen.mute_down and not screen.mute_up
    scope._diagnosis._announce([finding("exploding_gradients")], 2)
    assert screen.mute_down and screen.mute_up
    scope.close()


def test_a_parameter_that_gets_a_gradient_now_and_then_is_judged_against_its_own_gaps():
    """An expert a router picks at some steps: its gaps do not flag once it has shown them; a gap longer
    than twice its longest does (as ``no_gradient`` judges it); a layer that rule reported is left alone."""
    screen = LiveScreen()  # gap_rows 5
    rng = np.random.default_rng(0)

    def rows(expert: list[bool], other: bool | None = None) -> list[str]:
        """Rows where parameter 0 always has its gradient, 1 (the expert) as given, 2 every other row."""
        n = len(expert)
        has = np.ones((n, 3), dtype=bool)
        has[:, 1] = expert
        has[:, 2] = [r % 2 == 0 for r in range(n)] if other is None else other
        sumsq = np.where(has, rng.uniform(0.9, 1.1, has.shape), np.nan)
        return sorted(screen.block(0, sumsq, np.zeros(has.shape), has, np.ones_like(has), None))

    def gap(n: int) -> list[bool]:
        return [False] * n + [True]  # n rows without a gradient, then one with it

    assert rows([True, *gap(3)]) == []  # a gap of 3 rows: below gap_rows; the expert's limit is now 7
    assert rows(gap(6)) == []  # 6: within it; now 13
    assert rows([False] * 12) == []
    assert rows([False]) == ["no_gradient"]  # the 13th row without one: longer than it has been
    assert screen.gap_span == 1  # past no_gradient's confirm (10 rows): the rules confirm it at once
    assert rows([True]) == []  # the gap closes at 13: the limit is now 27
    # its gradient comes and goes: its open gap schedules no screen (the screen's cadence judges it)
    rows([False] * 26)
    assert screen.gap_due == _NEVER
    assert rows([False]) == ["no_gradient"]  # 27 of 27
    # no_gradient reported the expert's layer: its gaps no longer flag
    screen.reported_params([1])
    assert rows([True] + [False] * 80) == [] and screen.gap_due == _NEVER
    # a block with every gradient (passed as all present) closes the gaps as any other: parameter 0
    # goes 8 rows without one (a flag), then every parameter has its gradient
    other = LiveScreen()
    has = np.ones((9, 3), dtype=bool)
    has[1:, 0] = False
    assert sorted(other.block(0, np.where(has, 1.0, np.nan), np.zeros(has.shape), has, np.ones_like(has), None)) == [
        "no_gradient"
    ]
    other.block(0, np.ones((2, 3)), np.zeros((2, 3)), None, None, None)
    assert other._limit[0] == 17 and other._gap[0] == 0 and other.gap_due == _NEVER
    # parameter 2, used every other row (limit 5), stops: it still flags at its 5th row without one, and
    # the rules then run for the 6 rows no_gradient needs to reach its 10
    assert rows([True] * 5, other=[False] * 5) == ["no_gradient"]
    assert screen.gap_span == 6
    assert rows([True] * 5, other=[False] * 5) == [] and screen.gap_span == 0


class _Experts(nn.Module):
    """A router picking one of ``n`` ReLU experts per sample: most experts see a few samples at a step, some none."""

    def __init__(self, n: int = 8, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.gate = nn.Linear(d, n)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)) for _ in range(n))
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        pick = self.gate(h).argmax(-1)
        mixed = torch.zeros_like(h)
        for e in pick.unique().tolist():
            rows = pick == e
            mixed[rows] = self.experts[e](h[rows])
        return self.out(h + mixed)


def _experts_run(path: str, steps: int = 120):
    from gradscope.capture.kernels import FusedMoments

    torch.manual_seed(0)
    model = _Experts()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, optimizer=opt, sample_every=5)
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path=path)
    g = torch.Generator().manual_seed(1)
    by_index = []
    for _ in range(steps):
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        by_index.append(scope._recorder.moments.last_present is not None)
        opt.zero_grad(set_to_none=True)
    return scope, by_index


def test_a_mixture_of_experts_is_read_in_one_call_and_its_routing_does_not_keep_the_rules_running(cpu_kernel):
    """Experts without a gradient at most steps: the kernel reads the gradients present in one call
    (the same statistics as the eager path), the screen learns each expert's gaps instead of flagging
    them at every step, and an expert that saw one or two samples is not called dead."""
    scope, by_index = _experts_run("auto")
    eager, _ = _experts_run("eager")
    assert sum(by_index) >= 100  # steps where some expert had no gradient, read by index in one call
    a, b = scope.close(), eager.close()
    np.testing.assert_array_equal(scope.frame.has_grad, eager.frame.has_grad)
    assert a.stats[["step", "layer", "param", "stat"]].equals(b.stats[["step", "layer", "param", "stat"]])
    np.testing.assert_allclose(a.stats["value"].to_numpy(), b.stats["value"].to_numpy(), rtol=1e-5, atol=1e-8)
    has = scope.frame.has_grad
    assert (~has.all(axis=1)).sum() >= 100  # (routing left experts out at most steps)
    cadence = scope._diagnosis.cadence
    assert cadence.triggered <= 6, cadence.triggered  # (each flag runs the rules for HOT_STEPS steps)
    assert not [f for f in a.findings if f.kind == "dead_units"]
    # the expert samples per step: the dead fraction is taken only where an expert saw 8 or more
    dead = a.stats[(a.stats.stat == "act_dead_fraction") & a.stats.layer.str.startswith("experts.")]
    assert len(dead) < len(a.stats[(a.stats.stat == "act_zero_fraction") & a.stats.layer.str.startswith("experts.")])


def _gaps_by_row(rows: list[tuple[np.ndarray, np.ndarray]], gap_rows: int = 5, confirm: int = 10):
    """The screen's gap test written row by row, as its docstring says: the reference of the block form."""
    P = len(rows[0][0])
    gap, limit = np.zeros(P, int), np.full(P, gap_rows)
    ever, none_before = np.zeros(P, bool), False
    out = []
    for has, trainable in rows:
        got, missing = has & trainable, trainable & ~has
        flag, span = False, 0
        none = not got.any()
        if none and not none_before:
            flag, span = True, confirm
        none_before = none
        if not none:
            for p in range(P):
                if got[p]:
                    if gap[p] > 0 and ever[p]:
                        limit[p] = max(limit[p], 2 * gap[p] + 1)
                    gap[p] = 0
                elif missing[p]:
                    gap[p] += 1
            hit = ever & (gap == limit)
            if hit.any():
                flag, span = True, max(span, 1, confirm - int(limit[hit].min()) + 1)
            ever |= got
        out.append((flag, span, gap.copy(), limit.copy()))
    return out


def test_the_screens_gaps_in_blocks_follow_the_row_by_row_definition():
    """Random experts, frozen stretches, steps without any gradient and a stretch with every gradient (its
    blocks passed as all present), screened in blocks of 1 to 9 rows: the same flags, the same rules' span,
    the same gaps and limits as the definition row by row."""
    rng = np.random.default_rng(7)
    P, n = 6, 400
    use = np.array([1.0, 0.9, 0.5, 0.25, 0.1, 0.6])  # how often each parameter gets a gradient
    rows = []
    for r in range(n):
        has = rng.random(P) < use
        trainable = np.ones(P, bool)
        if 100 <= r < 130:
            trainable[5] = False  # frozen for a while: no gradient, and no gap counted
        if r in (200, 201, 202, 300):
            has[:] = False  # no gradient anywhere
        if 250 <= r < 290:
            has[2] = False  # a long stop
        if 320 <= r < 345:
            has[:] = True  # every gradient: blocks passed as "all present" (has=None) close the gaps
        rows.append((has & trainable, trainable))
    want = _gaps_by_row(rows)
    screen = LiveScreen()
    r = 0
    while r < n:
        k = int(rng.integers(1, 10))
        block = rows[r : r + k]
        has = np.array([h for h, _ in block])
        trainable = np.array([t for _, t in block])
        sumsq = np.where(has, 1.0, np.nan)
        full = has.all() and trainable.all()
        got = screen.block(0, sumsq, np.zeros(has.shape), None if full else has, None if full else trainable, None)
        flags = [w[0] for w in want[r : r + k]]
        assert ("no_gradient" in got) == any(flags), r
        assert screen.gap_span == max([w[1] for w in want[r : r + k]], default=0), r
        np.testing.assert_array_equal(screen._gap, want[r + len(block) - 1][2])
        np.testing.assert_array_equal(screen._limit, want[r + len(block) - 1][3])
        r += k


def test_a_steady_parameter_that_loses_its_gradient_is_screened_where_its_gap_reaches_the_limit():
    """Between screens the live diagnosis asks two cheap questions of a row: does it lack the gradient of
    a parameter that always had one (``went_missing``: screen it now), and has an open gap of such a
    parameter reached its limit (``gap_due`` rows after the last screen)? A parameter whose gradient comes
    and goes (an expert) is left to the screen's cadence, and a frozen one is not missing."""
    screen = LiveScreen()  # gap_rows 5
    screen.block(10, np.ones((10, 3)), np.zeros((10, 3)), None, None, None)
    assert screen.gap_due == _NEVER
    trainable = np.ones(3, dtype=bool)
    lost = np.array([False, True, True])
    assert screen.went_missing(lost, trainable)  # parameter 0 had its gradient at every row so far
    assert not screen.went_missing(lost, np.array([False, True, True]))  # frozen: not missing
    assert (
        screen.block(11, np.array([[np.nan, 1.0, 1.0]]), np.zeros((1, 3)), lost[None], trainable[None], None) == set()
    )
    assert screen.gap_due == 4  # 1 row without it: the 5th is 4 rows on
    assert not screen.went_missing(lost, trainable)  # counted already
    rows = np.tile(lost, (4, 1))
    flagged = screen.block(15, np.where(rows, 1.0, np.nan), np.zeros((4, 3)), rows, np.ones_like(rows), None)
    assert flagged == {"no_gradient"} and screen.gap_due == _NEVER  # flagged at its limit: nothing more scheduled
    # the gradient comes back: the gap closed, parameter 0 now comes and goes; a new gap is the cadence's
    assert (
        screen.block(16, np.ones((1, 3)), np.zeros((1, 3)), np.ones((1, 3), bool), np.ones((1, 3), bool), None) == set()
    )
    assert not screen.went_missing(lost, trainable)
    assert (
        screen.block(17, np.array([[np.nan, 1.0, 1.0]]), np.zeros((1, 3)), lost[None], trainable[None], None) == set()
    )
    assert screen.gap_due == _NEVER
    # parameter 1 never lost its gradient: still steady
    assert screen.went_missing(np.array([False, False, True]), trainable)
