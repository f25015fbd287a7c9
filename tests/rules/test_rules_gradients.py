"""vanishing_gradients, exploding_gradients and nonfinite_gradients on hand-built statistics."""

from __future__ import annotations

import numpy as np
import pytest
from rulekit import build_frame, chain, context, feed

from gradscope.errors import ConfigurationError
from gradscope.rules import ExplodingGradients, NonfiniteGradients, VanishingGradients


def _rms(rows: int, per_layer: list[float]) -> np.ndarray:
    return np.tile(np.asarray(per_layer, dtype=np.float64), (rows, 1))


# -- vanishing ------------------------------------------------------------------------------------------


def test_vanishing_names_where_the_collapse_begins_and_backdates_to_its_first_step() -> None:
    frame = build_frame(chain(4), rms=_rms(60, [1e-6, 1e-6, 1e-2, 1e-2]))
    (f,) = VanishingGradients().check(context(frame))
    assert (f.kind, f.severity, f.step, f.layer) == ("vanishing_gradients", "error", 1, "fc1")
    assert f.evidence["collapsed_layers"] == ["fc0", "fc1"]
    np.testing.assert_allclose(list(f.evidence["ratio_to_later_max"].values()), [1e-4, 1e-4])
    assert f.evidence["window"] == [1, 50]
    assert f.evidence["reference_layer"] == "fc2"
    assert "'fc1'" in f.message and "'fc0'" in f.message and "1.00e-04" in f.message
    assert "He" in f.suggestion


def test_gradients_shrinking_everywhere_as_the_loss_falls_do_not_vanish() -> None:
    decay = 0.8 ** np.arange(60)[:, None]  # 1e-6 of the start after 60 steps, every layer alike
    frame = build_frame(chain(4), rms=decay * np.array([0.5, 1.0, 1.0, 2.0]))
    assert VanishingGradients().check(context(frame)) == []


def test_vanishing_onset_mid_run_seen_flush_by_flush() -> None:
    rms = _rms(80, [1e-2, 1e-2, 1e-2, 1e-2])
    rms[14:, :2] = 1e-7  # from step 15
    frame = build_frame(chain(4), rms=rms)
    found = feed(VanishingGradients(), frame, chunk_rows=10)
    assert [(f.step, f.layer) for f in found] == [(15, "fc1")]


def test_vanishing_needs_persistence() -> None:
    rms = _rms(40, [1e-2, 1e-2, 1e-2])
    flicker = (np.arange(40) % 10) < 7  # collapsed at 70% of the steps
    rms[flicker, 0] = 1e-7
    frame = build_frame(chain(3), rms=rms)
    assert VanishingGradients().check(context(frame)) == []
    (f,) = VanishingGradients(min_fraction=0.6).check(context(frame))
    assert (f.step, f.layer) == (1, "fc0")


def test_a_collapse_that_fades_within_the_window_is_an_init_transient() -> None:
    # Attention query/key at random init: 1e-5 of the head's at first, back within 1e-3 after 30 steps
    rms = _rms(80, [1e-7, 1e-2, 1e-2])
    rms[:, 0] = 1e-7 * 10 ** (np.minimum(np.arange(80), 40) / 10)
    assert VanishingGradients().check(context(build_frame(chain(3), rms=rms))) == []


def test_a_collapse_that_does_not_reach_the_input_is_not_vanishing() -> None:
    frame = build_frame(chain(4), rms=_rms(30, [1e-2, 1e-7, 1e-2, 1e-2]))
    assert VanishingGradients().check(context(frame)) == []


def test_layers_without_a_gradient_are_skipped_over() -> None:
    has = np.ones((30, 4), bool)
    has[:, 0] = False  # fc0 frozen or unused
    frame = build_frame(chain(4), rms=_rms(30, [1e-2, 1e-7, 1e-2, 1e-2]), has_grad=has)
    (f,) = VanishingGradients().check(context(frame))
    assert f.layer == "fc1" and f.evidence["collapsed_layers"] == ["fc1"]


def test_vanishing_is_dtype_aware_float16_underflow() -> None:
    rms = _rms(30, [1e-6, 1e-6, 1e-6])  # alike everywhere: no relative collapse
    assert VanishingGradients().check(context(build_frame(chain(3), rms=rms))) == []
    (f,) = VanishingGradients().check(context(build_frame(chain(3), rms=rms, dtypes=["float16"] * 3)))
    assert f.layer == "head" and "underflowing" in f.message
    assert f.evidence["dtype_tiny"] == pytest.approx(6.103515625e-05)


def test_skipped_steps_are_never_judged() -> None:
    rms = _rms(40, [1e-2, 1e-2, 1e-2])
    skipped = np.zeros(40, bool)
    skipped[5:30] = True
    rms[5:30, 0] = 1e-9
    frame = build_frame(chain(3), rms=rms, skipped=skipped)
    assert VanishingGradients().check(context(frame)) == []


