"""loss_not_decreasing and overfitting on hand-built loss curves."""

from __future__ import annotations

import numpy as np
import pytest
from rulekit import build_frame, chain, context, feed, flush_steps

from gradscope.errors import ConfigurationError
from gradscope.rules import LossNotDecreasing, Overfitting


def _frame(loss: np.ndarray, val: np.ndarray | None = None, update_ratio: np.ndarray | None = None):
    n = len(loss)
    scalars = {"loss": loss} if val is None else {"loss": loss, "val_loss": val}
    ur = None if update_ratio is None else np.tile(np.asarray(update_ratio)[:, None], (1, 2))
    return build_frame(chain(2), rms=np.full((n, 2), 1e-2), scalars=scalars, update_ratio=ur)


def _noise(n: int, sigma: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sigma, n)


def test_a_flat_noisy_loss_is_not_decreasing_from_the_first_step() -> None:
    (f,) = LossNotDecreasing().check(context(_frame(2.3 + _noise(150, 0.02))))
    assert (f.kind, f.severity, f.step, f.layer) == ("loss_not_decreasing", "warning", 1, None)
    assert f.evidence["window"] == [1, 100]
    assert f.evidence["noise"] == pytest.approx(0.02, rel=0.3)
    assert "learning rate" in f.suggestion


def test_decreasing_converged_and_slow_noisy_learners_do_not_fire() -> None:
    t = np.arange(300)
    falling = 2.3 * np.exp(-t / 100) + _noise(300, 0.02)
    plateau = np.where(t < 60, 2.3 - 0.03 * t, 0.5) + _noise(300, 0.02)
    slow = 2.3 - 0.0006 * t + _noise(300, 0.115)  # 2.6% per 100 steps hidden in 5% noise
    for loss in (falling, plateau, slow):
        assert LossNotDecreasing().check(context(_frame(loss))) == []


def test_a_warmup_is_not_a_stall() -> None:
    loss = 2.3 + _noise(150, 0.02)
    ramp = np.minimum(1.0, (np.arange(150) + 1) / 120) * 1e-2  # update size grows while lr warms up
    assert LossNotDecreasing().check(context(_frame(loss, update_ratio=ramp))) == []
    assert len(LossNotDecreasing().check(context(_frame(loss, update_ratio=np.full(150, 1e-2))))) == 1


def test_a_loss_that_went_back_up_and_stayed_fires_where_it_came_back() -> None:
    t = np.arange(200)
    loss = np.where(t < 50, 2.3 - 0.026 * t, 2.5) + _noise(200, 0.02)
    (f,) = feed(LossNotDecreasing(), _frame(loss), chunk_rows=50)
    assert 50 <= f.step <= 52 and "(it rose)" in f.message


def test_short_runs_are_judged_at_their_end_only() -> None:
    assert LossNotDecreasing().check(context(_frame(2.3 + _noise(30, 0.01)), final=False)) == []
    assert len(LossNotDecreasing().check(context(_frame(2.3 + _noise(30, 0.01)), final=True))) == 1
    assert LossNotDecreasing().check(context(_frame(2.3 + _noise(10, 0.01)), final=True)) == []
    with pytest.raises(ConfigurationError, match="in \\(0, 1\\)"):
        LossNotDecreasing(decrease=1.5)


def _val_frame(val_at_10: list[float], train: np.ndarray) -> object:
    val = np.full(len(train), np.nan)
    val[9::10] = val_at_10
    return _frame(train, val)


def test_overfitting_when_validation_rises_from_its_best_while_training_falls() -> None:
    val = [2.0, 1.8, 1.6, 1.5, 1.45, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3]
    train = 2.0 - 0.01 * np.arange(150)
    (f,) = Overfitting().check(context(_val_frame(val, train)))
    assert (f.kind, f.severity, f.step, f.layer) == ("overfitting", "warning", 70, None)
    assert (f.evidence["best_val_loss"], f.evidence["best_step"], f.evidence["val_loss"]) == (1.4, 60, 1.7)
    assert f.evidence["window"] == [70, 90]
    assert "Stop early" in f.suggestion and "step 60" in f.suggestion
    # flush by flush: the same finding, once
    assert [g.step for g in feed(Overfitting(), _val_frame(val, train), chunk_rows=25)] == [70]


