"""Rules never break the run, and a spec of removals starts from "all" (issue 14, items 2 and 3)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.check_command import parse_rules
from gradscope.findings import Finding
from gradscope.rules.base import Rule
from gradscope.rules.engine import build_rules
from gradscope.rules.registry import RULES


def _nan_run(rules, report_path=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, optimizer=opt, rules=rules, report_path=report_path, flush_every=2) as scope:
            for _ in range(4):
                loss = model(torch.randn(8, 3)).sum() * float("nan")  # every gradient is NaN
                loss.backward()
                opt.step()
                scope.step()
                opt.zero_grad()
    return scope.report(), [str(w.message) for w in caught]


@pytest.mark.parametrize("spec", [["-overfitting"], "-overfitting", parse_rules("-overfitting,-dead_units")])
def test_a_spec_of_removals_starts_from_all(spec):
    names = [r.name for r in build_rules(spec)]
    removed = {"overfitting"} | ({"dead_units"} if "-dead_units" in spec else set())
    assert sorted(names) == sorted(n for n in RULES.names() if n not in removed)
    report, _ = _nan_run(spec)
    assert "nonfinite_gradients" in {f.kind for f in report.findings}
    assert not report.ok  # a run with NaN gradients never passes


class _Base(Rule):
    severity = "warning"

    def finding_at(self, ctx, evidence):
        return self.finding(step=int(ctx.steps[-1]), layer=None, message="m", suggestion="s", evidence=evidence)


class ReturnsNone(_Base):
    name = "returns_none"

    def check(self, ctx):
        return None


class ReturnsDict(_Base):
    name = "returns_dict"

    def check(self, ctx):
        return {"step": 1}


class Raises(_Base):
    name = "raises"

    def check(self, ctx):
        raise RuntimeError("boom")


class BadStep(_Base):
    name = "bad_step"

    def check(self, ctx):
        import dataclasses

        return [dataclasses.replace(self.finding_at(ctx, {}), step="late")]


class OddEvidence(_Base):
    name = "odd_evidence"

    def check(self, ctx):
        return [self.finding_at(ctx, {"obj": object(), "n": 2, "inner": {"set": {1}}})]


def test_misbehaving_rules_are_switched_off_by_name_and_the_report_is_still_written(tmp_path):
    path = tmp_path / "report.json"
    bad = [ReturnsNone(), ReturnsDict(), Raises(), BadStep(), OddEvidence()]
    report, messages = _nan_run(["all", *bad], report_path=path)
    for name in ("returns_none", "returns_dict", "raises", "bad_step"):
        assert any(f"Rule {name!r}" in m and "switched off" in m for m in messages), name
        assert any(f"Rule {name!r}" in e for e in report.errors), name
    assert any("'odd_evidence'" in m and "JSON" in m for m in messages)
    kinds = {f.kind for f in report.findings}
    assert "nonfinite_gradients" in kinds  # the other rules go on
    odd = next(f for f in report.findings if f.kind == "odd_evidence")
    assert odd.evidence["n"] == 2 and odd.evidence["obj"].startswith("<object object")
    assert odd.evidence["inner"] == {"set": "{1}"}
    written = json.loads(path.read_text())  # report_path written, and valid JSON
    assert {f["kind"] for f in written["findings"]} == kinds
    again = gradscope.Report.from_json(path)
    assert isinstance(again.findings[0], Finding)


class FollowsOddEvidence(_Base):
    """Reports once, then returns its first finding again at every evaluation with a later last_step (an episode)."""

    name = "follows_odd_evidence"

    def reset(self):
        self._first = None
        self.calls = 0

    def check(self, ctx):
        import dataclasses

        self.calls += 1
        if self._first is None:
            self._first = self.finding_at(ctx, {"obj": object(), "n": 2})
            return [self._first]
        return [dataclasses.replace(self._first, last_step=int(ctx.steps[-1]))]


def test_evidence_returned_again_is_checked_once_and_its_safe_copy_kept(monkeypatch):
    # A rule that follows an episode returns the same evidence object at every evaluation; it is walked
    # for JSON once (tens of followed findings would cost a millisecond per evaluation otherwise), and
    # what is kept is the same safe copy each time.
    from gradscope.rules import engine

    walked = []
    real = engine._json_safe
    monkeypatch.setattr(engine, "_json_safe", lambda ev: walked.append(id(ev)) or real(ev))
    rule = FollowsOddEvidence()
    report, messages = _nan_run(["nonfinite_gradients", rule])
    ours = [f for f in report.findings if f.kind == "follows_odd_evidence"]
    assert len(ours) == 1
    assert ours[0].evidence["n"] == 2 and ours[0].evidence["obj"].startswith("<object object")
    assert ours[0].last_step == 4  # the episode followed to the last step, through the updates
    assert rule.calls >= 3
    assert walked.count(id(rule._first.evidence)) == 1  # checked once, at every evaluation after the first too
    assert sum("'follows_odd_evidence'" in m and "JSON" in m for m in messages) == 1
