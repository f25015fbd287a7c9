"""batch_size_too_small / batch_size_too_large against the exact noise scale from per-sample gradients.

Reference: on a fixed data set of ``N`` samples, ``torch.func.vmap`` over ``torch.func.grad`` gives every
per-sample gradient (float64), so the exact ``B_simple = tr(Sigma) / |G|^2`` at the model's weights. The
runs draw micro-batches with replacement from that set at learning rate 0 (the weights never move), so
the estimator is unbiased for exactly that number. ``B_simple`` is set by where the weights sit: near the
least-squares solution the gradient is small against its noise (``B_simple`` large), far from it not.
Sign noise on the targets and +-1 features keep the per-sample gradient norms nearly constant, so the
estimate is Gaussian-limited: over the rules' window of 200 steps its spread is about 7% (far below) and
6% (far above) here (40 simulated runs from the same per-sample gradients), so 20% is about three
standard deviations, and the reported interval (3 standard errors) must hold the exact value.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from rulekit import context
from torch.func import functional_call, grad, vmap

import gradscope
from gradscope.capture.noise_scale import NoiseScale
from gradscope.rules.batch_size import NOISE_SCALE_SCALARS, BatchSizeTooSmall, WindowEstimate
from gradscope.stats.frame import StatsFrame

N = 4096
RULES = ["batch_size_too_small", "batch_size_too_large"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread (tests/conftest.py)


def problem(*, d: int, out: int, delta: float, noise: float, offset: float = 0.0):
    """``nn.Linear(d, out)`` at ``delta`` from the least-squares fit of a fixed data set ``(x [N, d], y [N, out])``."""
    torch.manual_seed(0)
    x = torch.randint(0, 2, (N, d)).float() * 2 - 1 + offset
    y = x @ torch.randn(d, out) + noise * (torch.randint(0, 2, (N, out)).float() * 2 - 1)
    model = nn.Linear(d, out)
    with torch.no_grad():
        xa = torch.cat([x, torch.ones(N, 1)], 1).double()
        fit = torch.linalg.lstsq(xa, y.double()).solution
        away = torch.randn_like(fit)
        fit = (fit + delta * away / away.norm()).float()
        model.weight.copy_(fit[:d].T)
        model.bias.copy_(fit[d])
    return model, x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def exact_b_simple(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``tr(Sigma) / |G|^2`` over the data set, from per-sample gradients (float64)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    # in chunks: one batched call over all 4096 samples is ten times slower on a CPU (cache misses)
    per = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=512)(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per.values()], dim=1).double()  # [N, n_params]
    mean = flat.mean(0)
    return ((flat - mean).pow(2).sum(1).mean() / mean.pow(2).sum()).item()


def train(model, x, y, *, b: int, k: int, steps: int, report_at: int | None = None, seed: int = 1, **watch):
    """``steps`` optimizer steps of ``k`` micro-batches of ``b`` samples, learning rate 0, watched.

    ``model`` may be a ``DistributedDataParallel`` wrapper; ``seed`` draws the samples (one per rank).
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(seed)
    provisional = None
    with gradscope.watch(model, optimizer=opt, noise_scale=b, **watch) as scope:
        for step in range(1, steps + 1):
            for _ in range(k):
                idx = torch.randint(0, N, (b,), generator=gen)
                loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            scope.step()
            if step == report_at:
                provisional = scope.report()
    return scope, scope.report(), provisional


def _only(report, kind: str):
    found = [f for f in report.findings if f.kind.startswith("batch_size")]
    assert [f.kind for f in found] == [kind], found
    return found[0]


