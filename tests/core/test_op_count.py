"""The accelerator code path dispatches a number of ATen operators that does not grow with the model.

A watched step on the multi-tensor (``foreach``) path, forced on CPU tensors, runs under a
``TorchDispatchMode`` that counts every ATen operator it dispatches. Models with 4, 16 and 64
parameter tensors must dispatch exactly as many: no per-parameter kernel launch, whatever the depth.
On the same path, no operator of gradscope's between flushes reads a value back to the host (the CPU
stand-in for the no-sync test of tests/integration/test_gpu.py, which needs a GPU).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradscope
from gradscope.capture.kernels import FusedMoments


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _model(n_tensors: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(n_tensors // 2)])


def _ops_per_step(n_tensors: int, *, optimizer: bool, exact: bool = False) -> list[Counter[str]]:
    """ATen operators of gradscope's part of steps 1-12 (sampled: 1 and 11) on the foreach path.

    ``exact``: as after a flush has seen a non-finite gradient (sampled steps count them exactly).
    """
    model = _model(n_tensors)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, foreach=True) if optimizer else None
    scope = gradscope.watch(model, optimizer=opt, activations=False, rules="none", flush_every=100)
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path="foreach")
    scope._recorder.moments.nonfinite_seen = exact
    counts = []
    x = torch.randn(4, 8)
    try:
        for _ in range(12):
            model(x).square().mean().backward()
            base = Counter[str]()
            with _CountOps() as mode:
                if opt is not None:
                    opt.step()
                scope.step()
            if opt is not None:
                base = _optimizer_ops(model)
            counts.append(mode.ops - base)
            model.zero_grad(set_to_none=True)
        assert scope._recorder.moments.last_path == "foreach"
    finally:
        scope.close()
    return counts


def _optimizer_ops(model: nn.Module) -> Counter[str]:
    """What SGD(foreach=True) alone dispatches for one step of a copy of ``model`` (same gradients)."""
    clone = _model(sum(1 for _ in model.parameters()))
    for p, q in zip(clone.parameters(), model.parameters()):
        p.grad = q.grad.clone() if q.grad is not None else None
    opt = torch.optim.SGD(clone.parameters(), lr=0.01, foreach=True)
    with _CountOps() as mode:
        opt.step()
    return mode.ops


@pytest.mark.parametrize("exact", [False, True], ids=["flag", "exact-count"])
@pytest.mark.parametrize("optimizer", [False, True], ids=["scope-step", "optimizer-hooks"])
def test_aten_op_count_of_a_watched_step_does_not_grow_with_the_number_of_tensors(optimizer, exact):
    per_size = {n: _ops_per_step(n, optimizer=optimizer, exact=exact) for n in (4, 16, 64)}
    for step in (1, 2, 5, 11, 12):  # sampled (every statistic, weights, update) and ordinary steps
        small, mid, large = (per_size[n][step - 1] for n in (4, 16, 64))
        if step == 1:  # once per run: the weight snapshots of update_ratio are allocated, one per tensor
            for c in (small, mid, large):
                c.pop("empty_like", None)
        assert small == mid == large, (
            f"step {step}: ATen operators per step grow with the number of tensors:\n"
            f" 4 tensors: {sum(small.values())} {dict(small)}\n64 tensors: {sum(large.values())} {dict(large)}"
        )
    # the sampled step takes every moment (and the update): more operators than an ordinary step, still fixed
    assert sum(per_size[4][10].values()) > sum(per_size[4][1].values()) > 0
    # an ordinary step writes into the row's columns: one powsum, its stack, the flag (sub, ne), two
    # copies, and views (select, slice, view) that launch nothing; 17 operators when it built a block
    ordinary = per_size[64][1]
    assert sum(ordinary.values()) <= 11, dict(ordinary)
    launching = {k: v for k, v in ordinary.items() if k not in ("select", "slice", "view")}
    assert launching == {"_foreach_powsum": 1, "stack": 1, "sub": 1, "ne": 1, "copy_": 2}, launching


# Operators that hand a tensor's value to the host: on an accelerator each one waits for the device.
_READBACK = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "allclose"})


class _Readbacks(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket.__name__)
        if name in _READBACK:
            import traceback

            ours = [
                f for f in traceback.extract_stack()[:-1] if "gradscope" in f.filename.replace("\\", "/").split("/")
            ]
            if ours:  # the optimizer's own reads (AdamW's step count on a CPU) are not gradscope's
                self.found[f"{name} at {ours[-1].filename.rsplit('gradscope', 1)[-1]}:{ours[-1].lineno}"] += 1
        return func(*args, **(kwargs or {}))


def test_no_value_is_read_back_to_the_host_between_flushes_on_the_foreach_path():
    """The CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: 35 watched steps (AdamW, the
    update ratio and activation statistics at the sampled steps 1, 11, 21 and 31, a tensor loss, a
    live screen) dispatch no operator of gradscope's that reads a value back (``item``, ``nonzero``, a
    tensor used as a Python bool...). A CPU loss tensor is read by design (``scalar_value``: its value
    is in host memory already), so the loss is passed as a float here."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    scope = gradscope.watch(model, optimizer=opt, flush_every=100)
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path="foreach")
    probe = _Readbacks()
    x = torch.randn(4, 8)
    try:
        for _ in range(35):
            loss = model(x).square().mean()
            loss.backward()
            value = float(loss.detach())  # the caller's read, outside the probe
            with probe:
                opt.step()
                scope.step(loss=value)
            opt.zero_grad()
        assert scope._recorder.moments.last_path == "foreach"
        assert scope.step_count == 35 and scope._diagnosis.unflushed == 35  # no flush: every step between flushes
    finally:
        scope.close()
    assert not probe.found, dict(probe.found)


