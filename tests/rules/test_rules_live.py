"""Live diagnosis on hand-built statistics: trailing partial episodes at the last flush (and in the
provisional pass of ``report()``), earlier confirmation of mid-run episodes, and episodes that end.

Each rule is checked against the step a condition was written into the frame: found at the end of a
run once it has held for the rule's ``min_steps``/``min_samples`` (not before), confirmed at an
ordinary flush ``confirm`` steps after a mid-run onset, kept to the full window when it starts at
initialisation, and ``resolved_step`` set once it has cleared.
"""

from __future__ import annotations

import numpy as np
import pytest
from rulekit import build_frame, chain, context, feed, flush_steps

from gradscope.findings import Finding
from gradscope.rules import (
    DeadUnits,
    ExplodingGradients,
    LossNotDecreasing,
    NoGradient,
    SaturatedActivations,
    VanishingGradients,
)
from gradscope.rules.engine import RuleEngine
from gradscope.rules.window import Episode, episode_min_rows, episode_windows
from gradscope.stats.frame import StatsFrame


def _provisional(rule, frame: StatsFrame, chunk_rows: int = 50, **extra) -> list[Finding]:
    """What ``report()`` shows mid-run: ordinary flushes, then the rules once more on a copy, in final
    mode with no new rows (``new_from=len(frame)``); only the findings the copy adds."""
    import copy

    engine = RuleEngine([rule])
    n = len(frame)
    arrays = frame._arrays()
    grown = StatsFrame(frame.schema)
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        grown.append({k: v[start:end] for k, v in arrays.items()}, frame.scalar_names)
        engine.run(context(grown, new_from=start, final=False, **extra))
    shadow = copy.deepcopy(engine)
    return shadow.run(context(grown, new_from=len(grown), final=True, **extra))


def _vanishing(n: int, collapsed: slice) -> StatsFrame:
    """A 4-layer chain over ``n`` steps whose first two layers collapse to 1e-5 of the rest over ``collapsed`` rows."""
    rms = np.full((n, 4), 1e-2)
    rms[collapsed, :2] = 1e-7
    return build_frame(chain(4), rms=rms)


# -- window helpers ---------------------------------------------------------------------------------------


