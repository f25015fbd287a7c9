"""The fused moment paths (multi-tensor operators, the compiled CPU kernel) against float64 references,
and the capture's isolation of what it cannot measure the usual way (sparse, complex, failing custom
statistics), and ``StepRecorder.attach_optimizer``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.capture import kernels
from gradscope.capture.kernels import FusedMoments
from gradscope.stats.moments import GRAD_MOMENTS, MOMENT_INDEX, MOMENTS, MomentPlan

from .helpers import assert_all_close, np_stats, value

_GRAD = len(GRAD_MOMENTS)


def _grads(dtype: torch.dtype, nonfinite: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 4, 5), (7,), (1,), (33, 64), (2, 2, 2, 2)]
    grads = [
        (torch.randn(s, generator=g, dtype=torch.float64) * 10.0 ** (i - 2)).to(dtype) for i, s in enumerate(shapes)
    ]
    grads[1].zero_()
    grads[3][:, :5] = 0.0
    if nonfinite:
        grads[0][0, 0, :2] = float("nan")
        grads[3][4, 7] = float("inf")
        grads[4][0, 0, 0, 0] = -float("inf")
    return grads


def _reference(g: torch.Tensor) -> list[float]:
    """The six gradient moments of one tensor in float64 NumPy."""
    x = g.double().numpy().ravel()
    with np.errstate(all="ignore"):
        return [
            float(x.sum()),
            float((x * x).sum()),
            float(np.min(x)),  # NaN when a NaN is present, as torch.aminmax
            float(np.max(x)),
            float(np.count_nonzero(x)),
            float((~np.isfinite(x)).sum()),
        ]


def _check(
    block: torch.Tensor, grads: list[torch.Tensor], rtol: float, moments=GRAD_MOMENTS, foreach: bool = False
) -> None:
    got = block.double().numpy()
    pairs = []
    for i, g in enumerate(grads):
        ref = _reference(g)
        for m in moments:
            j = MOMENT_INDEX[m]
            exp = ref[j]
            if foreach and m == "nnz":  # the accelerator path counts a NaN entry as zero (sign(NaN) is 0)
                exp = float(np.count_nonzero(np.nan_to_num(g.double().numpy(), nan=0.0)))
            if m in ("sum", "sumsq") and not np.isfinite(exp):
                # a NaN or Inf entry makes the sums non-finite; which one depends on the order of the adds
                assert not np.isfinite(got[i, j]), (i, m, got[i, j])
                continue
            # float32 sums: rounding of the order of eps * sum(|g|) (the accelerator path's signed sum is
            # 2 sum(max(g, 0)) - sum(|g|), which has exactly that error)
            scale = float(np.abs(g.double().numpy()).sum()) if m == "sum" else abs(exp)
            tol = max(rtol, 1e-6) * max(1.0, scale) if np.isfinite(scale) else 0.0  # infinities: exactly
            pairs.append((f"grad {i} {m}", got[i, j], exp, tol))
    assert_all_close(pairs, rtol=rtol)


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan-and-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_the_accelerator_path_on_cpu_tensors_matches_float64_references(dtype, nonfinite):
    grads = _grads(dtype, nonfinite)
    fused = FusedMoments(MomentPlan(MOMENTS), path="foreach")
    fused.nonfinite_seen = True  # as after a flush saw NaN/Inf: sampled steps count exactly
    block = fused(grads, grads, sampled=True)
    assert fused.last_path == "foreach" and block.shape == (len(grads), len(MOMENTS)) and block.dtype == torch.float64
    _check(block, grads, rtol={torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype], foreach=True)
    assert torch.isnan(block[:, _GRAD:]).all()  # the weight columns are filled by the recorder
    core = fused(grads, grads, sampled=False)  # an ordinary step: the sum of squares and a non-finite flag
    _check(core, grads, rtol=1e-5, moments=("sumsq",))
    flags = [1.0 if not torch.isfinite(g).all() else 0.0 for g in grads]  # 1 for any number of NaN/Inf
    assert core[:, MOMENT_INDEX["nonfinite"]].tolist() == flags
    others = [MOMENT_INDEX[m] for m in ("sum", "min", "max", "nnz")]
    assert torch.isnan(core[:, others]).all()
    fused.nonfinite_seen = False  # before any: the flag on sampled steps too, the other moments unchanged
    first = fused(grads, grads, sampled=True)
    assert first[:, MOMENT_INDEX["nonfinite"]].tolist() == flags
    assert torch.equal(first[:, MOMENT_INDEX["nnz"]], block[:, MOMENT_INDEX["nnz"]])


def test_the_multi_tensor_path_counts_non_finite_entries_exactly_once_a_flush_has_seen_one():
    """On the multi-tensor path a NaN is a flag (1 per tensor) until a flush has seen one; then sampled
    steps count exactly. Checked against the NaN entries planted, through a watched run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    scope = gradscope.watch(model, activations=False, rules="none", flush_every=4, sample_every=2)
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path="foreach")
    x = torch.randn(8, 6)
    with scope:
        for step in range(1, 10):
            model(x).square().mean().backward()
            if step in (3, 7):  # steps 3 (before any flush saw one) and 7 (after the flush at step 4)
                model[0].weight.grad[0, :3] = float("nan")
            scope.step()
            model.zero_grad(set_to_none=True)
    assert scope._recorder.moments.last_path == "foreach"
    counts = scope.report().stats.query("stat == 'nonfinite_count' and layer == '0' and param == 'weight'")
    got = counts.set_index("step")["value"].to_dict()
    # step 3: sampled, but nothing seen yet -> the flag; step 7: sampled and seen -> 3 entries, exactly
    assert got == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0, 7: 3, 8: 0, 9: 0}


