"""Rule state: built by the constructor, reset to a new run's by ``reset()``; the engine's "all" bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from rulekit import build_frame, context, feed

from gradscope.errors import ConfigurationError
from gradscope.rules import Rule, RuleContext
from gradscope.rules.engine import RuleEngine, RuleSelection, build_rules
from gradscope.rules.registry import RULES


def _broken_run() -> tuple:
    """120 steps where most rules fire: vanishing early layers, a NaN at step 100, an unused layer,
    a flat loss, a validation loss rising from step 60, a dead ReLU."""
    params = [("fc0", "weight", 50), ("fc1", "weight", 50), ("head", "weight", 50), ("aux", "weight", 10)]
    n = 120
    rms = np.tile([1e-7, 1e-7, 1e-2, 1.0], (n, 1))
    nonfinite = np.zeros((n, 4))
    nonfinite[99:, 1] = 3
    has = np.ones((n, 4), bool)
    has[:, 3] = False
    rng = np.random.default_rng(0)
    loss = 2.3 + rng.normal(0, 0.02, n)
    val = np.full(n, np.nan)
    val[9::10] = np.where(np.arange(9, n, 10) < 60, 1.0, 1.0 + 0.05 * (np.arange(9, n, 10) - 50) / 10)
    frame = build_frame(
        params,
        rms=rms,
        nonfinite=nonfinite,
        has_grad=has,
        scalars={"loss": loss, "val_loss": val},
        act={"act_dead_fraction": np.full((n, 1), 0.9), "act_zero_fraction": np.full((n, 1), 0.95)},
        act_modules=("relu",),
        act_kinds=("relu",),
    )
    return frame, params


def _key(findings: list) -> list:
    return [(f.kind, f.step, f.layer, f.message, repr(f.evidence)) for f in findings]


@pytest.mark.parametrize("name", RULES.keys())
def test_reset_returns_every_registered_rule_to_a_new_run(name: str) -> None:
    frame, _ = _broken_run()
    rule = RULES.get(name)()
    first = feed(rule, frame, 25)
    assert feed(rule, frame, 25) == []  # a second pass over the same run reports nothing new
    rule.reset()
    assert _key(feed(rule, frame, 25)) == _key(first)  # the state a flush left behind is all gone


def test_the_broken_run_makes_the_stateful_rules_fire() -> None:
    # So that the reset test above compares findings, not two empty lists.
    frame, _ = _broken_run()
    kinds = {f.kind for name in RULES.keys() for f in feed(RULES.get(name)(), frame, 25)}
    assert {"vanishing_gradients", "nonfinite_gradients", "no_gradient", "loss_not_decreasing", "dead_units"} <= kinds


def test_a_rule_reads_its_state_without_checking_that_it_exists() -> None:
    class Counting(Rule):
        name = "counting_for_test"

        def reset(self) -> None:
            self.calls = 0

        def check(self, ctx: RuleContext) -> list:
            self.calls += 1  # set by __init__ through reset()
            return []

    rule = Counting()
    frame, _ = _broken_run()
    rule.check(context(frame))
    assert rule.calls == 1
    rule.reset()
    assert rule.calls == 0


def test_rules_from_all_are_implicit_and_left_out_quietly_named_ones_raise() -> None:
    sel = build_rules(["all", "-overfitting", "nonfinite_gradients"], {"vanishing_gradients": {"ratio": 1e-4}})
    assert isinstance(sel, RuleSelection) and isinstance(sel, list)
    assert [r.name for r in sel] == [n for n in RULES.keys() if n != "overfitting"]
    # named, or given thresholds: explicit; the others came only through "all"
    assert sel.implicit == set(RULES.keys()) - {"overfitting", "nonfinite_gradients", "vanishing_gradients"}
    assert not any(hasattr(r, "_implicit") for r in sel)  # the fact lives in the selection, not on the rules

    engine = RuleEngine(sel)
    engine.check_requirements(["l2_norm", "nonfinite_count"], activations=False)
    assert {r.name for r in engine.rules} == {
        "vanishing_gradients",
        "exploding_gradients",
        "nonfinite_gradients",
        "no_gradient",
        "loss_not_decreasing",
        "loss_spike",
    }
    assert sorted(engine.inactive) == [
        "batch_size_too_large (needs noise_scale)",
        "batch_size_too_small (needs noise_scale)",
        "dead_units (needs activation statistics)",
        "learning_rate_too_high (needs update_ratio)",
        "learning_rate_too_low (needs update_ratio)",
        "saturated_activations (needs activation statistics)",
    ]

    with pytest.raises(ConfigurationError, match="'nonfinite_gradients' needs statistic"):
        RuleEngine(build_rules(["all", "nonfinite_gradients"])).check_requirements(["l2_norm"], activations=True)
    # a plain list of rules holds no implicit ones: each was asked for
    with pytest.raises(ConfigurationError, match="'dead_units' needs activation statistics"):
        RuleEngine(list(build_rules("all"))).check_requirements(["l2_norm", "nonfinite_count"], activations=False)