def test_episode_windows_judge_trailing_partial_windows_by_hand() -> None:
    flags = np.array([0, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    # window 4, 3 of 4 rows needed: starts 1 (1,1,1,0), 2 (1,1,0,1) and 3 (1,0,1,1) hold; the partial
    # window at 5 (1,1,1: 3 of 3) when 3 rows are enough, 6 (1,1) and 7 (1) when 1 row is
    held, length = episode_windows(flags, 4, 0.75, 4)
    np.testing.assert_array_equal(held, [0, 1, 1, 1, 0, 0, 0, 0])  # full windows only
    np.testing.assert_array_equal(length, [4, 4, 4, 4, 4, 3, 2, 1])
    held, _ = episode_windows(flags, 4, 0.75, 3)
    np.testing.assert_array_equal(held, [0, 1, 1, 1, 0, 1, 0, 0])
    held, _ = episode_windows(flags, 4, 0.75, 1)
    np.testing.assert_array_equal(held, [0, 1, 1, 1, 0, 1, 1, 1])
    held, _ = episode_windows(flags, 4, 0.75, np.array([4, 4, 4, 4, 4, 4, 4, 1]))  # per-row minimum
    np.testing.assert_array_equal(held, [0, 1, 1, 1, 0, 0, 0, 1])


def test_episode_min_rows_full_window_at_initialisation_confirm_for_mid_run_onsets() -> None:
    steps = np.arange(1, 9) * 10  # 10 .. 80
    flags = np.array([1, 1, 0, 1, 1, 0, 0, 1], dtype=bool)
    got = episode_min_rows(steps, flags, final=False, window=6, confirm=2, minimum=1, init_steps=30)
    # onsets (held, not held at the row before) after step 30: rows 3 (step 40) and 7 (step 80)
    np.testing.assert_array_equal(got, [6, 6, 6, 2, 6, 6, 6, 2])
    np.testing.assert_array_equal(
        episode_min_rows(steps, flags, final=True, window=6, confirm=2, minimum=3, init_steps=30), [3] * 8
    )


def test_episode_follows_the_last_step_and_resolves_after_the_clearing_span() -> None:
    ep = Episode(last=10)
    steps = np.arange(11, 21)
    assert ep.follow(steps, steps <= 14, clear_steps=10) and (ep.last, ep.resolved) == (14, None)
    assert not ep.follow(np.arange(21, 24), np.zeros(3, bool), clear_steps=10)  # 9 clear steps: not yet
    assert ep.follow(np.arange(21, 25), np.zeros(4, bool), clear_steps=10)
    assert (ep.last, ep.resolved) == (14, 15)  # the first step after the last one it held
    assert ep.follow(np.array([30]), np.array([True]), clear_steps=10)  # back: the episode re-opens
    assert (ep.last, ep.resolved) == (30, None)


def test_engine_applies_episode_updates_to_the_kept_finding() -> None:
    first = Finding("k", "warning", 5, "fc", "m", "s", {"a": 1}, last_step=5)

    class Follows(VanishingGradients):
        calls = 0

        def check(self, ctx):  # type: ignore[override]
            Follows.calls += 1
            if Follows.calls == 1:
                return [first]
            return [Finding("k", "warning", 99, "fc", "other", "", {}, last_step=40, resolved_step=41)]

    engine = RuleEngine([Follows()])
    frame = _vanishing(5, slice(0, 0))
    assert engine.run(context(frame, final=False)) == [first]
    assert engine.run(context(frame, final=False)) == []  # an update is not a new finding
    (kept,) = engine.findings
    assert (kept.step, kept.message, kept.evidence) == (5, "m", {"a": 1})  # the first report stays
    assert (kept.last_step, kept.resolved_step) == (40, 41) and engine.updated == [kept]
    assert kept.status_note() == " (resolved at step 41)"


# -- vanishing_gradients ----------------------------------------------------------------------------------


def test_vanishing_late_trailing_episode_found_at_the_end_and_not_before_min_steps() -> None:
    found = feed(VanishingGradients(), _vanishing(320, slice(311, None)), chunk_rows=50)  # from step 312
    assert [(f.step, f.layer, f.last_step) for f in found] == [(312, "fc1", 320)]
    # 9 steps: fewer than `confirm`, so no ordinary flush reports it
    assert feed(VanishingGradients(), _vanishing(320, slice(311, None)), chunk_rows=50, final=False) == []
    assert feed(VanishingGradients(), _vanishing(320, slice(318, None)), chunk_rows=50) == []  # 2 steps < 3
    (f,) = feed(VanishingGradients(), _vanishing(320, slice(317, None)), chunk_rows=50)  # 3 steps
    assert f.step == 318


def test_vanishing_provisional_pass_looks_back_over_the_trailing_rows() -> None:
    # report() at step 320: its ordinary flush sees 6 collapsed steps (< confirm); the copy, final with no
    # new rows, looks back over them
    (f,) = _provisional(VanishingGradients(), _vanishing(320, slice(314, None)))
    assert (f.step, f.layer) == (315, "fc1")
    assert _provisional(VanishingGradients(), _vanishing(320, slice(0, 0))) == []


def test_vanishing_mid_run_episode_confirmed_after_confirm_steps_init_one_after_the_window() -> None:
    seen = flush_steps(VanishingGradients(), _vanishing(200, slice(100, None)), chunk_rows=1)  # from step 101
    assert seen == {("vanishing_gradients", "fc1"): 110}  # 10 steps: 101..110
    seen = flush_steps(VanishingGradients(confirm=25), _vanishing(200, slice(100, None)), chunk_rows=1)
    assert seen == {("vanishing_gradients", "fc1"): 125}
    seen = flush_steps(VanishingGradients(), _vanishing(200, slice(0, None)), chunk_rows=1)  # from step 1
    assert seen == {("vanishing_gradients", "fc1"): 50}
    # an episode from initialisation is not confirmed early later on either: collapsed since step 1,
    # so no row after step 50 is an onset
    assert flush_steps(VanishingGradients(), _vanishing(45, slice(0, None)), chunk_rows=1) == {}


def test_vanishing_init_transient_is_never_confirmed() -> None:
    assert flush_steps(VanishingGradients(), _vanishing(200, slice(0, 20)), chunk_rows=1) == {}
    assert feed(VanishingGradients(), _vanishing(200, slice(0, 20)), chunk_rows=10) == []


def test_vanishing_episode_resolves_after_confirm_clear_steps() -> None:
    (f,) = feed(VanishingGradients(), _vanishing(250, slice(100, 150)), chunk_rows=10)  # steps 101-150
    assert (f.step, f.last_step, f.resolved_step) == (101, 150, 151)
    assert f.status_note() == " (resolved at step 151)"
    (f,) = feed(VanishingGradients(), _vanishing(155, slice(100, 150)), chunk_rows=10)  # 5 clear steps
    assert (f.last_step, f.resolved_step) == (150, None)


def test_vanishing_healthy_frames_give_nothing() -> None:
    rng = np.random.default_rng(0)
    rms = 1e-2 * np.exp(rng.normal(0, 1, (300, 4)))  # noisy, within 10^-3 of each other
    assert feed(VanishingGradients(), build_frame(chain(4), rms=rms), chunk_rows=1) == []


# -- exploding_gradients ----------------------------------------------------------------------------------


def _depth(n: int, start: int) -> StatsFrame:
    """fc0 at 1e4 x every later layer from row ``start`` on (the later layers fall; the norm does not grow)."""
    rms = np.full((n, 4), 1e-2)
    rms[start:, 1:] = 1e-6
    return build_frame(chain(4), rms=rms)


def test_exploding_depth_trailing_episode_found_at_the_end_and_not_before_min_steps() -> None:
    (f,) = feed(ExplodingGradients(), _depth(320, 315), chunk_rows=50)  # from step 316: 5 steps
    assert (f.step, f.layer, f.evidence["criterion"]) == (316, "fc0", "depth")
    assert feed(ExplodingGradients(), _depth(320, 315), chunk_rows=50, final=False) == []
    assert feed(ExplodingGradients(), _depth(320, 318), chunk_rows=50) == []  # 2 steps < min_steps 3
    (f,) = _provisional(ExplodingGradients(), _depth(320, 315))
    assert f.step == 316


def test_exploding_episode_resolves_once_the_norm_is_back_for_a_window() -> None:
    rms = np.full((200, 4), 1e-2)
    rms[100:120] *= 1e5  # steps 101-120
    (f,) = feed(ExplodingGradients(), build_frame(chain(4), rms=rms), chunk_rows=10)
    assert (f.step, f.evidence["criterion"], f.last_step, f.resolved_step) == (101, "runaway", 120, 121)


def test_exploding_healthy_frames_give_nothing() -> None:
    rng = np.random.default_rng(2)
    rms = 1e-2 * np.exp(rng.normal(0, 0.5, (300, 4)))  # noisy, no growth, no layer far above the rest
    assert feed(ExplodingGradients(), build_frame(chain(4), rms=rms), chunk_rows=1) == []
    assert _provisional(ExplodingGradients(), build_frame(chain(4), rms=rms)) == []


# -- dead_units -------------------------------------------------------------------------------------------


def _dead(n: int, dead_steps: slice, kind: str = "relu") -> StatsFrame:
    """One activation module sampled every 10 steps (steps 10, 20, ...), at 80% over ``dead_steps`` (steps).

    80% dead units for ``kind="relu"``; 80% saturated outputs for ``kind="tanh"``.
    """
    steps = np.arange(1, n + 1)
    sampled = steps % 10 == 0
    value = np.where((steps >= dead_steps.start) & (steps < (dead_steps.stop or n + 1)), 0.8, 0.05)
    stat = "act_dead_fraction" if kind == "relu" else "act_saturated_fraction"
    act = {
        stat: np.where(sampled, value, np.nan)[:, None],
        "act_zero_fraction": np.where(sampled, 0.5, np.nan)[:, None],
    }
    if kind != "relu":
        act["act_dead_fraction"] = np.where(sampled, 0.1, np.nan)[:, None]
    return build_frame(
        chain(2), rms=np.full((n, 2), 1e-2), sampled=sampled, act=act, act_modules=(kind,), act_kinds=(kind,)
    )


def test_dead_units_late_trailing_episode_found_at_the_end_and_not_before_min_samples() -> None:
    (f,) = feed(DeadUnits(), _dead(320, slice(305, None)), chunk_rows=50, sample_every=10)  # samples 310, 320
    assert (f.step, f.layer, f.last_step) == (310, "relu", 320)
    # mid-run, one sample confirms it (`confirm`: 10 steps), at the last flush as at an ordinary one
    (f,) = feed(DeadUnits(), _dead(320, slice(315, None)), chunk_rows=50, sample_every=10)
    assert (f.step, f.last_step) == (320, 320)
    # from initialisation, `min_samples` (2) at the last flush: one sample is not enough
    assert feed(DeadUnits(), _dead(15, slice(1, None)), chunk_rows=5, sample_every=10) == []
    (f,) = feed(DeadUnits(), _dead(320, slice(305, None)), chunk_rows=50, sample_every=10, final=False)
    assert f.step == 310
    # from initialisation, a short run: ordinary flushes wait for the window (3 samples), report() shows it
    assert feed(DeadUnits(), _dead(25, slice(1, None)), chunk_rows=5, sample_every=10, final=False) == []
    (f,) = _provisional(DeadUnits(), _dead(25, slice(1, None)), chunk_rows=5, sample_every=10)
    assert f.step == 10


def test_dead_units_mid_run_confirmed_at_the_first_sample_init_after_the_window() -> None:
    seen = flush_steps(DeadUnits(), _dead(200, slice(101, None)), chunk_rows=1, sample_every=10)
    assert seen == {("dead_units", "relu"): 110}  # sample 110 (confirm: 10 steps, one sample)
    seen = flush_steps(DeadUnits(), _dead(200, slice(1, None)), chunk_rows=1, sample_every=10)
    assert seen == {("dead_units", "relu"): 30}  # samples 10, 20, 30 (window: 30 steps)


def test_dead_units_resolve_when_the_units_come_back() -> None:
    (f,) = feed(DeadUnits(), _dead(260, slice(101, 201)), chunk_rows=10, sample_every=10)
    assert (f.step, f.last_step, f.resolved_step) == (110, 200, 210)


def test_dead_units_healthy_frames_give_nothing() -> None:
    assert feed(DeadUnits(), _dead(300, slice(10_000, None)), chunk_rows=1, sample_every=10) == []


def test_saturated_activations_trailing_confirmed_and_resolved_like_dead_units() -> None:
    (f,) = feed(SaturatedActivations(), _dead(320, slice(305, None), "tanh"), chunk_rows=50, sample_every=10)
    assert (f.kind, f.step, f.layer, f.last_step) == ("saturated_activations", 310, "tanh", 320)
    (f,) = feed(SaturatedActivations(), _dead(320, slice(315, None), "tanh"), chunk_rows=50, sample_every=10)
    assert (f.step, f.last_step) == (320, 320)
    assert feed(SaturatedActivations(), _dead(15, slice(1, None), "tanh"), chunk_rows=5, sample_every=10) == []
    seen = flush_steps(SaturatedActivations(), _dead(200, slice(101, None), "tanh"), chunk_rows=1, sample_every=10)
    assert seen == {("saturated_activations", "tanh"): 110}
    seen = flush_steps(SaturatedActivations(), _dead(200, slice(1, None), "tanh"), chunk_rows=1, sample_every=10)
    assert seen == {("saturated_activations", "tanh"): 30}
    (f,) = feed(SaturatedActivations(), _dead(260, slice(101, 201), "tanh"), chunk_rows=10, sample_every=10)
    assert (f.step, f.last_step, f.resolved_step) == (110, 200, 210)
    healthy = _dead(300, slice(10_000, None), "tanh")
    assert feed(SaturatedActivations(), healthy, chunk_rows=1, sample_every=10) == []


# -- no_gradient ------------------------------------------------------------------------------------------


def _coverage(n: int, *, has: np.ndarray | None = None, trainable: np.ndarray | None = None) -> StatsFrame:
    params = [*chain(2), ("aux", "weight", 10)]
    return build_frame(params, rms=np.full((n, 3), 1e-2), has_grad=has, trainable=trainable)


def _unfrozen_at(n: int, step: int) -> StatsFrame:
    has = np.ones((n, 3), bool)
    has[:, 2] = False
    trainable = np.ones((n, 3), bool)
    trainable[: step - 1, 2] = False
    return _coverage(n, has=has, trainable=trainable)


def test_no_gradient_late_trailing_episode_found_at_the_end_and_not_before_min_steps() -> None:
    (f,) = feed(NoGradient(), _unfrozen_at(320, 319), chunk_rows=50)  # trainable at 319, 2 steps
    assert (f.step, f.layer, f.last_step) == (319, "aux", 320)
    assert feed(NoGradient(), _unfrozen_at(320, 319), chunk_rows=50, final=False) == []
    assert feed(NoGradient(), _unfrozen_at(320, 320), chunk_rows=50) == []  # 1 step < min_steps 2
    (f,) = _provisional(NoGradient(), _unfrozen_at(320, 319))
    assert f.step == 319


def test_no_gradient_mid_run_unfreezing_confirmed_after_confirm_steps_init_after_the_window() -> None:
    assert flush_steps(NoGradient(), _unfrozen_at(200, 101), chunk_rows=1) == {("no_gradient", "aux"): 110}
    assert flush_steps(NoGradient(), _unfrozen_at(200, 1), chunk_rows=1) == {("no_gradient", "aux"): 50}


def test_no_gradient_parameter_that_stops_mid_run_and_comes_back() -> None:
    has = np.ones((260, 3), bool)
    has[100:200, 2] = False  # steps 101-200 without a gradient
    seen = flush_steps(NoGradient(), _coverage(260, has=has), chunk_rows=1)
    assert seen == {("no_gradient", "aux"): 110}  # 100 steps of history: `confirm` steps, 101..110
    (f,) = feed(NoGradient(), _coverage(260, has=has), chunk_rows=10)
    assert (f.step, f.last_step, f.resolved_step) == (101, 200, 201)
    assert "stopped receiving a gradient at step 101" in f.message
    # a branch used every 30 steps may go 29 steps without: a stop needs more than twice that
    has = np.ones((300, 3), bool)
    has[:, 2] = (np.arange(300) % 30) == 0
    has[120:, 2] = False  # last gradient at step 91 (row 90); none from step 92
    seen = flush_steps(NoGradient(), _coverage(300, has=has), chunk_rows=1)
    assert seen == {("no_gradient", "aux"): 91 + 59}
    # a stop within the first window of history needs a full window
    has = np.ones((200, 3), bool)
    has[30:, 2] = False  # gradients at steps 1-30 only
    assert flush_steps(NoGradient(), _coverage(200, has=has), chunk_rows=1) == {("no_gradient", "aux"): 80}


def test_no_gradient_healthy_frames_give_nothing() -> None:
    has = np.ones((300, 3), bool)
    has[:, 2] = (np.arange(300) % 7) == 0  # an alternating branch
    assert feed(NoGradient(), _coverage(300, has=has), chunk_rows=1) == []
    assert feed(NoGradient(), _coverage(300, has=has), chunk_rows=50) == []


# -- loss_not_decreasing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [30, 60])
def test_loss_stall_of_a_short_run_shown_by_the_provisional_pass(n: int) -> None:
    rng = np.random.default_rng(1)
    frame = build_frame(chain(2), rms=np.full((n, 2), 1e-2), scalars={"loss": 2.3 + rng.normal(0, 0.01, n)})
    (f,) = _provisional(LossNotDecreasing(), frame, chunk_rows=10)
    assert (f.kind, f.step) == ("loss_not_decreasing", 1)
    falling = build_frame(chain(2), rms=np.full((n, 2), 1e-2), scalars={"loss": 2.3 * 0.97 ** np.arange(n)})
    assert _provisional(LossNotDecreasing(), falling, chunk_rows=10) == []
