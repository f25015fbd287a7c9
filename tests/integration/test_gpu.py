"""Checks that need CUDA: no host sync on the hot path, AMP on the GPU, FSDP2 on NCCL.

Every test here is marked ``gpu`` and skips cleanly without CUDA (or, for NCCL, without two GPUs).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(), nn.LayerNorm(256), nn.Linear(256, 8)
    ).cuda()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(128, 64, generator=g).cuda(), torch.randn(128, 8, generator=g).cuda()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_hot_path_never_syncs(optimizer):
    """Forward, backward, optimizer step and scope.step() under set_sync_debug_mode("error").

    Sampled steps (activation hooks, weight and update moments) included; only the flush, a deliberate
    sync point, runs outside.
    """
    model = make_model()
    opt = (
        torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=1e-3)
    )
    batches = [data(s) for s in range(1, 31)]  # made before: host-to-device copies of pageable memory
    scope = gradscope.watch(model, optimizer=opt, flush_every=100, sample_every=3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = (model(x).float() - y).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)  # a CUDA tensor: stays on the device
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report = scope.close()
    assert report.steps == 30 and len(set(report.stats["step"])) == 30
    assert not report.errors, report.errors
    assert (report.scalars["loss"] > 0).all()


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused-adam"])
def test_fp16_grad_scaler_statistics_are_unscaled_on_cuda(fused):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    seen: dict[int, float] = {}
    step_no = [0]

    def reference(o, args, kwargs):
        scale = getattr(o, "grad_scale", None)
        s = 1.0 if scale is None else float(scale)
        g = torch.cat([p.grad.detach().double().reshape(-1) for p in model.parameters()]) / s
        seen[step_no[0]] = float(g.norm())

    with gradscope.watch(model, optimizer=opt, sample_every=1) as scope:
        opt.register_step_pre_hook(reference)
        for step in range(1, 7):
            step_no[0] = step
            x, y = data(step)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = (model(x).float() - y).pow(2).mean()
            scaler.scale(loss).backward()
            if step == 4:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            scope.step(loss=loss)
            opt.zero_grad(set_to_none=True)
    report = scope.report()
    assert report.skipped_steps == [4]
    got = report.stats.query("layer == '*' and stat == 'l2_norm'").set_index("step")["value"]
    assert sorted(got.index) == [1, 2, 3, 5, 6]
    for step, value in got.items():
        assert math.isclose(value, seen[step], rel_tol=1e-5), (step, value, seen[step])


def test_compiled_model_on_cuda_matches_eager():
    def run(compiled: bool) -> gradscope.Report:
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        target = torch.compile(model) if compiled else model
        with gradscope.watch(target, optimizer=opt, activations=False) as scope:
            for step in range(1, 5):
                x, y = data(step)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = (target(x).float() - y).pow(2).mean()
                loss.backward()
                opt.step()
                scope.step(loss=loss)
                opt.zero_grad(set_to_none=True)
        return scope.report()

    eager, compiled = run(False), run(True)
    key = ["step", "layer", "param", "stat"]
    a = eager.stats.set_index(key)["value"]
    b = compiled.stats.set_index(key)["value"].reindex(a.index)
    assert b.notna().sum() == a.notna().sum()
    # bf16 autocast: inductor's fused kernels round differently from eager ones. Magnitudes agree to a
    # few percent; a mean (a sum that cancels) to a few percent of the RMS of the same gradient.
    stat = a.index.get_level_values("stat")
    rms = eager.stats.query("stat == 'rms'").set_index(["step", "layer", "param"])["value"]
    scale = a.abs().clip(lower=1e-6)
    means = stat == "mean"
    scale[means] = rms.reindex(a.index.droplevel("stat")[means]).to_numpy()
    err = (a - b).abs() / scale
    err[stat == "zero_fraction"] = (a - b).abs()[stat == "zero_fraction"] * 5  # at most 0.01 apart
    assert (a[stat == "nonfinite_count"] == b[stat == "nonfinite_count"]).all()
    worst = err.sort_values(ascending=False).head(5)
    assert worst.iloc[0] < 5e-2, "\n".join(f"{k}: eager {a[k]:.4g} compiled {b[k]:.4g}" for k in worst.index)


def test_a_compiled_conv_net_with_batch_norm_never_syncs_after_compiling():
    """The hot path of a compiled CNN (convolutions, batch norm, SGD with momentum, bf16 autocast).

    Inductor may lay the convolutions out channels-last on a GPU, so the gradients it returns need
    not be contiguous; the watched steps after compilation (a sampled one included) must still run
    under set_sync_debug_mode("error"), and record what the eager model records.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).cuda()  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (16,), generator=g).cuda())]
    scope = gradscope.watch(compiled, optimizer=opt, flush_every=100, sample_every=5)

    def step() -> None:
        x, y = batches[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad(set_to_none=True)

    for _ in range(4):  # compilation, and any recompile of the first steps
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):  # steps 5-12: 6 and 11 are sampled
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report = scope.close()
    assert report.steps == 12 and not report.errors, report.errors
    norms = report.stats.query("stat == 'l2_norm' and param == '*' and layer == '*'")
    assert len(norms) == 12 and np.isfinite(norms["value"]).all() and (norms["value"] > 0).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 on NCCL needs two GPUs")
