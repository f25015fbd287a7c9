"""Long runs: bounded history (memory that does not grow with the step count) that still spans the run.

The full 100k-step training run is ``benchmarks/long_run.py``; here the scope is driven for 100k steps
with a 2-parameter model (gradients set once, ``every=10`` so the loop stays cheap) and the memory
allocated over the second half is measured with tracemalloc (NumPy arrays included), against an
unbounded scope as the control that shows the measurement would see growth.
"""

from __future__ import annotations

import gc
import json
import math
import resource
import sys
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.rules.base import Rule, RuleContext


def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def drive(history: int | None, steps: int = 100_000, every: int = 10) -> tuple[int, int, gradscope.GradScope]:
    """Call scope.step() ``steps`` times; return (bytes allocated and still alive over the second half,
    peak RSS growth over the second half in KiB, the scope)."""
    model = tiny()
    scope = gradscope.watch(model, every=every, flush_every=100, history=history, activations=False)
    half = steps // 2
    for _ in range(half):
        scope.step(loss=0.5)
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        for _ in range(steps - half):
            scope.step(loss=0.5)
        scope.flush()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    if sys.platform == "darwin":
        rss //= 1024  # bytes there, KiB on Linux
    return grown, rss, scope


def test_100k_steps_do_not_grow_memory():
    grown, rss, scope = drive(history=100)
    try:
        assert scope.step_count == 100_000
        info = scope.frame.history_info()
        # 10k recorded rows (steps 1, 11, ..., 99_991): the last 100-150 at full resolution (thinned
        # back to 100 once past 150), the older ones thinned to <= 50 rows
        full_rows = (99_991 - info["full_from_step"]) // 10 + 1
        assert 100 <= full_rows <= 150 and (99_991 - info["full_from_step"]) % 10 == 0
        assert info["thinned_rows"] <= 50 and len(scope.frame) == full_rows + info["thinned_rows"] <= 2 * 100
        assert info["dropped_rows"] == 10_000 - len(scope.frame)
        frame_bytes = sum(a.nbytes for a in scope.frame._arrays().values())
    finally:
        scope.close()
    control_grown, _, control = drive(history=None)
    try:
        assert len(control.frame) == 10_000  # unbounded: every recorded row stays
    finally:
        control.close()
    # The unbounded scope keeps 5,000 more rows over the second half: the measurement sees them ...
    assert control_grown > 1_000_000, control_grown
    # ... while the bounded one holds only its frame (at most 2 x history rows, rebuilt when it thins,
    # so allocated in this window) and some one-off allocations (caches; in a full test session
    # ~20 KiB from elsewhere): 128 KiB over 50,000 steps bounds any per-step leak below 3 bytes a step.
    assert grown <= frame_bytes + 128 * 1024, (grown, frame_bytes)
    assert frame_bytes <= 200 * 200, frame_bytes  # ~150 bytes per row for 2 parameters
    assert rss < 16 * 1024, f"peak RSS grew by {rss} KiB over the second half"


def test_thinned_history_keeps_exact_values_and_says_what_it_kept():
    def run(history):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        with gradscope.watch(model, optimizer=opt, flush_every=50, history=history, sample_every=5) as scope:
            for _ in range(1000):
                x = torch.randn(8, 4, generator=g)
                loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                scope.step(loss=loss)
                opt.zero_grad()
        return scope.report()

    full, thin = run(None), run(100)
    steps = sorted(set(thin.stats["step"]))
    full_from = thin.meta["history"]["full_from_step"]
    recent = [s for s in steps if s >= full_from]
    # at least the last `history` steps, every one; at most half as many more (THIN_SLACK) plus one flush
    assert recent == list(range(full_from, 1001)) and 100 <= len(recent) <= 150 + 50
    old = [s for s in steps if s < full_from]
    stride = thin.meta["history"]["thinned_stride"]
    assert stride % 5 == 0 and all((s - 1) % stride == 0 for s in old)  # sampled steps only
    assert old[0] == 1 and 25 < len(old) <= 50  # spans the run from step 1, in at most history / 2 rows
    assert len(steps) <= 2 * 100 + 50  # 2 x history, plus one flush
    assert thin.meta["history"] == {
        "window": 100,
        "rows": len(steps),
        "full_from_step": full_from,
        "thinned_rows": len(old),
        "thinned_stride": stride,
        "dropped_rows": 1000 - len(steps),
    }
    # kept rows are the very rows of the unbounded run: thinning drops rows, never alters them
    key = ["step", "layer", "param", "stat"]
    want = full.stats[full.stats["step"].isin(steps)].set_index(key)["value"].sort_index()
    got = thin.stats.set_index(key)["value"].sort_index()
    assert want.index.equals(got.index)
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    # every statistic is present on thinned rows (they are sampled rows)
    assert set(thin.stats[thin.stats["step"] == old[1]]["stat"]) == set(full.stats["stat"])
    # the JSON report carries the same rows and says which part is thinned
    back = gradscope.Report.from_json(thin.to_json())
    assert sorted(set(back.stats["step"])) == steps
    assert json.loads(thin.to_json())["meta"]["history"]["full_from_step"] == 901
    np.testing.assert_allclose(thin.scalars["loss"].to_numpy(), full.scalars["loss"].loc[steps].to_numpy())


class NewRows(Rule):
    """Test rule: records the steps each flush hands over as new."""

    name = "test_new_rows"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[int]] = []
        self.window: list[tuple[int, int]] = []  # (last step seen, rows of the last 100 steps)

    def check(self, ctx: RuleContext) -> list:
        self.seen.append([int(s) for s in ctx.steps[ctx.new_from :]])
        self.window.append((int(ctx.steps[-1]), int((ctx.steps > ctx.steps[-1] - 100).sum())))
        return []


def test_rules_and_tensorboard_see_every_step_at_full_resolution(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    probe = NewRows()
    model = tiny()
    with gradscope.watch(
        model, flush_every=40, history=100, rules=[probe], log_dir=tmp_path / "tb", activations=False
    ) as scope:
        for _ in range(1000):
            scope.step(loss=0.5)
    flat = [s for chunk in probe.seen for s in chunk]
    assert flat == list(range(1, 1001))  # each step handed to the rules once, in order, none missing
    # once 100 steps exist, every run of the rules (at flushes and live between them) sees all of the last 100
    assert min(w for last, w in probe.window if last >= 100) == 100
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb_steps = [e.step for e in acc.Scalars("gradscope/l2_norm/_model")]
    assert tb_steps == list(range(1, 1001))  # TensorBoard has every step, though the frame is thinned
    assert len(scope.frame) < 200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"history": 99}, "Expected `history` to be None"),
        ({"history": True}, "Expected `history` to be None"),
        ({"history": 150, "flush_every": 200}, "at least `flush_every`"),
    ],
)
def test_history_is_validated(kwargs, match):
    with pytest.raises(gradscope.ConfigurationError, match=match):
        gradscope.watch(tiny(), **kwargs)


def test_default_history_bounds_a_default_scope():
    with gradscope.watch(tiny()) as scope:
        assert scope.frame.history == 2000
    assert math.isfinite(scope.report().meta["history"]["window"])
