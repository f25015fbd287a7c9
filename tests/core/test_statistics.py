"""Every statistic, per parameter, per layer and for the model, against NumPy in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.registry import STATISTICS
from gradscope.stats import BUILTIN_STATISTICS
from gradscope.stats import builtin as F
from gradscope.stats.frame import FrameSchema, StatsFrame, derive
from gradscope.stats.moments import CORE_MOMENTS, MOMENTS, MomentPlan

from .helpers import assert_all_close, mlp, np_stats, value

GRAD_STATS = ["l2_norm", "rms", "mean", "std", "abs_max", "zero_fraction", "nonfinite_count"]


def _train(model, opt, steps, scope, seed=0, make_zero_rows=False):
    """Run steps; return the float64 gradients and weights (before the step) seen at each step."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if make_zero_rows:
            model[0].weight.grad[:2] = 0.0  # exact zeros, so zero_fraction is not trivially 0
        grads = {n: p.grad.detach().double().clone().numpy() for n, p in model.named_parameters()}
        before = {n: p.detach().double().clone().numpy() for n, p in model.named_parameters()}
        opt.step()
        after = {n: p.detach().double().clone().numpy() for n, p in model.named_parameters()}
        scope.step(loss=loss)
        opt.zero_grad()
        seen.append((grads, before, after, float(loss.detach())))
    return seen


def test_every_builtin_statistic_matches_numpy_per_param_layer_and_model():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gradscope.watch(model, optimizer=opt, sample_every=1, rules="none") as scope:
        seen = _train(model, opt, 3, scope, make_zero_rows=True)
    df = scope.report().stats
    assert set(df.stat) >= set(BUILTIN_STATISTICS)
    pairs = []
    for step, (grads, before, after, _) in enumerate(seen, start=1):
        layers = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"], "4": ["4.weight", "4.bias"]}
        groups = {(k, n.split(".")[1]): [n] for k, names in layers.items() for n in names}
        groups.update({(k, "*"): names for k, names in layers.items()})
        groups[("*", "*")] = [n for names in layers.values() for n in names]
        for (layer, param), names in groups.items():
            g = np.concatenate([grads[n].ravel() for n in names])
            w0 = np.concatenate([before[n].ravel() for n in names])
            w1 = np.concatenate([after[n].ravel() for n in names])
            ref = np_stats(g)
            ref["param_norm"] = float(np.linalg.norm(w0))
            ref["update_ratio"] = float(np.linalg.norm(w1 - w0) / np.linalg.norm(w0))
            for stat, expected in ref.items():
                got = value(df, step, layer, param, stat)
                # mean and std come from float32 sums: absolute error ~1e-7 * rms (the sum of a
                # gradient that cancels to ~0, like a softmax output bias, is only that exact)
                atol = 1e-6 * ref["rms"] if stat in ("mean", "std") else 1e-9
                pairs.append((f"step {step} {layer}/{param} {stat}", got, expected, atol))
    assert_all_close(pairs, rtol=2e-6, atol=1e-9)
    # the zero rows were really counted
    assert value(df, 1, "0", "weight", "zero_fraction") >= 2 * 6 / 72


def test_stats_are_recorded_once_per_step_with_loss():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        seen = _train(model, opt, 12, scope)
    report = scope.report()
    df = report.stats
    assert sorted(df.step.unique()) == list(range(1, 13))
    # one row per (step, layer, param, stat)
    assert not df.duplicated(["step", "layer", "param", "stat"]).any()
    np.testing.assert_allclose(report.scalars["loss"].to_numpy(), [s[3] for s in seen], rtol=1e-6)
    # sampled statistics exist on steps 1 and 11 only (sample_every=10); l2_norm on every step
    assert sorted(df[df.stat == "mean"].step.unique()) == [1, 11]
    assert sorted(df[df.stat == "l2_norm"].step.unique()) == list(range(1, 13))


def test_functional_definitions_match_numpy():
    torch.manual_seed(3)
    g = torch.randn(7, 5, dtype=torch.float64)
    g[0, :3] = 0
    p = torch.randn(7, 5, dtype=torch.float64)
    ref = np_stats(g.numpy())
    got = {name: float(getattr(F, name)(g, p)) for name in GRAD_STATS}
    assert_all_close([(k, got[k], ref[k]) for k in GRAD_STATS], rtol=1e-12, atol=1e-15)
    assert float(F.param_norm(g, p)) == pytest.approx(np.linalg.norm(p.numpy()), rel=1e-12)
    q = p + 0.01 * g
    assert float(F.update_ratio(p, q)) == pytest.approx(
        np.linalg.norm(0.01 * g.numpy()) / np.linalg.norm(p.numpy()), rel=1e-12
    )


