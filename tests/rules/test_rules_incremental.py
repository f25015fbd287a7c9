"""Rules evaluated incrementally give the findings a fresh evaluation of the whole run gives.

The gradient, coverage and activation rules keep state between evaluations and read per-row values
from a cache shared per frame (``gradscope.rules._common.FrameRows``), so that a call costs what its
new rows hold. Here small seeded runs with real faults (vanishing gradients behind an unused head,
dead ReLU units and a saturated tanh, a diverging regression, a NaN injected mid-run and a head
dropped mid-run) are recorded once, then judged three ways on the same rows:

* live: the rules run after every recorded row (with ``report()``'s provisional pass, on deep copies
  of the rules, every few rows), then once more in final mode, as ``close()`` does;
* at flushes: every 50 rows on a frame with bounded history (``history=40``: old rows are thinned
  once the full-resolution part passes 60 rows, row indices shift), then final;
* fresh: one engine, one final evaluation over the whole frame.

Every finding of the six rules is compared field by field (kind, layer, step, last_step,
resolved_step, severity, message, evidence numbers to rtol 1e-9). The reference needs no memory of
earlier calls, so any state the incremental path keeps wrongly shows up as a difference. A second
test compares the cached per-row values with the frame's own statistics, before and after thinning.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.rules import (
    DeadUnits,
    ExplodingGradients,
    NoGradient,
    NonfiniteGradients,
    SaturatedActivations,
    VanishingGradients,
)
from gradscope.rules._common import _FRAME_ROWS, frame_rows
from gradscope.rules.base import RuleContext
from gradscope.rules.engine import RuleEngine
from gradscope.rules.window import Episode, follow_episodes
from gradscope.stats.frame import StatsFrame

RULES = (VanishingGradients, ExplodingGradients, NonfiniteGradients, NoGradient, DeadUnits, SaturatedActivations)


class _Vanishing(nn.Module):
    """A deep sigmoid MLP, small init (vanishing gradients), with a head the forward pass never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(8, 8), nn.Sigmoid())])
        self.head = nn.Linear(8, 2)
        self.unused = nn.Linear(8, 2)
        for m in self.body:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _DeadSaturated(nn.Module):
    """A ReLU layer whose biases start far negative (dead units), then a tanh fed 20x its input (saturated)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.mid = nn.Linear(8, 16)
        self.tanh = nn.Tanh()
        self.head = nn.Linear(32, 2)
        with torch.no_grad():
            self.fc.bias.fill_(-20.0)
            self.mid.weight.mul_(20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.relu(self.fc(x)), self.tanh(self.mid(x))], dim=1))


class _Aux(nn.Module):
    """A small MLP with an auxiliary head that is dropped from the loss half-way."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 2)
        self.aux = nn.Linear(16, 2)
        self.use_aux = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        out = self.head(h)
        return out + self.aux(h) if self.use_aux else out


