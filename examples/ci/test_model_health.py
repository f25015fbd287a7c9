"""Gradient-health tests of the example models, with the `gradscope` pytest fixture.

Run with `pytest examples/ci` (installing gradscope registers the fixture). Add
`--gradscope-report=gradscope.json` for a JSON file of every check, `--gradscope-fail-on=warning` to
fail on warnings too.
"""

from __future__ import annotations

from pathlib import Path

import broken_model
import healthy_model
import pytest

from gradscope import GradientHealthError, assert_healthy

PROFILE = Path(__file__).with_name("profile.json")


def test_classifier_is_healthy(gradscope):
    model, batch, loss_fn, optimizer = healthy_model.make()
    gradscope.assert_healthy(model, batch, loss_fn, optimizer=optimizer)


@pytest.mark.gradscope(steps=3)
def test_transformer_is_healthy(gradscope):
    report = gradscope.assert_healthy(*healthy_model.make_transformer())
    assert report.steps == 3


def test_classifier_matches_its_baseline(gradscope):
    # Regenerate after an intended change: gradscope snapshot examples/ci/healthy_model.py:make -o examples/ci/profile.json
    gradscope.assert_matches_baseline(healthy_model.make, PROFILE)


def test_broken_init_moves_the_profile(gradscope):
    # Inside a test that takes the `gradscope` fixture, that name is the fixture: import by name.
    with pytest.raises(GradientHealthError, match=r"hidden\.0"):
        gradscope.assert_matches_baseline(broken_model.make, PROFILE)


def test_broken_init_is_caught(gradscope):
    model, batch, loss_fn, optimizer = broken_model.make()
    report = gradscope.check(model, batch, loss_fn, optimizer=optimizer)
    assert "vanishing_gradients" in {f.kind for f in report.findings}


def test_unused_branch_is_caught(gradscope):
    report = gradscope.check(*broken_model.make_unused_branch())
    assert ("no_gradient", "aux") in {(f.kind, f.layer) for f in report.findings}


def test_nan_batch_is_caught():
    # Without the fixture: assert_healthy raises GradientHealthError with the findings and the layer table.
    with pytest.raises(GradientHealthError, match="nonfinite_gradients"):
        assert_healthy(*broken_model.make_nan_batch())