def test_fused_moments_match_the_reference_functions_on_odd_shapes_and_dtypes():
    torch.manual_seed(1)
    grads = [
        torch.randn(3, 4, 5),
        torch.zeros(7),
        torch.randn(1),
        torch.randn(64, 33).t(),
        torch.randn(9, dtype=torch.float64),
    ]
    grads[3][:, 0] = 0
    plan = MomentPlan(MOMENTS)
    mom = plan.grad_moments(grads, grads).numpy()
    pairs = []
    for i, g in enumerate(grads):
        ref = np_stats(g.double().numpy())
        for stat in GRAD_STATS:
            pairs.append((f"grad {i} {stat}", float(derive(stat, mom[i], float(g.numel()))), ref[stat]))
    assert_all_close(pairs, rtol=1e-5, atol=1e-6)


def _builtins():
    return [s for _, s in STATISTICS.items() if s.builtin]


def _reference(stat, grad, before, after):
    # a statistic of the optimizer's step takes the weights before and after it; the others (grad, param)
    args = (before, after) if stat.needs_optimizer else (grad, before)
    return float(stat.fn(*args))


def _fused(grads, befores, afters, *, sampled=True):
    """Moments of each tensor as the capture takes them: ``[len(grads), len(MOMENTS)]`` float64."""
    plan = MomentPlan(MOMENTS)
    mom = plan.grad_moments(grads, befores, sampled=sampled)
    if sampled:
        mom[:, MOMENTS.index("psumsq")] = MomentPlan.param_sumsq(befores)
        mom[:, MOMENTS.index("dsumsq")] = MomentPlan.param_sumsq([a - b for a, b in zip(afters, befores)])
    return mom.numpy()


def _tensors(seed, nonfinite=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4, 5), (7,), (1,), (33, 64)]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) * 10.0 ** (i - 2) for i, s in enumerate(shapes)]
    grads[1].zero_()
    grads[3][:, :5] = 0.0  # exact zeros, so zero_fraction is not trivially 0
    if nonfinite:
        grads[0][0, 0, :2] = float("nan")
        grads[3][4, 7] = float("inf")
    befores = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    afters = [b + 1e-3 * torch.randn(s, generator=g, dtype=torch.float64) for b, s in zip(befores, shapes)]
    return grads, befores, afters


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan-and-inf"])
def test_every_builtin_derivation_from_fused_moments_equals_its_reference_definition(nonfinite):
    """Driven by the registry: a new built-in statistic is covered without touching this test.

    Per tensor (the fused moments of one gradient), and for a layer and the model (moments aggregated
    by the frame), against the statistic's own reference definition on the concatenated tensors.
    """
    grads, befores, afters = _tensors(7, nonfinite)
    mom = _fused(grads, befores, afters)
    numel = np.array([g.numel() for g in grads], dtype=np.float64)
    # one layer "a" with the first three tensors, one layer "b" with the last
    members = [[0, 1, 2], [3]]
    schema = FrameSchema(
        param_names=[f"p{i}" for i in range(4)],
        param_layers=["a", "a", "a", "b"],
        param_leaves=[f"p{i}" for i in range(4)],
        numels=numel,
        layers=["a", "b"],
        layer_members=members,
        stats=tuple(s.name for s in _builtins()),
        custom={},
    )
    frame = StatsFrame(schema)
    frame.append(
        {
            "steps": np.array([1]),
            "skipped": np.zeros(1, bool),
            "has_grad": np.ones((1, 4), bool),
            "trainable": np.ones((1, 4), bool),
            "moments": mom[None],
            "sampled": np.ones(1, bool),
            "act": np.zeros((1, 0, 3)),
            "scalars": np.zeros((1, 0)),
        },
        [],
    )

    def cat(ts, idx):
        return torch.cat([ts[i].reshape(-1) for i in idx])

    pairs = []
    for stat in _builtins():
        for i in range(4):
            ref = _reference(stat, grads[i], befores[i], afters[i])
            pairs.append((f"{stat.name} tensor {i}", float(derive(stat, mom[i], numel[i])), ref))
            pairs.append((f"{stat.name} param {i}", float(frame.param_values(stat.name)[0, i]), ref))
        layer = frame.layer_values(stat.name)[0]
        for li, idx in enumerate(members):
            ref = _reference(stat, cat(grads, idx), cat(befores, idx), cat(afters, idx))
            pairs.append((f"{stat.name} layer {li}", float(layer[li]), ref))
        everything = range(4)
        ref = _reference(stat, cat(grads, everything), cat(befores, everything), cat(afters, everything))
        pairs.append((f"{stat.name} model", float(frame.global_values(stat.name)[0]), ref))
    assert_all_close(pairs, rtol=1e-10, atol=1e-13)