def test_vanishing_thresholds_and_window_in_steps() -> None:
    frame = build_frame(chain(3), rms=_rms(30, [1e-6, 1e-2, 1e-2]))
    assert VanishingGradients(ratio=1e-5).check(context(frame)) == []
    # every=5: the 50-step window is 10 recorded rows
    rows = build_frame(chain(3), rms=_rms(10, [1e-6, 1e-2, 1e-2]), steps=np.arange(1, 51, 5))
    assert VanishingGradients().check(context(rows, final=False, every=5))[0].step == 1
    assert VanishingGradients().check(context(rows, final=False)) == []  # every=1: 10 of 50 rows
    with pytest.raises(ConfigurationError, match="below 1"):
        VanishingGradients(ratio=2.0)
    with pytest.raises(ConfigurationError, match="Unknown threshold"):
        VanishingGradients(ration=1e-3)


# -- exploding -------------------------------------------------------------------------------------------


def test_runaway_growth_fires_where_it_starts_and_names_the_amplifying_layer() -> None:
    rms = _rms(20, [1e-2, 5e-2, 1e-2])
    rms[10:16] *= 4.0 ** np.arange(1, 7)[:, None]  # x4 per step from step 11 to 16
    rms[16:] = rms[15]
    (f,) = ExplodingGradients().check(context(build_frame(chain(3), rms=rms)))
    assert (f.kind, f.severity, f.step, f.layer) == ("exploding_gradients", "error", 11, "fc1")
    assert f.evidence["criterion"] == "runaway"
    assert f.evidence["growth"] == pytest.approx(4.0**6, rel=1e-9)
    assert f.evidence["amplification"] == pytest.approx(5.0)


def test_a_sudden_jump_is_a_runaway_and_a_slow_climb_far_above_the_warmup_level_is_too() -> None:
    rms = _rms(50, [1e-2, 1e-2, 1e-2])
    rms[30:] = 2.0  # 200x from step 31 on, in one step
    (f,) = ExplodingGradients().check(context(build_frame(chain(3), rms=rms)))
    assert (f.step, f.evidence["criterion"]) == (31, "runaway")
    assert f.evidence["growth"] == pytest.approx(200.0)
    assert f.layer == "head"  # no layer amplifies more than the ones after it: it enters from the loss
    slow = _rms(60, [1e-2, 1e-2, 1e-2])
    slow[10:30] *= (1.5 ** np.arange(1, 21))[:, None]  # x1.5 per step: never 100x within 10 steps
    slow[30:] = slow[29]
    (g,) = ExplodingGradients().check(context(build_frame(chain(3), rms=slow)))
    assert (g.step, g.evidence["criterion"]) == (28, "warmup")  # 1.5^17 > 1000 at step 28
    assert g.evidence["growth"] == pytest.approx(1.5**20)


def test_gradients_larger_than_the_weights_from_the_first_step() -> None:
    frame = build_frame(chain(3), rms=_rms(30, [10.0, 10.0, 10.0]), param_rms=np.full((30, 3), 0.1))
    (f,) = ExplodingGradients().check(context(frame))
    assert (f.step, f.evidence["criterion"]) == (1, "relative")
    assert f.evidence["ratio"] == pytest.approx(100.0)


def test_gradients_above_the_weights_need_three_sampled_steps_across_flushes() -> None:
    rms = _rms(60, [1e-2, 1e-2, 1e-2])
    rms[20:] = 10.0  # 100x the weights' RMS (0.1) from step 21
    sampled = np.arange(60) % 10 == 0  # sampled rows 1, 11, 21, ...
    frame = build_frame(chain(3), rms=rms, sampled=sampled, param_rms=np.full((60, 3), 0.1))
    only_relative = {"growth": 1e9, "above": 1e9}
    found = feed(ExplodingGradients(**only_relative), frame, chunk_rows=25, sample_every=10)
    assert [(f.step, f.evidence["criterion"]) for f in found] == [(21, "relative")]
    assert found[0].evidence["window"] == [21, 41]
    rms[40:] = 1e-2  # back down after two sampled steps: a transient, not an explosion
    frame = build_frame(chain(3), rms=rms, sampled=sampled, param_rms=np.full((60, 3), 0.1))
    assert feed(ExplodingGradients(**only_relative), frame, chunk_rows=25, sample_every=10) == []


def test_explosion_with_depth() -> None:
    (f,) = ExplodingGradients().check(context(build_frame(chain(3), rms=_rms(20, [10.0, 1e-3, 1e-3]))))
    assert (f.step, f.layer, f.evidence["criterion"]) == (1, "fc0", "depth")
    assert f.evidence["ratio_to_later_max"] == {"fc0": pytest.approx(1e4)}