def test_a_batch_far_below_the_noise_scale_is_found_with_the_exact_numbers():
    model, x, y = problem(d=64, out=64, delta=3.0, noise=1.0)
    ref = exact_b_simple(model, x, y)
    assert 400 < ref < 650  # about 16x the batch of 32
    scope, report, provisional = train(model, x, y, b=16, k=2, steps=300, report_at=200, rules=RULES)
    f = _only(report, "batch_size_too_small")
    e = f.evidence
    assert e["batch"] == 32  # 16 samples x 2 accumulated micro-batches
    assert abs(e["b_simple"] / ref - 1) < 0.2, (e, ref)
    assert e["b_simple_low"] <= ref <= e["b_simple_high"] and e["b_simple_low"] > 10 * 32, (e, ref)
    assert math.isclose(e["ratio"], e["b_simple"] / 32)
    assert math.isclose(e["steps_factor"], 1 + e["b_simple"] / 32)
    assert e["suggested_batch"] == 2.0 ** round(math.log2(e["b_simple"]))
    # judged on at least min_estimates steps after the warm-up, no earlier
    assert e["estimates"] == 200 and e["window"][0] > 50 and f.step == e["window"][1] >= 250
    assert f.severity == "warning" and f.layer is None
    assert "below the gradient noise scale" in f.message and "lower end" in f.suggestion
    # the provisional report at step 200 (deep copies of the rules, final=True) found nothing yet and
    # changed nothing: the run's own rules found the same as they would have
    assert provisional is not None and not [g for g in provisional.findings if g.kind.startswith("batch_size")]
    # JSON carries it like any finding (an unbounded interval as "inf")
    back = json.loads(report.to_json())
    assert [g["kind"] for g in back["findings"]] == ["batch_size_too_small"]
    assert gradscope.Report.from_json(report.to_json()).findings[0].evidence["batch"] == 32
    # the rule's window matches the estimator: the same running sums, differenced
    est = scope.noise_scale()
    assert est.b_big == 32 and abs(est.b_simple / ref - 1) < 0.2


def test_a_batch_near_the_noise_scale_is_silent():
    model, x, y = problem(d=64, out=64, delta=20.0, noise=1.0)
    ref = exact_b_simple(model, x, y)
    assert 32 / 3 < ref < 3 * 32
    scope, report, _ = train(model, x, y, b=16, k=2, steps=260, rules=RULES)
    assert not [f for f in report.findings if f.kind.startswith("batch_size")]
    # silent because the window says "near", not for want of estimates: the same window, judged here
    frame = scope.frame
    tr, g2, batch = (frame.scalar(n) for n in NOISE_SCALE_SCALARS)
    keep = frame.steps > 50
    est = WindowEstimate(np.diff(tr)[keep[1:]][-200:], np.diff(g2)[keep[1:]][-200:], 3.0)
    assert est.m == 200 and batch[-1] == 32
    assert abs(est.b_simple / ref - 1) < 0.2
    assert 32 / 10 < est.low and est.high < 32 * 10


def test_a_batch_far_above_the_noise_scale_is_found_with_the_exact_numbers():
    # non-centred features: every sample's gradient points the same way, B_simple of a few samples
    model, x, y = problem(d=32, out=16, delta=20.0, noise=0.01, offset=1.0)
    ref = exact_b_simple(model, x, y)
    assert 2 < ref < 5
    _, report, _ = train(model, x, y, b=4, k=16, steps=260, rules=RULES)
    f = _only(report, "batch_size_too_large")
    e = f.evidence
    assert e["batch"] == 64
    assert abs(e["b_simple"] / ref - 1) < 0.2, (e, ref)
    assert e["b_simple_low"] <= ref <= e["b_simple_high"] < 64 / 10, (e, ref)
    assert math.isclose(e["data_factor"], 1 + 64 / e["b_simple"])
    assert e["suggested_batch"] == 4.0
    assert "above the gradient noise scale" in f.message


def test_without_noise_scale_the_rules_are_inactive_and_named_ones_ask_for_it():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt) as scope:
        for _ in range(3):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            scope.step()
    assert not {r.name for r in scope.engine.rules} & set(RULES)
    assert [i for i in scope.engine.inactive if i.startswith("batch_size")] == [
        "batch_size_too_small (needs noise_scale)",
        "batch_size_too_large (needs noise_scale)",
    ]
    assert not scope.engine.errors
    with pytest.raises(gradscope.ConfigurationError, match="noise_scale=<micro-batch size>"):
        gradscope.watch(model, optimizer=opt, rules=["batch_size_too_small"])
    with gradscope.watch(model, optimizer=opt, noise_scale=8) as scope:
        assert {"batch_size_too_small", "batch_size_too_large"} <= {r.name for r in scope.engine.rules}


def test_the_scalars_the_rules_read_are_the_estimators():
    model = nn.Linear(4, 2)
    ns = NoiseScale(model, batch_size=8).attach()
    assert set(ns.scalars()) == {"noise_scale", *NOISE_SCALE_SCALARS}
    ns.close()
    # an exponential moving average cannot be differenced into window sums: only the ratio is recorded
    assert set(NoiseScale(model, decay=0.9).scalars()) == {"noise_scale"}