def test_every_step_takes_exactly_the_builtins_that_are_not_sampled():
    """``Statistic.sampled`` says what a step outside ``sample_every`` can give: the rest is NaN there."""
    grads, befores, afters = _tensors(3)
    mom = _fused(grads, befores, afters, sampled=False)
    numel = np.array([g.numel() for g in grads], dtype=np.float64)
    for stat in _builtins():
        assert stat.sampled == (not set(stat.moments) <= CORE_MOMENTS), stat.name
        got = derive(stat, mom, numel)
        if stat.sampled:
            assert np.isnan(got).all(), stat.name
        else:
            want = [_reference(stat, g, b, a) for g, b, a in zip(grads, befores, afters)]
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=stat.name)
    assert BUILTIN_STATISTICS == tuple(s.name for s in _builtins())


def test_bfloat16_gradients_are_reduced_in_float32():
    torch.manual_seed(2)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, optimizer=opt, sample_every=1, rules="none", activations=False) as scope:
        model(torch.randn(8, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        g = model.weight.grad.double().numpy()
        opt.step()
        scope.step()
    df = scope.report().stats
    ref = np_stats(g)
    # the bf16 entries are exact; the float32 reductions keep ~7 significant digits
    for stat in ("l2_norm", "mean", "abs_max"):
        assert value(df, 1, "", "weight", stat) == pytest.approx(ref[stat], rel=1e-5, abs=1e-9)


def test_nonfinite_entries_are_counted_exactly():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        model(torch.randn(4, 6)).sum().backward()
        model[2].weight.grad[0, :3] = float("nan")
        model[2].weight.grad[1, 0] = float("inf")
        model[4].bias.grad[0] = -float("inf")
        opt.step()
        scope.step()
    df = scope.report().stats
    assert value(df, 1, "2", "weight", "nonfinite_count") == 4
    assert value(df, 1, "2", "bias", "nonfinite_count") == 0
    assert value(df, 1, "4", "*", "nonfinite_count") == 1
    assert value(df, 1, "*", "*", "nonfinite_count") == 5
    assert np.isnan(value(df, 1, "2", "weight", "l2_norm"))
    assert value(df, 1, "0", "*", "nonfinite_count") == 0


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "min", "norm"])
def test_custom_statistic_per_param_and_layer_reduction(reduce):
    name = f"frac_positive_{reduce}"

    @gradscope.register_statistic(name, reduce=reduce)
    def frac_positive(grad, param):
        return (grad > 0).double().mean()

    try:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradscope.watch(model, optimizer=opt, stats=["l2_norm", name], rules="none") as scope:
            seen = _train(model, opt, 2, scope)
        df = scope.report().stats
        for step, (grads, *_rest) in enumerate(seen, start=1):
            w, b = grads["2.weight"], grads["2.bias"]
            fw, fb = float(np.mean(w > 0)), float(np.mean(b > 0))
            assert value(df, step, "2", "weight", name) == pytest.approx(fw)
            expected = {
                "mean": (fw * w.size + fb * b.size) / (w.size + b.size),
                "sum": fw + fb,
                "max": max(fw, fb),
                "min": min(fw, fb),
                "norm": float(np.hypot(fw, fb)),
            }[reduce]
            assert value(df, step, "2", "*", name) == pytest.approx(expected)
    finally:
        STATISTICS.unregister(name)


def test_statistic_subset_collects_only_what_was_asked():
    model = mlp()
    with gradscope.watch(model, stats=["l2_norm", "abs_max"], rules="none", sample_every=1) as scope:
        model(torch.randn(8, 6)).sum().backward()  # (8 samples per unit: a dead fraction is taken)
        scope.step()
    assert set(scope.report().stats.stat) == {"l2_norm", "abs_max", "act_zero_fraction", "act_dead_fraction"}
