"""dead_units, saturated_activations and no_gradient on hand-built statistics."""

from __future__ import annotations

import numpy as np
from rulekit import build_frame, chain, context, feed

from gradscope.rules import DeadUnits, NoGradient, SaturatedActivations

ACTS = ("act0", "act1", "out")
KINDS = ("relu", "relu", "sigmoid")


def _act_frame(dead: np.ndarray, saturated: np.ndarray | None = None, steps: int = 50, every_sample: int = 10):
    """``steps`` steps, activations sampled every ``every_sample``; ``dead``/``saturated`` are [sampled rows, 3]."""
    sampled = (np.arange(steps) % every_sample) == 0
    n = int(sampled.sum())
    act = {"act_dead_fraction": np.full((steps, 3), np.nan), "act_saturated_fraction": np.full((steps, 3), np.nan)}
    act["act_dead_fraction"][sampled] = dead[:n]
    if saturated is not None:
        act["act_saturated_fraction"][sampled] = saturated[:n]
    act["act_zero_fraction"] = np.where(sampled[:, None], 0.5, np.nan)
    return build_frame(
        chain(3), rms=np.full((steps, 3), 1e-2), sampled=sampled, act=act, act_modules=ACTS, act_kinds=KINDS
    )


def test_dead_units_over_three_sampled_steps_named_by_module() -> None:
    dead = np.tile([0.0, 0.8, 0.0], (5, 1))  # act1: 80% of its units silent for the whole batch
    (f,) = DeadUnits().check(context(_act_frame(dead), sample_every=10))
    assert (f.kind, f.severity, f.step, f.layer) == ("dead_units", "warning", 1, "act1")
    assert f.evidence["value"] == 0.8 and f.evidence["window"] == [1, 21] and f.evidence["sampled_steps"] == 3
    assert "80%" in f.message and "LeakyReLU" in f.suggestion


def test_dead_units_need_persistence_and_the_threshold() -> None:
    below = np.tile([0.0, 0.45, 0.0], (5, 1))
    assert DeadUnits().check(context(_act_frame(below), sample_every=10)) == []
    flicker = np.array([[0, 0.9, 0], [0, 0.1, 0], [0, 0.9, 0], [0, 0.1, 0], [0, 0.9, 0]], dtype=float)
    assert DeadUnits().check(context(_act_frame(flicker), sample_every=10)) == []
    later = np.array([[0, 0, 0], [0, 0, 0], [0, 0.7, 0], [0, 0.7, 0], [0, 0.7, 0]], dtype=float)
    (f,) = feed(DeadUnits(), _act_frame(later), chunk_rows=10, sample_every=10)
    assert (f.step, f.layer) == (21, "act1")


def test_dead_units_judge_relu_modules_only() -> None:
    dead = np.tile([0.0, 0.0, 0.9], (5, 1))  # the sigmoid module: saturation is its rule's business
    assert DeadUnits().check(context(_act_frame(dead), sample_every=10)) == []


def test_saturated_activations_skip_output_activations() -> None:
    dead = np.zeros((5, 3))
    sat = np.tile([np.nan, np.nan, 0.95], (5, 1))
    frame = _act_frame(dead, sat)
    (f,) = SaturatedActivations().check(context(frame, sample_every=10))
    assert (f.step, f.layer, f.evidence["value"]) == (1, "out", 0.95)
    assert "sigmoid" in f.message and "0 or 1" in f.message
    # the same module after every layer with parameters (a classifier's output): saturating by design
    assert SaturatedActivations().check(context(frame, sample_every=10, output_activations=[2])) == []
    assert SaturatedActivations(threshold=0.99).check(context(frame, sample_every=10)) == []


def test_no_gradient_names_the_layer_and_its_parameters() -> None:
    params = [*chain(3), ("aux", "weight", 10), ("aux", "bias", 2)]
    has = np.ones((60, 5), bool)
    has[:, 3:] = False
    frame = build_frame(params, rms=np.full((60, 5), 1e-2), has_grad=has)
    (f,) = NoGradient().check(context(frame))
    assert (f.kind, f.severity, f.step, f.layer) == ("no_gradient", "warning", 1, "aux")
    assert f.evidence["params"] == ["aux.weight", "aux.bias"] and f.evidence["steps_without_grad"] == 60
    assert "All trainable parameters" in f.message and "detach" in f.suggestion


def test_no_gradient_ignores_frozen_and_intermittent_parameters() -> None:
    params = [*chain(2), ("aux", "weight", 10)]
    has = np.ones((60, 3), bool)
    has[:, 2] = False
    trainable = np.ones((60, 3), bool)
    trainable[:, 2] = False  # frozen on purpose
    frame = build_frame(params, rms=np.full((60, 3), 1e-2), has_grad=has, trainable=trainable)
    assert NoGradient().check(context(frame)) == []
    has[:, 2] = np.arange(60) % 7 == 0  # used once every 7 steps
    frame = build_frame(params, rms=np.full((60, 3), 1e-2), has_grad=has)
    assert NoGradient().check(context(frame)) == []


def test_no_gradient_counts_from_unfreezing_and_judges_short_runs_at_the_end() -> None:
    params = [*chain(2), ("aux", "weight", 10)]
    has = np.ones((80, 3), bool)
    has[:, 2] = False
    trainable = np.ones((80, 3), bool)
    trainable[:20, 2] = False  # unfrozen at step 21, never used
    frame = build_frame(params, rms=np.full((80, 3), 1e-2), has_grad=has, trainable=trainable)
    (f,) = feed(NoGradient(), frame, chunk_rows=25)
    assert (f.step, f.evidence["steps_without_grad"]) == (21, 55)  # reported at the flush after step 75
    short = build_frame(params, rms=np.full((3, 3), 1e-2), has_grad=has[:3])
    assert NoGradient().check(context(short, final=False)) == []
    assert [f.layer for f in NoGradient().check(context(short, final=True))] == ["aux"]
