"""torch.compile: watching the compiled module, or the module before it is compiled.

gradscope must add no graph break and no per-step recompilation (checked with dynamo's own counters
and ``torch._dynamo.explain``), and the statistics must equal those of the eager run. Activation
statistics are not taken under compile (their hooks would be traced into the graph): watching the
compiled module turns them off up front; watching before compiling turns them off at the first step
that runs compiled, with a warning.
"""

from __future__ import annotations

import warnings

import _dist
import pytest
import torch
import torch.nn as nn

import gradscope

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

STEPS = 8
WATCH = {"sample_every": 2, "flush_every": 3}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def train(mode: str, backend: str = "aot_eager", steps: int = STEPS) -> tuple[gradscope.Report | None, dict, list]:
    """mode: "eager", "bare" (compiled, not watched), "compiled" (watch the compiled module),
    "before" (watch the module, then compile it)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dynamo.reset()
    counters.clear()
    scope = None
    if mode == "eager":
        run = model
        scope = gradscope.watch(model, optimizer=opt, **WATCH)
    elif mode == "bare":
        run = torch.compile(model, backend=backend)
    elif mode == "compiled":
        run = torch.compile(model, backend=backend)
        scope = gradscope.watch(run, optimizer=opt, **WATCH)
    else:
        scope = gradscope.watch(model, optimizer=opt, **WATCH)
        run = torch.compile(model, backend=backend)
    frames = []  # dynamo's compiled-frame count after each step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, steps + 1):
            x, y = data(step)
            loss = (run(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            if scope is not None:
                scope.step(loss=loss)
            opt.zero_grad(set_to_none=True)
            frames.append(counters["frames"]["total"])
    report = scope.close() if scope is not None else None
    seen = {k: dict(v) for k, v in counters.items()}
    seen["frames_by_step"] = frames
    return report, seen, [str(w.message) for w in caught if issubclass(w.category, gradscope.GradscopeWarning)]


def gradient_rows(report: gradscope.Report):
    s = report.stats
    return s[~s["stat"].str.startswith("act_")]


def test_watching_the_compiled_module_adds_no_graph_break_and_no_recompile():
    bare_report, bare, _ = train("bare")
    report, seen, warned = train("compiled")
    assert bare_report is None
    assert seen.get("graph_break", {}) == bare.get("graph_break", {}) == {}
    assert seen["stats"]["unique_graphs"] == bare["stats"]["unique_graphs"] == 1
    assert seen["frames_by_step"] == bare["frames_by_step"]  # compiled once, at step 1, then reused
    assert report.meta["compiled"] and not report.meta["activations"] and not warned
    assert not report.stats["stat"].str.startswith("act_").any()


def test_watching_before_compiling_costs_one_compilation_then_none():
    _, bare, _ = train("bare")
    report, seen, warned = train("before")
    assert seen.get("graph_break", {}) == {}
    # step 1 runs with gradscope's layer-order and activation hooks, step 2 without: one more graph,
    # then nothing recompiles (sampled steps no longer add hooks).
    assert seen["stats"]["unique_graphs"] == bare["stats"]["unique_graphs"] + 1
    assert seen["frames_by_step"][1:] == [seen["frames_by_step"][1]] * (STEPS - 1)
    assert any("torch.compile" in w for w in warned)
    assert report.meta["layers_by_depth"] == ["0", "2", "4"]  # learnt from the compiled step 1


def test_no_graph_break_with_the_hooks_armed():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt):  # step 1: layer-order and activation hooks are on
        dynamo.reset()
        explanation = dynamo.explain(model)(data(1)[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("mode", ["compiled", "before"])
def test_compiled_statistics_equal_eager(mode):
    eager, _, _ = train("eager")
    report, _, _ = train(mode)
    bad = _dist.compare_stats(gradient_rows(report), gradient_rows(eager), rtol=1e-6, atol=1e-9)
    assert not bad, "\n".join(bad[:30])
    assert (report.scalars["loss"] - eager.scalars["loss"]).abs().max() <= 1e-6


def test_inductor_statistics_equal_eager():
    eager, _, _ = train("eager", steps=4)
    report, seen, _ = train("compiled", backend="inductor", steps=4)
    assert seen.get("graph_break", {}) == {} and seen["stats"]["unique_graphs"] == 1
    # inductor fuses and reorders float32 arithmetic: equal to rounding
    bad = _dist.compare_stats(gradient_rows(report), gradient_rows(eager), rtol=1e-4, atol=1e-7)
    assert not bad, "\n".join(bad[:30])
