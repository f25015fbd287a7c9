"""Mixed precision: autocast (bf16, fp16) with GradScaler, on CPU.

The statistics must be those of the gradients the optimizer uses: unscaled (never multiplied by the
loss scale), clipped when clipping follows ``unscale_``, and a step the scaler skips is recorded as
skipped, not as a gradient explosion. References are the gradients themselves, read in float64 by
our own optimizer pre-hook (registered after gradscope's, so it sees the same tensors), and a plain
float32 run without autocast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope

STEPS = 6
SKIP_AT = 4  # the step where an inf is planted in one gradient


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)


class GradRecorder:
    """Our own optimizer pre-hook: the gradients the optimizer is about to read, in float64.

    For an optimizer that unscales inside its fused step, ``optimizer.grad_scale`` holds the loss
    scale still in the gradients; the reference divides by it (the step must not be judged scaled).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.names = [n for n, _ in model.named_parameters()]
        self.params = list(model.parameters())
        self.steps: dict[int, dict[str, np.ndarray]] = {}
        self.count = 0
        opt.register_step_pre_hook(self)

    def __call__(self, opt, args, kwargs) -> None:
        scale = getattr(opt, "grad_scale", None)
        s = 1.0 if scale is None else float(scale)
        self.steps[self.count + 1] = {n: p.grad.detach().double().numpy() / s for n, p in zip(self.names, self.params)}


def train(
    *,
    dtype: torch.dtype | None,
    scaler: bool,
    fused: bool = False,
    clip: float | None = None,
    plant_inf: bool = False,
    on_nonfinite: str = "record",
):
    model = make_model()
    opt = (
        torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        if fused
        else torch.optim.SGD(model.parameters(), lr=0.05)
    )
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaler else None
    scope = gradscope.watch(model, optimizer=opt, sample_every=1, on_nonfinite=on_nonfinite)
    rec = GradRecorder(model, opt)
    scales, clip_norms = [], {}
    with scope:
        for step in range(1, STEPS + 1):
            rec.count = step - 1
            x, y = data(step)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = (model(x).float() - y).pow(2).mean()
            (sc.scale(loss) if sc else loss).backward()
            if plant_inf and step == SKIP_AT:
                model[2].weight.grad[0, 0] = float("inf")
            if clip is not None:
                if sc:
                    sc.unscale_(opt)
                clip_norms[step] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            if sc:
                scales.append(sc.get_scale())
                sc.step(opt)
                sc.update()
            else:
                opt.step()
            scope.step(loss=loss)
            opt.zero_grad(set_to_none=True)
            rec.count = step
    return scope.report(), rec, scales, clip_norms


def reference_stats(grads: dict[str, np.ndarray]) -> dict[tuple[str, str], float]:
    """Statistics of each parameter and of the whole model, by hand in float64."""
    out = {}
    for name, g in grads.items():
        layer, param = name.rsplit(".", 1)
        out[(f"{layer}.{param}", "l2_norm")] = float(np.sqrt((g * g).sum()))
        out[(f"{layer}.{param}", "rms")] = float(np.sqrt((g * g).mean()))
        out[(f"{layer}.{param}", "mean")] = float(g.mean())
        out[(f"{layer}.{param}", "abs_max")] = float(np.abs(g).max())
        out[(f"{layer}.{param}", "zero_fraction")] = float((g == 0).mean())
    every = np.concatenate([g.reshape(-1) for g in grads.values()])
    out[("*", "l2_norm")] = float(np.sqrt((every * every).sum()))
    out[("*", "abs_max")] = float(np.abs(every).max())
    return out


