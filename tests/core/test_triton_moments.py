"""The one-pass Triton kernel of sampled steps, run on CPU tensors by Triton's interpreter.

The kernel is the one CUDA runs (``tests/integration/test_gpu.py`` runs it there); the interpreter
executes each program as NumPy code. Its moments are held against float64 NumPy references (the
same ``_check`` as the other paths), worked cases by hand, and a watched run on the eager path.

Triton decides between compiling and interpreting when ``triton.language`` is first imported
(``TRITON_INTERPRET``), once per process. So the tests below run in a process of their own, started
by :func:`test_the_kernel_in_a_triton_interpreter_process` with ``TRITON_INTERPRET=1``; in the main
test process they are skipped, and that one test runs them and reports their outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradscope.capture import triton_moments as tm
from gradscope.capture.kernels import FusedMoments
from gradscope.stats.moments import GRAD_MOMENTS, MOMENTS, MomentPlan

from .test_fused_moments import _check, _grads, nan_at_step_2, watched_run

pytest.importorskip("triton", reason="Triton is not installed (it ships with PyTorch's CUDA builds)")

_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 64  # small tiles: several tiles per tensor, and a tensor that ends mid-tile


@pytest.mark.skipif(_INTERPRETER, reason="this is the interpreter process")
def test_the_kernel_in_a_triton_interpreter_process():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore::RuntimeWarning"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).relative_to(root))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "skipped" in summary, proc.stdout[-2000:]


@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch, request):
    """Every test starts with no self-check done (and Triton on); outside the interpreter process, skip."""
    if not _INTERPRETER and request.node.name != "test_the_kernel_in_a_triton_interpreter_process":
        pytest.skip("runs in the interpreter process (test_the_kernel_in_a_triton_interpreter_process)")
    monkeypatch.delenv(tm.TRITON_ENV, raising=False)
    monkeypatch.setattr(tm, "_checked", {})
    monkeypatch.setattr(tm, "_tiles", {})


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan-and-inf"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=["fp32", "fp64", "bf16", "fp16"]
)
def test_the_triton_kernel_matches_float64_references(dtype, nonfinite):
    grads = _grads(dtype, nonfinite)
    if dtype == torch.float16:  # the fixture's 1e2 scale squared is within float16's range once read in float32
        grads = [g.clamp(-6e4, 6e4) if torch.isfinite(g).all() else g for g in grads]
    block = tm.triton_moments(grads, interpret=True, block=_BLOCK)
    assert tm.triton_state(torch.device("cpu"), dtype, interpret=True) == "ready"
    assert block is not None and block.shape == (len(grads), len(GRAD_MOMENTS)) and block.dtype == torch.float64
    # float32 partials per tile, added in float64: float32 rounding at worst (float64 gradients: float64)
    _check(block, grads, rtol=1e-12 if dtype == torch.float64 else 1e-5)


def test_worked_by_hand_across_tiles_nan_inf_zeros_and_an_empty_tensor():
    # 150 entries over three tiles of 64 (the last one ends mid-tile): 1, 2, ..., 150 with two zeros and a -7
    a = torch.arange(1.0, 151.0)
    a[[10, 100]] = 0.0
    a[130] = -7.0
    b = torch.tensor([0.0, float("nan"), 3.0, float("inf")])
    c = torch.tensor([-float("inf"), 2.0])
    block = tm.triton_moments([a, b, torch.zeros(0), c, torch.zeros(5)], interpret=True, block=_BLOCK)
    assert block is not None
    total = 150 * 151 / 2 - 11 - 101 - 131 - 7
    squares = 150 * 151 * 301 / 6 - 11**2 - 101**2 - 131**2 + 49
    np.testing.assert_allclose(block[0].tolist(), [total, squares, -7.0, 150.0, 148.0, 0.0], rtol=1e-6)
    got = block[1].tolist()
    assert all(np.isnan(got[:4])) and got[4:] == [3.0, 2.0]  # NaN makes the sums, min and max NaN
    assert block[2].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # an empty tensor: zeros, as the other paths
    got = block[3].tolist()
    assert np.isnan(got[0]) or got[0] == -float("inf")  # -inf + 2
    assert got[1:] == [float("inf"), -float("inf"), 2.0, 2.0, 1.0]
    assert block[4].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_permuted_layouts_are_read_in_memory_order():
    # a channels-last convolution weight and a transposed matrix: dense, their entries in another order
    g = torch.Generator().manual_seed(9)
    conv = torch.randn(8, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
    grads = [conv, torch.randn(40, 7, generator=g).t(), torch.randn(70, generator=g)]
    assert not conv.is_contiguous() and not grads[1].is_contiguous()
    block = tm.triton_moments(grads, interpret=True, block=_BLOCK)
    assert block is not None
    _check(block, grads, rtol=1e-5)
    # a pair lines its entries up only when both lie alike: same strides, or declined
    snap = torch.empty_like(conv)  # (empty_like keeps the channels-last strides)
    sums = tm.triton_pair_sumsq([conv], [snap], copy=True, interpret=True, block=_BLOCK)
    assert sums is not None and torch.equal(snap, conv)
    np.testing.assert_allclose(sums.numpy(), [float((conv.double() ** 2).sum())], rtol=1e-5)
    assert tm.triton_pair_sumsq([conv], [conv.contiguous()], copy=False, interpret=True) is None


def test_what_it_cannot_read_is_declined_without_launching():
    x = torch.randn(8, 4)
    assert tm.triton_moments([x, x.double()], interpret=True) is None  # mixed dtypes
    assert tm.triton_moments([x[:, ::2]], interpret=True) is None  # gaps between its entries
    assert tm.triton_moments([x.to(torch.int64)], interpret=True) is None  # not a floating point gradient
    assert tm.triton_moments([x]) is None  # a CPU tensor outside the interpreter: that is the CPU kernel's
    assert tm.triton_moments([], interpret=True) is None
    with torch.autograd.grad_mode.no_grad():
        old = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert tm.triton_moments([x], interpret=True) is None  # index_add_ is not deterministic on CUDA
        finally:
            torch.use_deterministic_algorithms(old)
    assert tm._checked == {}  # nothing was even checked


def test_off_by_environment_and_a_failed_self_check_keep_the_multi_tensor_path(monkeypatch):
    grads = _grads(torch.float32, False)
    monkeypatch.setenv(tm.TRITON_ENV, "off")
    assert tm.triton_moments(grads, interpret=True) is None
    assert tm.triton_state(torch.device("cpu"), torch.float32, interpret=True) == "off"
    monkeypatch.delenv(tm.TRITON_ENV)
    # a kernel that disagrees with torch is never used: here the reference is made to disagree
    monkeypatch.setattr(tm, "_reference", lambda x: torch.full((6,), 42.0, dtype=torch.float64))
    assert tm.triton_moments(grads, interpret=True) is None
    assert tm.triton_state(torch.device("cpu"), torch.float32, interpret=True).startswith("failed")
    fused = FusedMoments(MomentPlan(MOMENTS), path="triton")
    block = fused(grads, grads, sampled=True)
    assert fused.last_path == "foreach"  # fell back, measured all the same
    _check(block, grads, rtol=1e-5, foreach=True)


def test_fused_moments_take_it_on_sampled_steps_only():
    grads = _grads(torch.float32, True)
    fused = FusedMoments(MomentPlan(MOMENTS), path="triton")
    block = fused(grads, grads, sampled=True)
    assert fused.last_path == "triton"
    _check(block, grads, rtol=1e-5)
    assert torch.isnan(block[:, len(GRAD_MOMENTS) :]).all()  # the weight columns are filled by the recorder
    core = fused(grads, grads, sampled=False)  # the sum of squares: one multi-tensor pass already
    assert fused.last_path == "foreach"
    _check(core, grads, rtol=1e-5, moments=("sumsq",))


def test_a_watched_run_on_the_triton_path_records_what_the_eager_path_records():
    a, paths = watched_run("triton", sample_every=2, steps=4)
    # the weights' side went through the pair kernel (param_norm, update_ratio compared below)
    assert tm.triton_state(torch.device("cpu"), torch.float32, interpret=True, kind="pair") == "ready"
    b, _ = watched_run("eager", sample_every=2, steps=4)
    assert paths == ["triton", "foreach", "triton", "foreach"]  # sampled steps 1 and 3
    cols = [c for c in a.columns if c in b.columns and a[c].dtype.kind == "f"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-5, atol=1e-9)
    # the sampled statistics (min, max, zero fraction... of steps 1 and 3) are there, as on the eager path
    measured = a[a["value"].notna()].groupby("stat").size()
    assert measured.equals(b[b["value"].notna()].groupby("stat").size())
    assert (measured == measured.max()).sum() < len(measured)  # some statistics on sampled steps only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_the_pair_kernel_copies_the_weights_and_sums_squares_and_differences(dtype):
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 50), (7,), (0,), (1,), (130,)]  # several tiles of 64, one empty tensor
    a = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    want_diff = [float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b)]
    diff = tm.triton_pair_sumsq(a, b, copy=False, interpret=True, block=_BLOCK)
    assert diff is not None and diff.dtype == torch.float64
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(diff.numpy(), want_diff, rtol=rtol)
    before = [y.clone() for y in b]
    assert all(torch.equal(x, y) for x, y in zip(b, before))  # nothing written by the difference
    copied = tm.triton_pair_sumsq(a, b, copy=True, interpret=True, block=_BLOCK)
    assert copied is not None
    np.testing.assert_allclose(copied.numpy(), [float((x.double() ** 2).sum()) for x in a], rtol=rtol)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # b is now a copy of a, bit for bit
    # what it cannot pair: different sizes, different dtypes
    assert tm.triton_pair_sumsq([a[0]], [torch.zeros(5, dtype=dtype)], copy=True, interpret=True) is None
    if dtype != torch.float64:
        assert tm.triton_pair_sumsq([a[0]], [a[0].double()], copy=False, interpret=True) is None


def test_the_non_finite_finding_claims_no_count_when_ordinary_rows_hold_a_flag():
    """With Triton, sampled steps count NaN entries but ordinary steps still flag them: no count is claimed."""
    scope, found = nan_at_step_2("triton", steps=4, sample_every=3)
    assert scope._recorder.moments.last_path == "triton"  # step 4 is sampled
    assert not found.evidence["counted"] and "values)" not in found.message
    # the rules judged after a sampled step still read flags on the ordinary rows: no count claimed
    ctx = scope._diagnosis.context(scope._recorder.frame, new_from=0, final=False, step_count=4)
    assert ctx.nonfinite_counted is False