def test_validation_tracking_training_or_one_noisy_value_is_not_overfitting() -> None:
    train = 2.0 - 0.01 * np.arange(150)
    tracking = list(train[9::10] + 0.1)
    assert Overfitting().check(context(_val_frame(tracking, train))) == []
    spike = list(train[9::10] + 0.1)
    spike[7] += 1.0
    assert Overfitting().check(context(_val_frame(spike, train))) == []
    assert Overfitting().check(context(_frame(train))) == []  # no val_loss passed


def test_a_growing_gap_while_validation_stops_improving() -> None:
    train = 1.0 - 0.005 * np.arange(150)
    (f,) = Overfitting().check(context(_val_frame([1.0] * 15, train)))
    # the gap grows by 0.25 (a quarter of the validation loss) once training is 0.25 lower than at the
    # best validation step (10): at step 60, for three validations in a row
    assert f.step == 60 and f.evidence["gap"] - f.evidence["gap_at_best"] >= 0.25


# -- short windows, stalls after progress ------------------------------------------------------------------


def test_a_short_window_tests_the_same_rate_of_progress_pro_rata() -> None:
    # 6% per 100 steps, a learner the full window never calls stalled (its halves' medians, 50 steps
    # apart, differ by 3% > 2%). Over 20 steps they differ by 0.6%: below the 2% margin (the old test
    # fired here), above the margin of a 20-step window, 0.4% (2% x 20/100): not stalled.
    t = np.arange(20)
    slow = 2.3 * (1 - 0.0006 * t) + _noise(20, 0.001)
    assert LossNotDecreasing().check(context(_frame(2.3 * (1 - 0.0006 * np.arange(100))))) == []
    assert LossNotDecreasing().check(context(_frame(slow), final=True)) == []
    # a loss that does not move at all is still judged stalled from `min_steps` on
    (f,) = LossNotDecreasing().check(context(_frame(2.3 + _noise(20, 0.001)), final=True))
    assert f.evidence["window"] == [1, 20]


def _stalled(n: int = 300, stop: int = 160, back: int | None = None, ratio_after: float = 0.0, seed: int = 0):
    """Loss falling from 2.3 to ~0.8 by step 60, slowly after; the optimizer stops at step ``stop`` (ratio 0)."""
    t = np.arange(1, n + 1)
    loss = 0.75 + 1.55 * np.exp(-t / 20) - 0.0002 * np.minimum(t, stop) + _noise(n, 0.12, seed)
    ratio = np.where((t >= stop) & (t < (back or n + 1)), ratio_after, 1e-2)
    sampled = (t - 1) % 10 == 0
    return build_frame(
        chain(2),
        rms=np.full((n, 2), 1e-2),
        scalars={"loss": loss},
        update_ratio=np.tile(ratio[:, None], (1, 2)),
        sampled=sampled,
    )


def test_a_loss_that_stalls_after_progress_when_the_updates_stop_is_an_episode() -> None:
    # the mini-batch noise (15% of the loss) hides the stall from the equivalence test; the update
    # ratio collapsing to 0 at step 160 (first sampled at 161) says the weights stopped moving
    seen = flush_steps(LossNotDecreasing(), _stalled(), chunk_rows=10, sample_every=10)
    # 20 losses since 161 (min_steps) and 9 more that keep the decrease unestablished: 189, seen at the
    # flush of step 190
    assert seen == {("loss_not_decreasing", None): 190}
    (f,) = feed(LossNotDecreasing(), _stalled(), chunk_rows=10, sample_every=10)
    assert (f.step, f.last_step, f.resolved_step) == (161, 291, None)
    assert f.evidence["update_ratio_since"] == 0.0 and "stopped decreasing at step 161" in f.message
    # the optimizer comes back at step 250: resolved at the first sampled step showing it
    (g,) = feed(LossNotDecreasing(), _stalled(back=250), chunk_rows=10, sample_every=10)
    assert (g.step, g.last_step, g.resolved_step) == (161, 241, 251)


def test_the_same_loss_with_the_optimizer_still_moving_or_slowing_is_not_a_stall() -> None:
    assert feed(LossNotDecreasing(), _stalled(stop=10_000), chunk_rows=10, sample_every=10) == []
    assert feed(LossNotDecreasing(), _stalled(ratio_after=2e-3), chunk_rows=10, sample_every=10) == []  # 5x slower