def nan_at_step_2(path: str, *, steps: int = 3, sample_every: int = 10):
    """``(scope, the nonfinite_gradients finding)`` of a run with three NaN entries planted at step 2 (ordinary)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=opt, flush_every=4, sample_every=sample_every)
    if path != "auto":
        scope._recorder.moments = FusedMoments(scope._recorder.plan, path=path)
    x = torch.randn(8, 6)
    with warnings.catch_warnings(), scope:
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            model(x).square().mean().backward()
            if step == 2:
                model[0].weight.grad[0, :3] = float("nan")
            opt.step()
            scope.step()
            opt.zero_grad(set_to_none=True)
    (found,) = [f for f in scope.report().findings if f.evidence.get("stat") == "nonfinite_count"]
    assert found.step == 2 and found.layer == "0"
    return scope, found


@pytest.mark.parametrize("path", ["auto", "foreach"])
def test_the_non_finite_finding_gives_a_count_only_where_entries_were_counted(path):
    _, found = nan_at_step_2(path)
    if path == "auto":  # the CPU kernel counts entries
        assert found.evidence["counted"] and found.evidence["counts"] == {"0": 3} and "(3 values)" in found.message
    else:  # the multi-tensor path flags the tensor: no count is claimed
        assert not found.evidence["counted"] and found.evidence["counts"] == {"0": 1} and "values)" not in found.message


def test_the_accelerator_path_groups_dtypes_and_sends_what_it_cannot_take_to_the_eager_path():
    fused = FusedMoments(MomentPlan(MOMENTS), path="foreach")
    mixed = [torch.randn(3), torch.randn(4, dtype=torch.float64), torch.randn(2, 5)]
    block = fused(mixed, mixed, sampled=True)
    assert fused.last_path == "foreach"  # one group per dtype, each row where it belongs
    _check(block, mixed, rtol=1e-6, foreach=True)
    # a sparse gradient has no multi-tensor kernel: its group goes to the eager path, measured all the same
    sparse = [torch.randn(3), torch.randn(4).to_sparse()]
    block = fused(sparse, sparse, sampled=True)
    assert fused.last_path == "eager"
    _check(block[:1], sparse[:1], rtol=1e-6)
    assert block[1, MOMENT_INDEX["sumsq"]].item() == pytest.approx(float((sparse[1].to_dense().double() ** 2).sum()))


@pytest.mark.slow
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan-and-inf"])
def test_the_compiled_cpu_kernel_reads_every_moment_in_one_pass_and_matches_float64(cpu_kernel, nonfinite):
    # (half precision: summed in float32, as the eager path does; the reference reads the same values)
    for dtype, rtol in ((torch.bfloat16, 1e-5), (torch.float16, 1e-5), (torch.float32, 1e-5), (torch.float64, 1e-12)):
        grads = _grads(dtype, nonfinite)
        contiguous = [g.contiguous() for g in grads]
        fused = FusedMoments(MomentPlan(MOMENTS), path="kernel")
        block = fused(contiguous, contiguous, sampled=True)
        assert fused.last_path == "kernel"
        _check(block, contiguous, rtol=rtol)
        core = fused(contiguous, contiguous, sampled=False)
        _check(core, contiguous, rtol=rtol, moments=("sumsq", "nonfinite"))
        assert torch.isnan(core[:, [MOMENT_INDEX[m] for m in ("sum", "min", "max", "nnz")]]).all()
    # what it cannot read (views with gaps between their entries) goes to the eager path, measured all the same
    odd = [torch.randn(6, 10)[:, ::2], torch.randn(8)[::2]]
    block = fused(odd, odd, sampled=True)
    assert fused.last_path == "eager"
    _check(block, odd, rtol=1e-5)
    # among tensors it reads, those alone go the eager way (rows in the caller's order)
    mixed = [contiguous[0], odd[0], contiguous[3].t(), odd[1], contiguous[4]]
    sizes = []
    eager = fused.plan.grad_moments
    fused.plan.grad_moments = lambda grads, *a, **k: sizes.append(len(grads)) or eager(grads, *a, **k)
    block = fused(mixed, mixed, sampled=True)
    assert sizes == [2] and fused.last_path == "eager"
    _check(block, mixed, rtol=1e-5)
    # the next step starts with the split (no failing call first), until every gradient is readable again
    view = torch.full((len(mixed), len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
    assert not fused.write(mixed, mixed, view, [], sampled=True) and torch.isnan(view).all()
    dense = [contiguous[0], contiguous[3].t()]
    block = fused(dense, dense, sampled=True)
    assert fused.last_path == "kernel" and sizes == [2]
    _check(block, dense, rtol=1e-5)
    view = torch.full((2, len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
    assert fused.write(dense, dense, view, [], sampled=True)
    # 3M entries: float64 accumulation over blocks keeps the sums exact to ~1e-10
    big = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0))
    row = kernels.grad_moments([big])[0].numpy()
    x = big.double().numpy()
    assert row[1] == pytest.approx(float((x * x).sum()), rel=1e-8)
    assert row[0] == pytest.approx(float(x.sum()), abs=1e-9 * float(np.abs(x).sum()))


def watched_run(path: str, *, sample_every: int = 1, steps: int = 3, frozen: bool = False):
    """``(report.stats, the moment path of each step)`` of a small watched run on moment path ``path``.

    ``frozen``: the first layer is frozen (fine-tuning the head only): its rows have no gradient.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    if frozen:
        model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scope = gradscope.watch(model, optimizer=opt, sample_every=sample_every, rules="none")
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path=path)
    x = torch.randn(8, 5)
    paths = []
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        scope.step()
        paths.append(scope._recorder.moments.last_path)
        opt.zero_grad()
    return scope.close().stats, paths


