"""Checks that need CUDA: no host sync on the hot path, AMP on the GPU, FSDP2 on NCCL.

Every test here is marked ``gpu`` and skips cleanly without CUDA (or, for NCCL, without two GPUs).
"""

from __future__ import annotations

import json
import math

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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 on NCCL needs two GPUs")
def test_fsdp2_on_nccl_matches_single_process(tmp_path):
    import _dist

    out = _dist.run_spawn_cuda(2, tmp_path)
    ref, _ = _dist.reference_run(False)
    for rank in range(2):
        rep = gradscope.Report.from_json(json.loads((out / f"fsdp_cuda-rank{rank}.json").read_text()))
        bad = _dist.compare_stats(rep.stats, ref.stats, rtol=1e-4, atol=1e-6, skip=("act_dead_fraction",))
        assert not bad, "\n".join(bad[:30])


def test_cuda_moments_take_the_multi_tensor_path_and_match_float64():
    """On CUDA the capture uses the fixed-launch multi-tensor path; its moments equal float64 references."""
    from gradscope.capture.kernels import FusedMoments
    from gradscope.stats.moments import MOMENT_INDEX, MOMENTS, MomentPlan

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