def test_healthy_growth_and_recovery_from_a_dip_are_not_explosions() -> None:
    slow = _rms(100, [1e-2, 1e-2, 1e-2]) * (1.03 ** np.arange(100))[:, None]  # x19 over 100 steps
    assert ExplodingGradients().check(context(build_frame(chain(3), rms=slow))) == []
    dip = _rms(60, [1e-2, 1e-2, 1e-2])
    dip[20:40] *= 1e-2  # a dip, then back up 100x within one step
    assert ExplodingGradients().check(context(build_frame(chain(3), rms=dip))) == []


def test_gradscaler_skipped_steps_are_not_explosions() -> None:
    rms = _rms(40, [1e-2, 1e-2, 1e-2])
    skipped = np.zeros(40, bool)
    skipped[10:13] = True
    rms[10:13] = 1e30
    nonfinite = np.zeros((40, 3))
    nonfinite[10:13] = 4  # the scaled gradients overflowed
    frame = build_frame(chain(3), rms=rms, skipped=skipped, nonfinite=nonfinite)
    assert ExplodingGradients().check(context(frame)) == []
    assert NonfiniteGradients().check(context(frame)) == []


# -- non-finite ------------------------------------------------------------------------------------------


def _nonfinite_frame(loss: float | None = 2.0, order_counts: dict[int, int] | None = None) -> object:
    nonfinite = np.zeros((10, 3))
    for layer, count in (order_counts or {0: 3, 1: 7}).items():
        nonfinite[4:, layer] = count
    scalars = {"loss": np.where(np.arange(10) == 4, loss, 2.0)} if loss is not None else None
    return build_frame(chain(3), rms=_rms(10, [1e-2, 1e-2, 1e-2]), nonfinite=nonfinite, scalars=scalars)


def test_nonfinite_names_the_first_layer_in_backward_order_and_the_loss_state() -> None:
    (f,) = NonfiniteGradients().check(context(_nonfinite_frame(loss=2.0)))
    assert (f.kind, f.severity, f.step, f.layer) == ("nonfinite_gradients", "error", 5, "fc1")
    assert f.evidence["counts"] == {"fc1": 7, "fc0": 3}
    assert f.evidence["backward_order"] == ["fc1", "fc0"]
    assert f.evidence["loss_finite"] is True
    assert "loss was finite" in f.message and "detect_anomaly" in f.suggestion


def test_nonfinite_loss_points_at_the_forward_pass() -> None:
    (f,) = NonfiniteGradients().check(context(_nonfinite_frame(loss=float("inf"), order_counts={0: 1, 1: 1, 2: 1})))
    assert f.layer == "head" and f.evidence["loss_finite"] is False
    assert "itself non-finite" in f.message and "log(0)" in f.suggestion
    (g,) = NonfiniteGradients().check(context(_nonfinite_frame(loss=None)))
    assert g.evidence["loss_finite"] is None and "not recorded" in g.message


def test_nonfinite_follows_the_forward_order_and_fires_once() -> None:
    frame = _nonfinite_frame()
    # forward order fc1, fc0, head: backward order head, fc0, fc1 -> fc0 comes first
    (f,) = NonfiniteGradients().check(context(frame, order=[1, 0, 2]))
    assert f.layer == "fc0"
    found = feed(NonfiniteGradients(), frame, chunk_rows=3)
    assert [(g.step, g.layer) for g in found] == [(5, "fc1")]


# -- stats=["l2_norm"] only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stats", [("l2_norm",), ("l2_norm", "nonfinite_count")])
def test_a_layer_without_a_gradient_is_not_nonfinite_with_l2_norm_only(stats: tuple[str, ...]) -> None:
    """An unused layer's RMS is NaN (no gradient); without ``nonfinite_count`` it once counted as NaN gradients."""
    params = [*chain(3), ("unused", "weight", 100)]
    has = np.ones((50, 4), bool)
    has[:, 3] = False
    vanish = np.tile([1e-7, 1e-2, 1e-2, 1.0], (60, 1))
    has60 = np.ones((60, 4), bool)
    has60[:, 3] = False
    (f,) = VanishingGradients().check(context(build_frame(params, rms=vanish, has_grad=has60, stats=stats)))
    assert (f.step, f.layer) == (1, "fc0")
    jump = np.tile([1e-2, 1e-2, 1e-2, 1.0], (50, 1))
    jump[30:, :3] = 2.0  # 200x from step 31 on, as in the test above
    (g,) = ExplodingGradients().check(context(build_frame(params, rms=jump, has_grad=has, stats=stats)))
    assert (g.step, g.evidence["criterion"], g.evidence["growth"]) == (31, "runaway", pytest.approx(200.0))