def test_the_multi_tensor_path_sends_what_it_cannot_take_to_the_eager_path_alone():
    g = torch.Generator().manual_seed(4)
    sparse = torch.sparse_coo_tensor(
        torch.tensor([[0, 2, 2]]), torch.tensor([1.0, -2.0, 0.5]), (6,), check_invariants=True
    )
    grads = [torch.randn(5, 3, generator=g), torch.zeros(0), sparse, torch.randn(7, generator=g)]
    fused = FusedMoments(MomentPlan(MOMENTS), path="foreach")
    sizes = []
    eager = fused.plan.grad_moments
    fused.plan.grad_moments = lambda gs, *a, **k: sizes.append(len(gs)) or eager(gs, *a, **k)
    block = fused(grads, grads, sampled=True)
    assert sizes == [2] and fused.last_path == "eager"  # the empty and the sparse gradient, together
    want = eager(grads, grads, sampled=True)
    np.testing.assert_allclose(block.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)  # (NaN where not taken)


def test_a_watched_run_on_the_multi_tensor_path_equals_the_eager_run():
    """Ordinary steps write the sum of squares and the flag into the row's columns directly; sampled steps
    build the whole block. Both record what the eager path records."""
    for frozen in (False, True):
        (a, paths) = watched_run("foreach", sample_every=3, steps=7, frozen=frozen)
        (b, _) = watched_run("eager", sample_every=3, steps=7, frozen=frozen)
        assert paths == ["foreach"] * 7
        assert a[["step", "layer", "param", "stat"]].equals(b[["step", "layer", "param", "stat"]])
        # (a mean is a float32 sum that cancels: 2 sum(max(g, 0)) - sum(|g|) on this path, ~1e-7 of sum(|g|))
        np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-5, atol=1e-8)
        first = a[(a["stat"] == "l2_norm") & (a["layer"] == "0")]["value"].dropna()
        assert (len(first) == 0) == frozen  # a frozen layer has no gradient statistics