def test_fsdp2_on_nccl_matches_single_process(tmp_path):
    import _dist

    out = _dist.run_spawn_cuda(2, tmp_path)
    ref, _ = _dist.reference_run(False)
    for rank in range(2):
        rep = gradscope.Report.from_json(json.loads((out / f"fsdp_cuda-rank{rank}.json").read_text()))
        bad = _dist.compare_stats(rep.stats, ref.stats, rtol=1e-4, atol=1e-6, skip=("act_dead_fraction",))
        assert not bad, "\n".join(bad[:30])


def test_cuda_moments_take_the_multi_tensor_path_and_match_float64(monkeypatch):
    """On CUDA the capture uses the fixed-launch multi-tensor path; its moments equal float64 references."""
    from gradscope.capture.kernels import FusedMoments
    from gradscope.capture.triton_moments import TRITON_ENV
    from gradscope.stats.moments import MOMENT_INDEX, MOMENTS, MomentPlan

    monkeypatch.setenv(TRITON_ENV, "off")  # the sampled steps' Triton kernel: the next tests

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in [(64, 33), (7,), (1,), (3, 4, 5)]]
    grads[0][1, 2] = float("nan")
    grads[1].zero_()
    fused = FusedMoments(MomentPlan(MOMENTS))
    fused.nonfinite_seen = True  # as after a flush saw NaN/Inf: sampled steps count exactly
    block = fused([x.cuda() for x in grads], [x.cuda() for x in grads], sampled=True).cpu().numpy()
    assert fused.last_path == "foreach"
    for i, x in enumerate(grads):
        d = x.double()
        fin = torch.isfinite(d)
        assert block[i, MOMENT_INDEX["nonfinite"]] == float((~fin).sum())
        # a NaN entry counts as zero on this path (sign(NaN) is 0)
        assert block[i, MOMENT_INDEX["nnz"]] == float(torch.count_nonzero(torch.nan_to_num(d, nan=0.0)))
        if bool(fin.all()):
            assert block[i, MOMENT_INDEX["sumsq"]] == pytest.approx(float((d * d).sum()), rel=1e-5)
            assert block[i, MOMENT_INDEX["sum"]] == pytest.approx(
                float(d.sum()), abs=1e-5 * float(d.abs().sum()) + 1e-7
            )
            assert block[i, MOMENT_INDEX["min"]] == pytest.approx(float(d.min()))
            assert block[i, MOMENT_INDEX["max"]] == pytest.approx(float(d.max()))
        else:
            assert not math.isfinite(block[i, MOMENT_INDEX["sumsq"]])
    # an ordinary step: the sum of squares, and a non-finite flag (1 for any number of NaN/Inf) from it
    core = fused([x.cuda() for x in grads], [x.cuda() for x in grads], sampled=False).cpu().numpy()
    assert core[:, MOMENT_INDEX["nonfinite"]].tolist() == [float(not bool(torch.isfinite(x).all())) for x in grads]