def _record(kind: str, steps: int) -> tuple[StatsFrame, RuleContext]:
    """Train a seeded faulty run (no rules), return its frame and the rule context the scope would use."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "vanishing":
        model: nn.Module = _Vanishing()
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    elif kind == "dead_saturated":
        model = _DeadSaturated()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    elif kind == "diverging":
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.4)
    else:
        model = _Aux()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, optimizer=opt, rules="none", sample_every=2, flush_every=25)
    for step in range(1, steps + 1):
        x = torch.randn(16, 8, generator=g) * (5.0 if kind == "diverging" else 1.0)
        if kind == "diverging":
            loss = ((model(x).squeeze(1) - x.sum(1) * 3.0) ** 2).mean()
        else:
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (16,), generator=g))
        if kind == "aux" and step == 40:
            model.use_aux = False  # type: ignore[assignment]  # reason: toggling the toy module's branch
        loss.backward()
        if kind == "aux" and step == 70:
            model.fc.weight.grad[0, 0] = float("nan")  # type: ignore[index, union-attr]  # reason: the injected fault
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad()
    scope.close()
    frame = scope.frame
    ctx = scope._diagnosis.context(frame, new_from=0, final=True, step_count=steps)
    return frame, ctx


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[StatsFrame, RuleContext]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the faults make torch and gradscope warn
        return {kind: _record(kind, 120) for kind in ("vanishing", "dead_saturated", "diverging", "aux")}


def _engine() -> RuleEngine:
    return RuleEngine([cls() for cls in RULES])


def _ctx(base: RuleContext, frame: StatsFrame, new_from: int, final: bool) -> RuleContext:
    steps = frame.steps
    return RuleContext(
        frame=frame,
        new_from=new_from,
        forward_order=list(base.forward_order),
        has_optimizer=True,
        final=final,
        every=base.every,
        sample_every=base.sample_every,
        step_count=int(steps[-1]) if len(steps) else 0,
        output_activations=base.output_activations,
    )


def _replay(
    frame: StatsFrame, base: RuleContext, chunk: int, *, history: int | None, provisional_every: int, cold: bool = False
) -> list:
    """Grow a frame chunk by chunk (thinning at every other chunk boundary), running the rules like the scope does.

    ``cold``: before every evaluation, the engine is replaced by a deep copy and the frame's row cache
    is dropped, so nothing can carry over but the rules' own (copied) state.
    """
    engine = _engine()
    arrays = frame._arrays()
    grown = StatsFrame(frame.schema, history=history, thin_every=base.sample_every)
    n = len(frame)
    for i, start in enumerate(range(0, n, chunk)):
        end = min(n, start + chunk)
        grown.append({k: v[start:end] for k, v in arrays.items()}, frame.scalar_names, thin=i % 2 == 1)
        if cold:
            engine = copy.deepcopy(engine)
            _FRAME_ROWS.pop(grown, None)
        engine.run(_ctx(base, grown, len(grown) - (end - start), final=False))
        if provisional_every and i % provisional_every == 0:
            copy.deepcopy(engine).run(_ctx(base, grown, len(grown), final=True))  # report() mid-run
        assert not engine.errors, engine.errors
    engine.run(_ctx(base, grown, len(grown), final=True))  # close()
    return engine.findings


def _fresh(frame: StatsFrame, base: RuleContext) -> list:
    engine = _engine()
    engine.run(_ctx(base, frame, 0, final=True))
    assert not engine.errors, engine.errors
    return engine.findings


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        fa, fb = float(a), float(b)
        return (math.isnan(fa) and math.isnan(fb)) or math.isclose(fa, fb, rel_tol=1e-9, abs_tol=0.0)
    return bool(a == b)


def _fields(findings: list) -> list[dict[str, Any]]:
    keys = ("kind", "layer", "step", "last_step", "resolved_step", "severity", "message", "evidence")
    return sorted(({k: getattr(f, k) for k in keys} for f in findings), key=lambda d: (d["kind"], str(d["layer"])))


EXPECTED = {
    "vanishing": {"vanishing_gradients", "no_gradient"},
    "dead_saturated": {"dead_units", "saturated_activations"},
    "diverging": {"exploding_gradients"},
    "aux": {"no_gradient", "nonfinite_gradients"},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_incremental_findings_equal_one_fresh_evaluation(runs: dict, kind: str) -> None:
    """Live (every row) and at flushes: the episodes a fresh evaluation of the whole run finds.

    Messages and evidence describe the episode as seen when it was first reported (a head without a
    gradient "over steps 41-90" at step 90), so they are compared in the next test, between two
    incremental evaluations that report at the same steps.
    """
    frame, base = runs[kind]
    keys = ("kind", "layer", "severity", "step", "last_step", "resolved_step")
    fresh = [{k: f[k] for k in keys} for f in _fields(_fresh(frame, base))]
    assert EXPECTED[kind] <= {f["kind"] for f in fresh}, fresh  # the faults are there to be found
    live = _fields(_replay(frame, base, 1, history=None, provisional_every=7))
    flushes = _fields(_replay(frame, base, 50, history=40, provisional_every=1))
    for got, how in ((live, "every row"), (flushes, "at flushes, history=40")):
        assert [{k: f[k] for k in keys} for f in got] == fresh, how


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_cache_and_copies_change_no_finding(runs: dict, kind: str) -> None:
    """Every row judged by rules that keep their state and the frame's row cache, or by deep copies of
    the rules on a frame whose cache is dropped before every call: the same findings, field by field."""
    frame, base = runs[kind]
    for chunk, history in ((1, None), (7, 40)):
        warm = _fields(_replay(frame, base, chunk, history=history, provisional_every=5))
        cold = _fields(_replay(frame, base, chunk, history=history, provisional_every=5, cold=True))
        assert len(warm) == len(cold) and warm, (warm, cold)
        for w, c in zip(warm, cold):
            assert _same(w, c), (chunk, w, c)


def test_cached_row_values_match_the_frame_before_and_after_thinning(runs: dict) -> None:
    """The per-row cache returns what the frame computes now, also after rows were thinned and moved."""
    from gradscope.rules.gradients import _grad_rows

    frame, base = runs["vanishing"]
    arrays = frame._arrays()
    grown = StatsFrame(frame.schema, history=40, thin_every=base.sample_every)
    for start in range(0, len(frame), 30):
        grown.append({k: v[start : start + 30] for k, v in arrays.items()}, frame.scalar_names)
        ctx = _ctx(base, grown, 0, final=False)
        rows = np.arange(len(grown))
        got = _grad_rows(ctx, rows)  # computed for new rows, moved for thinned ones
        values = grown.layer_values_many(["rms", "nonfinite_count"], rows)
        order = list(base.forward_order)
        np.testing.assert_array_equal(got["rms"], values["rms"][:, order])
        np.testing.assert_array_equal(got["nonfinite"], np.nan_to_num(values["nonfinite_count"][:, order]))
        with np.errstate(divide="ignore"):
            lg = np.log10(grown.global_values("l2_norm", rows))
        np.testing.assert_array_equal(got["lg"], lg)
    assert grown.dropped > 0  # rows were thinned: the cache had to follow them
    assert frame_rows(grown) is frame_rows(grown)


def test_follow_episodes_matches_episode_follow_one_by_one() -> None:
    """The vectorised episode update equals Episode.follow on each column, on random conditions."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        r, e = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        steps = np.cumsum(rng.integers(1, 4, size=r)) + int(rng.integers(0, 30))
        flags = rng.random((r, e)) < rng.random()
        start = [
            Episode(
                last=int(rng.integers(0, 40)),
                resolved=None if rng.random() < 0.5 else int(rng.integers(0, 60)),
                after=None if rng.random() < 0.5 else int(rng.integers(0, 60)),
            )
            for _ in range(e)
        ]
        one = copy.deepcopy(start)
        changed_one = [ep.follow(steps, flags[:, j], 5) for j, ep in enumerate(one)]
        many = copy.deepcopy(start)
        changed_many = follow_episodes(many, steps, flags, 5)
        assert changed_many.tolist() == changed_one
        assert [(x.last, x.resolved, x.after) for x in many] == [(x.last, x.resolved, x.after) for x in one]