@pytest.mark.slow
def test_a_watched_run_on_the_compiled_kernel_equals_the_eager_run(cpu_kernel):
    (a, paths), (b, _) = watched_run("kernel"), watched_run("eager")
    assert paths == ["kernel"] * 3
    cols = [c for c in a.columns if c in b.columns and a[c].dtype.kind == "f"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-5, atol=1e-9)


def _four_steps(make_model, x: torch.Tensor, path: str, *, check=None):
    """``(report.stats, the moment path of each step)`` of 4 SGD steps (momentum, every other step sampled)."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scope = gradscope.watch(model, optimizer=opt, sample_every=2, rules="none")
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path=path)
    paths = []
    for _ in range(4):
        model(x).float().square().mean().backward()
        if check is not None:
            check(model)
        opt.step()
        scope.step()
        paths.append(scope._recorder.moments.last_path)
        opt.zero_grad()
    return scope.close().stats, paths


def _kernel_equals_eager(make_model, x: torch.Tensor, *, check=None) -> None:
    (a, paths), (b, _) = _four_steps(make_model, x, "auto", check=check), _four_steps(make_model, x, "eager")
    assert paths == ["kernel"] * 4
    assert a[["step", "layer", "param", "stat"]].equals(b[["step", "layer", "param", "stat"]])
    assert {"update_ratio", "param_norm"} <= set(a["stat"])
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_a_bfloat16_model_on_the_cpu_takes_the_kernel_and_records_what_the_eager_path_records(cpu_kernel, monkeypatch):
    # the weight snapshot and the update norm of the sampled steps too: the operator path copies the
    # weights (_foreach_copy_) and subtracts (_foreach_sub_); the pair kernels do neither
    ops: list[str] = []
    for name in ("_foreach_copy_", "_foreach_sub_"):
        op = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _op=op, _name=name, **k: ops.append(_name) or _op(*a, **k))
    _kernel_equals_eager(
        lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(torch.bfloat16),
        torch.randn(8, 6).to(torch.bfloat16),
    )
    # the eager run (the reference) took the operator path at its 2 sampled steps; the kernel run never did
    assert ops == ["_foreach_copy_", "_foreach_sub_"] * 2


@pytest.mark.slow
def test_a_channels_last_cnn_takes_the_kernel_and_records_what_the_eager_path_records(cpu_kernel):
    """Channels-last convolutions (as CPU training recommends) give gradients that are dense but not
    contiguous: the kernel reads them in memory order, the weight snapshot of the update ratio too."""

    def check(model: nn.Module) -> None:
        assert not model[2].weight.grad.is_contiguous()

    def cnn() -> nn.Module:
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).to(memory_format=torch.channels_last)

    _kernel_equals_eager(cnn, torch.randn(5, 3, 6, 6).to(memory_format=torch.channels_last), check=check)


@pytest.mark.slow
def test_the_kernel_reads_the_gradients_of_the_parameters_itself_or_declines_without_writing(cpu_kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 2))
    model(torch.randn(8, 5)).square().mean().backward()
    params = list(model.parameters())
    fused = FusedMoments(MomentPlan(MOMENTS), path="kernel")
    for sampled in (True, False):
        view = torch.full((len(params), len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
        assert fused.write_params(params, view, sampled=sampled)
        grads = [p.grad for p in params]
        moments = GRAD_MOMENTS if sampled else ("sumsq", "nonfinite")
        _check(view, grads, rtol=1e-5, moments=moments)
        assert fused.last_finite is True
    # one NaN or one Inf in any gradient: the kernel says so (what the locator's weight copy waits for)
    for bad, where in ((float("nan"), 0), (float("inf"), 3), (-float("inf"), len(params) - 1)):
        for sampled in (True, False):
            grad = params[where].grad
            keep = grad.view(-1)[1].item()
            grad.view(-1)[1] = bad
            view = torch.full((len(params), len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
            assert fused.write_params(params, view, sampled=sampled)
            assert fused.last_finite is False, (bad, where, sampled)
            assert view[where, MOMENT_INDEX["nonfinite"]].item() == 1.0
            grad.view(-1)[1] = keep
            assert (
                fused.write([p.grad for p in params], params, view, [], sampled=sampled) and fused.last_finite is True
            )
    # a transposed gradient (dense, its entries in another order) is read where it lies
    model.zero_grad(set_to_none=False)
    model(torch.randn(8, 5)).square().mean().backward()
    params[-2].grad = params[-2].grad.t().contiguous().t()
    assert not params[-2].grad.is_contiguous()
    view = torch.full((len(params), len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
    assert fused.write_params(params, view, sampled=True)
    _check(view, [p.grad for p in params], rtol=1e-5)
    params[-2].grad = None  # (a backward would warn of a gradient laid out unlike its parameter)
    # a parameter without a gradient, a frozen one: the others read in the same call, their rows named
    # (and the frozen ones); a gradient with gaps: nothing written, False
    for spoil in ("none", "frozen", "strided"):
        model.zero_grad(set_to_none=False)
        model(torch.randn(8, 5)).square().mean().backward()
        last = params[-2]
        if spoil == "none":
            last.grad = None
        elif spoil == "frozen":
            last.requires_grad_(False)
        else:
            last.grad = torch.randn(last.shape[0], 2 * last.shape[1])[:, ::2]
        view = torch.full((len(params), len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
        if spoil == "strided":
            assert not fused.write_params(params, view, sampled=True), spoil
            assert torch.isnan(view).all(), spoil
            continue
        assert fused.write_params(params, view, sampled=True), spoil
        others = [*range(len(params) - 2), len(params) - 1]
        assert fused.last_present == others, spoil
        assert fused.last_frozen == ([len(params) - 2] if spoil == "frozen" else []), spoil
        assert torch.isnan(view[len(params) - 2]).all(), spoil  # the row of the one without a gradient: untouched
        _check(view[others], [params[i].grad for i in others], rtol=1e-5)
        # every gradient back: the whole list, last_present None again
        last.requires_grad_(True)
        model.zero_grad(set_to_none=False)
        model(torch.randn(8, 5)).square().mean().backward()
        view = torch.full((len(params), len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
        assert fused.write_params(params, view, sampled=False) and fused.last_present is None, spoil
        _check(view, [p.grad for p in params], rtol=1e-5, moments=("sumsq", "nonfinite"))


@pytest.mark.slow
def test_the_weight_snapshot_and_the_update_norm_take_one_pass_each_and_match_float64(cpu_kernel):
    g = torch.Generator().manual_seed(0)
    fused = FusedMoments(MomentPlan(MOMENTS), path="kernel")
    # half precision is summed in float32, as the moments of its gradients are
    for dtype, rtol in ((torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)):
        src = [torch.randn(shape, generator=g).to(dtype) for shape in ((7, 5), (5,), (3000,))]
        dst = [torch.zeros_like(t) for t in src]
        view = torch.full((3, 4), float("nan"), dtype=torch.float64)
        assert fused.copy_sumsq(src, dst, view, 2)
        assert all(torch.equal(a, b) for a, b in zip(src, dst))  # an exact copy
        ref = [float((t.double() ** 2).sum()) for t in src]
        np.testing.assert_allclose(view[:, 2].numpy(), ref, rtol=rtol)
        assert torch.isnan(view[:, [0, 1, 3]]).all()  # nothing else written
        after = [t + 0.01 * torch.randn(t.shape, generator=g).to(dtype) for t in src]
        assert fused.diff_sumsq(dst, after, view, [2, 0, 1], 3)  # rows in another order
        # the reference: the difference rounded in the tensors' dtype (as torch subtracts), summed in float64
        ref = [float(((b - a).double() ** 2).sum()) for b, a in zip(dst, after)]
        np.testing.assert_allclose(view[[2, 0, 1], 3].numpy(), ref, rtol=rtol)
        assert all(torch.equal(a, b) for a, b in zip(src, dst))  # the snapshot is left as it was
    # a channels-last weight and its snapshot (empty_like keeps its strides): entry i is entry i
    w = torch.randn(6, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)
    snap = torch.empty_like(w)
    view = torch.full((1, 2), float("nan"), dtype=torch.float64)
    assert fused.copy_sumsq([w], [snap], view, 0) and torch.equal(snap, w)
    after = w + 0.01 * torch.randn(w.shape, generator=g)
    assert fused.diff_sumsq([snap], [after], view, [], 1)
    ref = [float((w.double() ** 2).sum()), float(((after - snap).double() ** 2).sum())]
    np.testing.assert_allclose(view[0].numpy(), ref, rtol=1e-6)
    # what it cannot read (entries laid out differently in a pair, mismatched sizes, a view with gaps,
    # two dtypes in a pair, integers, complex numbers): False, nothing written
    view = torch.full((1, 2), float("nan"), dtype=torch.float64)
    t = torch.randn(4, 3)
    for a, b in (
        (t.t(), torch.zeros(3, 4)),
        (t, torch.zeros(5)),
        (torch.randn(4, 6)[:, ::2], torch.zeros(4, 3)),
        (t.bfloat16(), torch.zeros(4, 3)),
        (t.int(), torch.zeros(4, 3).int()),
        (t.cfloat(), torch.zeros(4, 3).cfloat()),
    ):
        assert not fused.copy_sumsq([a], [b], view, 0)
        assert not fused.diff_sumsq([a], [b], view, [], 1)
    assert torch.isnan(view).all()


# -- what the usual path cannot measure --------------------------------------------------------------
def test_a_sparse_gradient_is_measured_over_its_values_and_the_other_layers_stay_exact():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 4, sparse=True)
    head = nn.Linear(4, 3)
    model = nn.Sequential(emb, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=opt, sample_every=1, rules="none", activations=False)
    # the kernel (when built) reads the embedding's coalesced values and the dense gradients: no eager pass
    plan, eager_sizes = scope._recorder.plan, []
    eager = plan.grad_moments
    plan.grad_moments = lambda grads, *a, **k: eager_sizes.append(len(grads)) or eager(grads, *a, **k)
    idx = torch.tensor([[1, 2, 2, 7]])
    model(idx).square().mean().backward()
    dense = emb.weight.grad.to_dense().double().numpy()
    head_g = head.weight.grad.double().numpy()
    opt.step()
    scope.step()
    stats = scope.close().stats
    assert eager_sizes == ([] if kernels.cpu_kernel() is not None else [3]), eager_sizes
    ref_e, ref_h = np_stats(dense), np_stats(head_g)
    pairs = []
    for stat in ("l2_norm", "rms", "mean", "std", "abs_max", "zero_fraction", "nonfinite_count"):
        pairs.append((f"embedding {stat}", value(stats, 1, "0", "weight", stat), ref_e[stat]))
        pairs.append((f"head {stat}", value(stats, 1, "1", "weight", stat), ref_h[stat]))
    assert_all_close(pairs, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_sparse_embedding_is_read_by_the_kernel_at_every_step_and_the_hint_follows_the_gradients(cpu_kernel):
    """Ordinary and sampled steps, gradients of every sign (the min and max of a sparse gradient are
    bounded by its zeros), a step where the embedding gets no gradient (every gradient dense: the
    one call again) and the steps after it: each against NumPy on the dense gradient."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 4, sparse=True)
    head = nn.Linear(4, 3)
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1)
    model = nn.ModuleDict({"emb": emb, "head": head})
    scope = gradscope.watch(model, optimizer=opt, sample_every=2, rules="none", activations=False)
    moments, eager_sizes = scope._recorder.moments, []
    eager = scope._recorder.plan.grad_moments
    scope._recorder.plan.grad_moments = lambda grads, *a, **k: eager_sizes.append(len(grads)) or eager(grads, *a, **k)
    refs, hints = {}, []
    for step in range(1, 8):
        x = torch.randn(6, 4)
        if step == 4:  # the embedding unused: its gradient stays None
            loss = head(x).square().mean()
        else:
            idx = torch.tensor([[1, 2, 2, 7 + step]])
            loss = head(emb(idx) + x[:1]).pow(3).mean()  # (odd powers: gradients of both signs)
        loss.backward()
        if emb.weight.grad is not None:
            refs[step] = np_stats(emb.weight.grad.to_dense().double().numpy())
        opt.step()
        scope.step()
        hints.append(moments._mixed)
        opt.zero_grad()
    stats = scope.close().stats
    assert eager_sizes == []
    # (step 4, the embedding without a gradient, is read in one call, leaving the hint as it was)
    assert hints == [True] * 7
    pairs = []
    for step, ref in refs.items():
        sampled = step % 2 == 1
        for stat in (
            "l2_norm",
            "rms",
            "nonfinite_count",
            *(("mean", "std", "abs_max", "zero_fraction") if sampled else ()),
        ):
            pairs.append((f"step {step} {stat}", value(stats, step, "emb", "weight", stat), ref[stat]))
    # the moments themselves: stored values all positive, so the zeros not stored are the minimum
    sparse = torch.sparse_coo_tensor(
        torch.tensor([[0, 3, 3]]), torch.tensor([2.0, 1.0, 0.5]), (5,), check_invariants=True
    )
    grads = [torch.tensor([-1.0, 4.0]), sparse]
    view = torch.full((3, len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
    assert moments.write(grads, grads, view, [2, 0], sampled=True) and moments._mixed
    want = {"sum": 3.5, "sumsq": 6.25, "min": 0.0, "max": 2.0, "nnz": 2.0, "nonfinite": 0.0}
    assert {m: view[0, MOMENT_INDEX[m]].item() for m in want} == want  # (3 at index 3: 1 + 0.5 coalesced)
    assert view[2, MOMENT_INDEX["min"]].item() == -1.0 and torch.isnan(view[1]).all()
    # with a gradient the kernel cannot read (a view with gaps), write() declines and the split reads
    # the sparse one the same way, the gapped one alone going eager
    gapped = torch.tensor([[3.0, 9.0, -2.0, 9.0]])[:, ::2]
    grads = [grads[0], sparse, gapped]
    view = torch.full((3, len(MOMENT_INDEX)), float("nan"), dtype=torch.float64)
    assert not moments.write(grads, grads, view, [], sampled=True) and torch.isnan(view).all()
    eager_sizes.clear()
    block = moments(grads, grads, sampled=True)
    assert eager_sizes == [1] and moments.last_path == "eager"
    got = {m: block[1, MOMENT_INDEX[m]].item() for m in want}
    assert got == want and block[2, MOMENT_INDEX["min"]].item() == -2.0
    eager_sizes.clear()
    emb_rows = stats[(stats.layer == "emb") & stats.value.notna()]
    assert set(emb_rows.step) == set(refs) and 4 not in refs  # no gradient at step 4: nothing recorded
    assert set(emb_rows[emb_rows.stat == "abs_max"].step) == {1, 3, 5, 7}  # the sampled steps' moments
    assert_all_close(pairs, rtol=1e-5, atol=1e-7)


def test_a_complex_parameter_is_measured_over_its_real_and_imaginary_parts():
    z = torch.complex(torch.tensor([3.0, 0.0, -1.0]), torch.tensor([4.0, 0.0, 2.0]))
    mom = MomentPlan(MOMENTS).grad_moments([z, torch.tensor([1.0, -1.0])], [z, z])[0].numpy()
    parts = np.array([3.0, 4.0, 0.0, 0.0, -1.0, 2.0])
    assert mom[MOMENT_INDEX["sumsq"]] == pytest.approx(25.0 + 5.0)  # sum of |z|^2
    assert mom[MOMENT_INDEX["sum"]] == pytest.approx(parts.sum())
    assert (mom[MOMENT_INDEX["min"]], mom[MOMENT_INDEX["max"]]) == (-1.0, 4.0)
    assert mom[MOMENT_INDEX["nnz"]] == 2.0  # complex entries with a non-zero part
    assert mom[MOMENT_INDEX["nonfinite"]] == 0.0


def test_a_failing_custom_statistic_is_turned_off_alone_with_a_warning_naming_it():
    calls = []

    @gradscope.register_statistic("gs_test_broken")
    def broken_stat(grad, param):
        calls.append(1)
        raise ValueError("boom")

    @gradscope.register_statistic("gs_test_half_sum")
    def half_sum(grad, param):
        return grad.sum() / 2

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scope = gradscope.watch(
            model, optimizer=opt, stats=["l2_norm", "gs_test_broken", "gs_test_half_sum"], rules="none"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = [n.split(".") for n, _ in model.named_parameters()]
            for _ in range(3):
                model(torch.randn(5, 3)).sum().backward()
                ref = [p.grad.double().norm().item() for p in model.parameters()]
                half = [p.grad.double().sum().item() / 2 for p in model.parameters()]
                opt.step()
                scope.step()
                opt.zero_grad()
        stats = scope.close().stats
    finally:
        from gradscope.registry import STATISTICS

        for name in ("gs_test_broken", "gs_test_half_sum"):
            STATISTICS.unregister(name)
    messages = [str(w.message) for w in caught if "gs_test_broken" in str(w.message)]
    assert len(messages) == 1 and "boom" in messages[0]
    assert len(calls) == 1  # turned off after its first failure
    got = [value(stats, 3, layer, param, "l2_norm") for layer, param in names]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    got = [value(stats, 3, layer, param, "gs_test_half_sum") for layer, param in names]
    np.testing.assert_allclose(got, half, rtol=1e-5)
    off = stats[stats.stat == "gs_test_broken"]
    assert len(off) and off.value.isna().all()


# -- following a new optimizer -------------------------------------------------------------------------
def test_attach_optimizer_moves_the_hooks_and_resets_the_weight_snapshots():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    old = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=old, sample_every=1, rules="none", activations=False)
    rec = scope._recorder
    x = torch.randn(5, 3)

    def step(opt):
        model(x).square().mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        ratio = [float((p.detach() - b).norm() / b.norm()) for p, b in zip(model.parameters(), before)]
        assert rec.optimizer_steps == 1  # the recorder saw this optimizer step
        scope.step()
        assert rec.optimizer_steps == 0  # reset by scope.step(): a second scope.step() would see 0
        opt.zero_grad()
        return ratio

    step(old)
    assert rec._prev  # update_ratio keeps the weights of the old optimizer's parameters
    new = torch.optim.Adam(model.parameters(), lr=0.01)
    rec.attach_optimizer(new)
    assert rec.optimizer is new and not rec._prev
    assert not old._optimizer_step_pre_hooks and len(new._optimizer_step_pre_hooks) == 1
    ratio = step(new)
    assert rec.skipped_steps == []  # the new optimizer's step was seen: not a skipped step
    report = scope.close()
    names = [n.split(".") for n, _ in model.named_parameters()]
    got = [value(report.stats, 2, layer, param, "update_ratio") for layer, param in names]
    np.testing.assert_allclose(got, ratio, rtol=1e-4)


class _FrozenTrunk(nn.Module):
    """A frozen first layer, a trainable body, and an auxiliary head left out at step 7 (no gradient there)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 16)
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 1)
        self.trunk.requires_grad_(False)
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.trunk(x))
        out = self.head(h).square().mean()
        return out if self.step == 7 else out + self.aux(h).mean()


def _frozen_run(path: str) -> tuple:
    torch.manual_seed(0)
    model = _FrozenTrunk()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scope = gradscope.watch(model, optimizer=opt, sample_every=2, rules="none")
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path=path)
    x = torch.randn(8, 6)
    by_index = []
    for step in range(1, 11):
        model.step = step
        if step == 5:
            model.trunk.weight.requires_grad_(True)  # unfrozen (its bias stays frozen)
        model(x).backward()
        opt.step()
        scope.step()
        by_index.append(scope._recorder.moments.last_present is not None)
        opt.zero_grad()
    stats = scope.close().stats
    return stats, by_index, (scope.frame.has_grad.copy(), scope.frame.trainable.copy())


@pytest.mark.slow
def test_a_partly_frozen_model_is_read_by_index_in_one_call_and_records_what_the_eager_path_records(cpu_kernel):
    """The gradients of a partly frozen model are read in C++ by index (one call, no Python loop over the
    tensors) at every step: from the first, with a tensor unfrozen (step 5) and with a trainable one
    without a gradient (step 7), the kernel naming the rows it read and the frozen tensors."""
    (a, by_index, (has, trainable)), (b, _, (has_b, trainable_b)) = _frozen_run("auto"), _frozen_run("eager")
    assert by_index == [True] * 10
    assert a[["step", "layer", "param", "stat"]].equals(b[["step", "layer", "param", "stat"]])
    assert {"update_ratio", "param_norm"} <= set(a["stat"])
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(has, has_b)
    np.testing.assert_array_equal(trainable, trainable_b)
    # tensors: trunk.weight, trunk.bias, body.1.weight, body.1.bias, head.weight, head.bias, aux.weight, aux.bias
    assert has[:, :2].tolist() == [[False, False]] * 4 + [[True, False]] * 6
    assert has[6, 6:].tolist() == [False, False] and has[5, 6:].tolist() == [True, True]
    assert trainable[0].tolist() == [False, False, True, True, True, True, True, True]