def _triton_ready(xs: list[torch.Tensor]) -> torch.Tensor:
    """The Triton kernel's block for ``xs``, once its self-check (launched at the first call) has completed."""
    from gradscope.capture import triton_moments as tm

    for _ in range(50):
        block = tm.triton_moments(xs)
        if block is not None:
            return block
        torch.cuda.synchronize()  # the self-check's event completes
    raise AssertionError(f"the Triton kernel never became ready: {tm.triton_state(xs[0].device, xs[0].dtype)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_triton_kernel_on_cuda_matches_float64(dtype):
    """Sampled steps on CUDA read each gradient once (gradscope.capture.triton_moments): against float64."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in [(1000, 33), (7,), (1,), (3, 4, 5), (0,), (50_000,)]]
    grads[0][1, 2] = float("nan")
    grads[5][7] = float("inf")
    grads[1].zero_()
    xs = [x.to(dtype).cuda() for x in grads]
    block = _triton_ready(xs).cpu()
    for i, x in enumerate(xs):
        d = x.double().cpu()  # the values the kernel read (bf16 rounding included)
        fin = torch.isfinite(d)
        assert block[i, 4] == float(torch.count_nonzero(d)), i  # NaN is not zero
        assert block[i, 5] == float((~fin).sum()), i
        if not d.numel():
            assert block[i].tolist() == [0.0] * 6
        elif bool(fin.all()):
            assert block[i, 0] == pytest.approx(float(d.sum()), abs=1e-5 * float(d.abs().sum()) + 1e-7)
            assert block[i, 1] == pytest.approx(float((d * d).sum()), rel=1e-5)
            assert block[i, 2] == float(d.min()) and block[i, 3] == float(d.max())
        elif bool(d.isnan().any()):
            assert block[i, :4].isnan().all()
        else:
            assert block[i, 3] == float("inf")


def test_a_watched_run_takes_the_triton_kernel_on_sampled_steps_without_a_sync(monkeypatch):
    """Its self-check included: launched at step 1, read once done; no host sync at any step."""
    pytest.importorskip("triton")
    from gradscope.capture import triton_moments as tm

    def run(triton: str):
        monkeypatch.setenv(tm.TRITON_ENV, triton)
        monkeypatch.setattr(tm, "_checked", {})
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = [data(s) for s in range(1, 31)]
        scope = gradscope.watch(model, optimizer=opt, flush_every=100, sample_every=3, rules="none")
        paths = []
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x, y in batches:
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                opt.step()
                scope.step(loss=loss)
                paths.append(scope._recorder.moments.last_path)
                opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        report = scope.close()
        assert not report.errors, report.errors
        return report.stats, paths

    with_triton, paths = run("auto")
    assert "triton" in paths[3:], paths  # the check, launched at step 1, was read by step 4 or later
    # the weights' snapshot and update (param_norm, update_ratio) went through the pair kernel too
    assert tm.triton_state(torch.device("cuda", torch.cuda.current_device()), torch.float32, kind="pair") == "ready"
    assert all(p == "foreach" for i, p in enumerate(paths) if i % 3), paths  # ordinary steps: one pass already
    without, _ = run("off")
    assert len(with_triton) == len(without)
    # the same statistics; a mean is a cancelling sum, held to the gradient's RMS instead
    stat = without["stat"].to_numpy()
    a, b = with_triton["value"].to_numpy(), without["value"].to_numpy()
    plain = np.isfinite(b) & (stat != "mean")
    np.testing.assert_allclose(a[plain], b[plain], rtol=1e-4, atol=1e-9)
    keys = ["step", "layer", "param"]
    rms = without[without["stat"] == "rms"][[*keys, "value"]].rename(columns={"value": "rms"})
    means = without[without["stat"] == "mean"][[*keys, "value"]].merge(
        with_triton[with_triton["stat"] == "mean"][[*keys, "value"]], on=keys, suffixes=("_off", "_on")
    )
    means = means.merge(rms, on=keys).dropna()
    assert len(means) > 0
    assert ((means["value_on"] - means["value_off"]).abs() <= 1e-4 * means["rms"] + 1e-9).all()


def test_the_triton_pair_kernel_on_cuda_copies_and_matches_float64():
    """The weights' side of a sampled step on CUDA: the snapshot copy, its sums of squares, the update's."""
    pytest.importorskip("triton")
    from gradscope.capture import triton_moments as tm

    g = torch.Generator().manual_seed(1)
    shapes = [(1000, 33), (7,), (0,), (50_000,)]
    a = [torch.randn(s, generator=g).cuda() for s in shapes]
    b = [torch.randn(s, generator=g).cuda() for s in shapes]
    diff = None
    for _ in range(50):  # the self-check, launched at the first call, completes
        diff = tm.triton_pair_sumsq(a, b, copy=False)
        if diff is not None:
            break
        torch.cuda.synchronize()
    assert diff is not None, tm.triton_state(a[0].device, a[0].dtype, kind="pair")
    want = [float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b)]
    np.testing.assert_allclose(diff.cpu().numpy(), want, rtol=1e-5)
    copied = tm.triton_pair_sumsq(a, b, copy=True)
    np.testing.assert_allclose(copied.cpu().numpy(), [float((x.double() ** 2).sum()) for x in a], rtol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class _Experts(nn.Module):
    """A router sending each sample to one of 8 experts: which experts get a gradient changes at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(64, 8)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)) for _ in range(8))

    def forward(self, x: torch.Tensor, pick: list[int]) -> torch.Tensor:
        # the routing is given (a router's own argmax and unique() would sync: that is the model's, not ours)
        out = self.gate(x)[:, :8]
        for e in pick:
            out = out + self.experts[e](x)
        return out


def test_a_mixture_of_experts_never_syncs():
    """Other tensors have a gradient at every step (the experts picked): their rows are written by index,
    the index tensors copied from pinned memory, without a sync, sampled steps included."""
    torch.manual_seed(0)
    model = _Experts().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [data(s) for s in range(1, 31)]
    picks = [[s % 8, (3 * s + 1) % 8] for s in range(1, 31)]
    scope = gradscope.watch(model, optimizer=opt, flush_every=100, sample_every=3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for (x, y), pick in zip(batches, picks):
            loss = (model(x, pick) - y).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report = scope.close()
    assert report.steps == 30 and not report.errors, report.errors
    has = scope.frame.has_grad
    assert (~has.all(axis=1)).all()  # every step left experts out