class _NormOrders(TorchDispatchMode):
    """The ``ord`` of every ``_foreach_norm`` / ``_foreach_powsum`` call, and any per-tensor norm."""

    def __init__(self) -> None:
        super().__init__()
        self.orders: list[tuple[str, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket.__name__)
        if name in ("_foreach_norm", "_foreach_powsum"):
            order = args[1] if len(args) > 1 else (kwargs or {}).get("ord", 2)
            self.orders.append((name, float(order)))
        elif name in ("linalg_vector_norm", "norm"):
            self.orders.append((name, float("nan")))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("exact", [False, True], ids=["flag", "exact-count"])
def test_the_foreach_path_uses_only_norms_with_a_multi_tensor_cuda_kernel(exact):
    """On CUDA, ``_foreach_norm`` has a multi-tensor kernel for the L1, L2 and max norms only; any other
    order (an L0 norm, say) falls back to one launch per tensor. The dispatcher sees one operator
    either way, so the op count cannot tell: the orders used are checked here (a GPU run found an L0
    norm that launched 148 kernels per step on a GPT-2-sized model)."""
    ops = _NormOrders()
    with ops:
        _ops_per_step(16, optimizer=True, exact=exact)
    assert ops.orders, "no norm was dispatched: the foreach path did not run"
    allowed = {1.0, 2.0, float("inf")}
    bad = [(name, order) for name, order in ops.orders if order not in allowed]
    assert not bad, f"norms without a multi-tensor CUDA kernel: {sorted(set(bad))}"


def _mixed(n: int) -> list[torch.Tensor]:
    """``n`` gradients, float32 and float64 in turn (a float32 norm among lower-precision weights)."""
    g = torch.Generator().manual_seed(n)
    return [torch.randn(5, 3, generator=g, dtype=torch.float64 if i % 2 else torch.float32) for i in range(n)]


@pytest.mark.parametrize("sampled", [False, True], ids=["ordinary", "sampled"])
def test_gradients_of_two_dtypes_cost_operators_per_dtype_not_per_tensor(sampled):
    """The multi-tensor path groups gradients by dtype: one set of operators per dtype present."""
    from gradscope.stats.moments import MOMENT_INDEX, MOMENTS, MomentPlan

    counts = []
    for n in (4, 16, 64):
        grads = _mixed(n)
        fused = FusedMoments(MomentPlan(MOMENTS), path="foreach")
        view = torch.full((n, len(MOMENTS)), float("nan"), dtype=torch.float64)
        fused.rows_tensor([i for i in range(n) if i % 2 == 0], view.device)  # (cached index tensors: made once)
        fused.rows_tensor([i for i in range(n) if i % 2], view.device)
        with _CountOps() as mode:
            if sampled:
                block = fused(grads, grads, sampled=True)
            else:
                assert fused.write_core(grads, view)
                block = view
        assert fused.last_path == "foreach"
        counts.append(mode.ops)
        # the values of each row, against float64, whatever its dtype
        for i, x in enumerate(grads):
            d = x.double()
            assert block[i, MOMENT_INDEX["sumsq"]].item() == pytest.approx(float((d * d).sum()), rel=1e-5)
            assert block[i, MOMENT_INDEX["nonfinite"]].item() == 0.0
            if sampled:
                assert block[i, MOMENT_INDEX["max"]].item() == pytest.approx(float(d.max()), rel=1e-6)
    assert counts[0] == counts[1] == counts[2], [sum(c.values()) for c in counts]


def test_an_ordinary_step_with_frozen_parameters_costs_as_many_operators_whatever_the_model():
    """Fine-tuning with most of the model frozen (its rows get no gradient): the written rows are indexed."""
    counts = []
    for n in (4, 16, 64):
        model = _model(n)
        for i, layer in enumerate(model):
            if i % 2:
                layer.requires_grad_(False)
        scope = gradscope.watch(model, activations=False, rules="none", flush_every=100)
        scope._recorder.moments = FusedMoments(scope._recorder.plan, path="foreach")
        x = torch.randn(4, 8)
        try:
            for _ in range(3):
                model(x).square().mean().backward()
                with _CountOps() as mode:
                    scope.step()
                model.zero_grad(set_to_none=True)
            assert scope._recorder.moments.last_path == "foreach"
        finally:
            scope.close()
        counts.append(mode.ops)  # step 3: ordinary
    assert counts[0] == counts[1] == counts[2], [dict(c) for c in counts]
    assert counts[0]["index_copy_"] == 2 and counts[0]["_foreach_powsum"] == 1, dict(counts[0])


def _embedding_run(n_linear: int, path: str) -> tuple[list[Counter[str]], object]:
    """ATen operators of ``scope.step()`` at steps 1-12 of a sparse embedding in front of ``n_linear`` layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(50, 8, mode="sum", sparse=True), *[nn.Linear(8, 8) for _ in range(n_linear)])
    scope = gradscope.watch(model, activations=False, rules="none", flush_every=100)
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path=path)
    x = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(1))  # (repeated rows: uncoalesced)
    counts = []
    for _ in range(12):
        model(x).square().mean().backward()
        with _CountOps() as mode:
            scope.step()
        counts.append(mode.ops)
        model.zero_grad(set_to_none=True)
    return counts, scope.close()


def test_a_sparse_embedding_costs_the_eager_path_for_itself_alone():
    """One gradient the multi-tensor path cannot take (sparse) no longer sends every tensor of the step
    to the per-tensor eager path: the others stay on the multi-tensor path, the operator count fixed."""
    small, report = _embedding_run(2, "foreach")  # 5 tensors
    large, _ = _embedding_run(8, "foreach")  # 17 tensors
    for step in (2, 5, 11, 12):  # ordinary and sampled steps (1 and 11), after the first split
        assert small[step - 1] == large[step - 1], (step, dict(small[step - 1]), dict(large[step - 1]))
    eager, want = _embedding_run(2, "eager")
    got = report.stats.set_index(["step", "layer", "param", "stat"])["value"]
    ref = want.stats.set_index(["step", "layer", "param", "stat"])["value"]
    assert got.index.equals(ref.index)
    np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), rtol=1e-5, atol=1e-8)
    # without the split every tensor had its own operators: the eager run's count grows with the model
    assert sum(eager[4].values()) > sum(small[4].values())


class _RoutedExperts(nn.Module):
    """A top-1 router over ``n`` experts: only the experts picked at a step get a gradient (as Mixtral's layers)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.gate = nn.Linear(8, n, bias=False)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.picked: list[set[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        weight, picked = self.gate(h).softmax(-1).max(-1)
        chosen = sorted(set(picked.tolist()))
        self.picked.append(set(chosen))
        out = h
        for e in chosen:
            rows = (picked == e).nonzero(as_tuple=True)[0]
            out = out.index_add(0, rows, self.experts[e](h[rows]) * weight[rows, None])
        return out


def _experts_run(n: int, path: str) -> tuple[list[Counter[str]], object, list[set[int]]]:
    """ATen operators of ``scope.step()`` at steps 1-12 of a router over ``n`` experts (2 samples: at most 2 picked)."""
    torch.manual_seed(0)
    model = _RoutedExperts(n)
    scope = gradscope.watch(model, activations=False, rules="none", flush_every=100)
    scope._recorder.moments = FusedMoments(scope._recorder.plan, path=path)
    g = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(12):
        model(torch.randn(2, 8, generator=g)).square().mean().backward()
        with _CountOps() as mode:
            scope.step()
        counts.append(mode.ops)
        model.zero_grad(set_to_none=True)
    if path == "foreach":
        assert scope._recorder.moments.last_path == "foreach"
    return counts, scope.close(), model.picked


def test_a_mixture_of_experts_costs_as_many_operators_whatever_the_number_of_experts():
    """The set of tensors with a gradient changes at every step (the experts the router picked): their
    rows are written by index, in as many operators with 4, 16 or 64 experts, and the values and the
    rows left without a gradient are those of the per-tensor eager path."""
    runs = {n: _experts_run(n, "foreach") for n in (4, 16, 64)}

    def launching(c: Counter[str]) -> dict[str, int]:
        # views launch nothing; a set of rows not seen before makes its index tensor (lift_fresh), and a
        # number of rows not seen before on a sampled step its block of NaN (full): once each, then cached
        return {k: v for k, v in c.items() if k not in ("select", "slice", "view", "lift_fresh", "full")}

    for step in (2, 5, 11, 12):  # ordinary and sampled (1, 11) steps
        per_n = [launching(runs[n][0][step - 1]) for n in (4, 16, 64)]
        assert per_n[0] == per_n[1] == per_n[2], (step, per_n)
    ordinary = launching(runs[64][0][4])
    assert ordinary.get("index_copy_") == 2 and ordinary.get("_foreach_powsum") == 1, ordinary
    _, report, picked = runs[16]
    _, want, _ = _experts_run(16, "eager")
    got = report.stats.set_index(["step", "layer", "param", "stat"])["value"]
    ref = want.stats.set_index(["step", "layer", "param", "stat"])["value"]
    assert got.index.equals(ref.index)
    np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), rtol=1e-5, atol=1e-7)
    # the experts recorded with a gradient at each step are those the router picked, no more
    stats = report.stats
    norms = stats[
        (stats["stat"] == "l2_norm") & (stats["param"] == "weight") & stats["layer"].str.startswith("experts.")
    ]
    for step, chosen in enumerate(picked, start=1):
        at = norms[norms["step"] == step]
        with_grad = {int(layer.split(".")[1]) for layer in at.loc[at["value"].notna(), "layer"]}
        assert with_grad == chosen, (step, with_grad, chosen)