def mismatches(report: gradscope.Report, rec: GradRecorder, steps, rtol: float = 1e-6) -> list[str]:
    df = report.stats
    bad = []
    for step in steps:
        got = df[df["step"] == step]
        per_param = {(f"{r.layer}.{r.param}", r.stat): r.value for r in got.itertuples() if r.param != "*"}
        whole = {("*", r.stat): r.value for r in got.itertuples() if r.layer == "*"}
        for key, want in reference_stats(rec.steps[step]).items():
            have = whole.get(key) if key[0] == "*" else per_param.get(key)
            if have is None or not math.isclose(have, want, rel_tol=rtol, abs_tol=1e-9):
                bad.append(f"step {step} {key}: reference {want!r}, gradscope {have!r}")
    return bad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_with_grad_scaler_reports_unscaled_gradients(dtype):
    report, rec, scales, _ = train(dtype=dtype, scaler=True)
    assert scales[0] == 2.0**16  # the loss really was scaled by 65536 ...
    assert not report.skipped_steps
    bad = mismatches(report, rec, range(1, STEPS + 1))
    assert not bad, "\n".join(bad)
    # ... and the statistics are of the gradient of the unscaled loss: a float32 run without
    # autocast or scaler agrees at step 1 (same weights) to half-precision rounding.
    fp32, _, _, _ = train(dtype=None, scaler=False)
    a = report.stats.query("step == 1 and layer == '*' and stat == 'l2_norm'")["value"].item()
    b = fp32.stats.query("step == 1 and layer == '*' and stat == 'l2_norm'")["value"].item()
    assert math.isclose(a, b, rel_tol=2e-2), (a, b)


def test_fused_optimizer_sees_scaled_gradients_but_statistics_are_unscaled():
    # Fused Adam unscales inside its kernel: at its pre-hook the gradients still carry the loss scale.
    report, rec, _, _ = train(dtype=torch.float16, scaler=True, fused=True)
    bad = mismatches(report, rec, range(1, STEPS + 1), rtol=1e-6)
    assert not bad, "\n".join(bad)
    plain, _, _, _ = train(dtype=torch.float16, scaler=True, fused=False)
    a = report.stats.query("step == 1 and layer == '*' and stat == 'l2_norm'")["value"].item()
    b = plain.stats.query("step == 1 and layer == '*' and stat == 'l2_norm'")["value"].item()
    assert math.isclose(a, b, rel_tol=1e-6), (a, b)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adam"])
def test_step_skipped_by_the_scaler_is_recorded_as_skipped(fused):
    report, rec, scales, _ = train(dtype=torch.float16, scaler=True, fused=fused, plant_inf=True)
    assert report.skipped_steps == [SKIP_AT]
    assert scales[SKIP_AT] == scales[SKIP_AT - 1] / 2  # the scaler did back off: it saw the inf
    assert SKIP_AT not in set(report.stats["step"])  # not judged, not in the table
    assert sorted(set(report.stats["step"])) == [s for s in range(1, STEPS + 1) if s != SKIP_AT]
    bad = mismatches(report, rec, [s for s in range(1, STEPS + 1) if s != SKIP_AT])
    assert not bad, "\n".join(bad)
    assert report.meta["recorded_steps"] == STEPS


def test_skipped_step_is_not_reported_as_exploding_or_nonfinite():
    report, _, _, _ = train(dtype=torch.float16, scaler=True, plant_inf=True)
    kinds = {f.kind for f in report.findings}
    assert "exploding_gradients" not in kinds and "nonfinite_gradients" not in kinds, report.findings


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adam"])
def test_on_nonfinite_raise_ignores_steps_the_scaler_skips(fused):
    report, _, _, _ = train(dtype=torch.float16, scaler=True, fused=fused, plant_inf=True, on_nonfinite="raise")
    assert report.skipped_steps == [SKIP_AT] and report.steps == STEPS


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adam"])
def test_clipping_after_unscale_is_reflected(fused):
    max_norm = 0.05
    report, rec, _, clip_norms = train(dtype=torch.float16, scaler=True, fused=fused, clip=max_norm)
    got = report.stats.query("layer == '*' and param == '*' and stat == 'l2_norm'").set_index("step")["value"]
    for step in range(1, STEPS + 1):
        before = clip_norms[step]  # clip_grad_norm_ returns the norm before clipping (unscaled)
        assert before > max_norm  # so every step was clipped
        want = before * min(1.0, max_norm / (before + 1e-6))
        assert math.isclose(got[step], want, rel_tol=1e-5), (step, got[step], want)
    bad = mismatches(report, rec, range(1, STEPS + 1))
    assert not bad, "\n".join(bad)