def test_window_estimate_interval_is_fieller_and_the_judgement_is_incremental():
    rng = np.random.default_rng(0)
    t = rng.normal(100.0, 30.0, 150)
    g = rng.normal(1.0, 0.4, 150)
    est = WindowEstimate(t, g, 3.0)
    assert math.isclose(est.b_simple, t.mean() / g.mean())
    # the interval's ends are where mean(t - R g) is exactly z standard errors from 0
    assert est.low < est.b_simple < est.high
    assert math.isclose(est.beyond(est.low), 3.0, rel_tol=1e-6)
    assert math.isclose(est.beyond(est.high), -3.0, rel_tol=1e-6)
    # a denominator lost in its noise: unbounded above, still bounded below
    loose = WindowEstimate(t, rng.normal(0.05, 1.0, 150), 3.0)
    assert loose.high == math.inf and loose.low > 0

    # Fed the rows flush by flush, the rule finds what a fresh rule finds on all the rows so far (its state
    # is the running sums at the last row it took), and deep copies judged as the last flush (what
    # report() runs) change nothing. every=2: each recorded row holds two steps' estimates.
    model, x, y = problem(d=64, out=64, delta=3.0, noise=1.0)
    scope, _, _ = train(model, x, y, b=16, k=2, steps=300, rules=RULES, every=2)
    frame = scope.frame
    arrays = frame._arrays()  # as rulekit.feed grows a frame
    grown = StatsFrame(frame.schema)
    rule = BatchSizeTooSmall()
    first: list = []
    fresh_first: list = []
    for start in range(0, len(frame), 10):
        grown.append({k: v[start : start + 10] for k, v in arrays.items()}, frame.scalar_names)
        copy.deepcopy(rule).check(context(grown, new_from=len(grown), final=True, every=2))
        got = [f for f in rule.check(context(grown, new_from=start, final=False, every=2)) if f.last_step is None]
        fresh = BatchSizeTooSmall().check(context(grown, final=False, every=2))
        first = first or got
        fresh_first = fresh_first or fresh
    assert len(first) == 1 and first[0].kind == "batch_size_too_small"
    assert (first[0].step, first[0].evidence) == (fresh_first[0].step, fresh_first[0].evidence)
    assert first[0].evidence["estimates"] == 100  # rows of two steps: 200 steps' estimates


# -- DDP, 2 gloo processes: the local gradient against the all-reduced one ------------------------------
DDP_B, DDP_STEPS = 16, 300


def _ddp_rank(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        model, x, y = problem(d=64, out=64, delta=3.0, noise=1.0)  # the same weights and data on every rank
        # each rank its own samples (seed); one micro-batch per step: DDP's all-reduce is the big batch
        _, report, _ = train(DDP(model), x, y, b=DDP_B, k=1, steps=DDP_STEPS, seed=100 + rank, rules=RULES)
        found = [(f.kind, f.step, f.evidence) for f in report.findings if f.kind.startswith("batch_size")]
        Path(out, f"rank{rank}.json").write_text(json.dumps(found, default=float))
        dist.barrier()  # both ranks done before either tears the gloo group down (see test_noise_scale.py)
        Path(out, f"done{rank}").touch()  # the conftest's gloo_spawn: a teardown abort after this is no failure
    finally:
        dist.destroy_process_group()


def test_under_ddp_a_batch_far_below_the_noise_scale_is_found_on_every_rank_with_the_global_batch(gloo_spawn):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    with tempfile.TemporaryDirectory(prefix="gradscope-bs-ddp-") as out:
        gloo_spawn(_ddp_rank, (2, out), 2, out)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    model, x, y = problem(d=64, out=64, delta=3.0, noise=1.0)
    ref = exact_b_simple(model, x, y)
    for found in ranks:
        assert [k for k, _, _ in found] == ["batch_size_too_small"], found
    (_, step0, e0), (_, step1, e1) = ranks[0][0], ranks[1][0]
    # the ranks agree: the rules judged the same all-reduced rows, at the same step
    assert step0 == step1 and e0["b_simple"] == e1["b_simple"]
    # the batch is the global one (2 ranks x 16), and the estimate is of the same B_simple as in one process
    assert e0["batch"] == 2 * DDP_B
    assert abs(e0["b_simple"] / ref - 1) < 0.2, (e0, ref)
    assert e0["b_simple_low"] <= ref <= e0["b_simple_high"], (e0, ref)
