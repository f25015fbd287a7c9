"""Kernels gradscope launches per step on a CUDA device, and host syncs, against the number of tensors.

For each model (the 8- and 128-block MLPs of ``workloads.py``: 18 and 258 parameter tensors, and
the GPT-2-small-sized transformer: 148), a bare and a watched copy step on the same batches; the
CUDA kernels of each step are counted with ``torch.profiler``. Printed: kernels of gradscope's part
(watched minus bare) on an ordinary step and on a sampled one. On the multi-tensor path that
count should not grow with the number of tensors (a multi-tensor operator launches one kernel per
chunk of tensors, so it grows by steps of many tensors, not by one per tensor). ``path`` is the moment
path of the counted sampled step: ``triton`` when the one-pass kernel of
``gradscope/capture/triton_moments.py`` ran (its self-check, launched at step 1, had completed),
``foreach`` otherwise.

Then the watched copy runs steps 1-30 (two sampled steps and no flush) under
``torch.cuda.set_sync_debug_mode("error")``: any host sync raises, and the script says so.

    python benchmarks/gpu_launches.py
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import cpu_workloads, gpu_workloads

import gradscope


def kernels_of(fn) -> int:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def one(wl) -> str:
    """One workload's line: tensors, bare kernels, gradscope's kernels on ordinary and sampled steps, syncs."""
    torch.manual_seed(0)
    base = wl.make_model().cuda()
    g = torch.Generator().manual_seed(1)
    x, y = (t.cuda() for t in wl.make_batch(g))
    models = {"bare": base, "watched": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    scope = gradscope.watch(models["watched"], optimizer=opts["watched"], flush_every=1000)

    def step(kind: str) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = wl.loss_fn(models[kind](x), y)
        loss.backward()
        opts[kind].step()
        if kind == "watched":
            scope.step(loss=loss)
        opts[kind].zero_grad(set_to_none=True)

    counts: dict[str, list[int]] = {"bare": [], "watched": []}
    sampled_path = ""
    for i in range(12):  # watched steps 1 and 11 are sampled (sample_every=10)
        for kind in ("bare", "watched"):
            counts[kind].append(kernels_of(lambda k=kind: step(k)))
        if i == 10:  # the moment path of the counted sampled step (triton: one pass; foreach otherwise)
            sampled_path = scope._recorder.moments.last_path
    bare = counts["bare"][4]
    ordinary = counts["watched"][4] - counts["bare"][4]
    sampled = counts["watched"][10] - counts["bare"][10]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    verdict = "yes"
    try:
        for _ in range(18):  # steps 13-30: 21 is sampled
            step("watched")
    except RuntimeError as e:
        verdict = f"NO: {str(e).splitlines()[0][:80]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scope.close()
    n = sum(1 for p in base.parameters() if p.requires_grad)
    return f"{wl.name:<11} {n:>7} {bare:>12} {ordinary:>9} {sampled:>8} {sampled_path:>8}  {verdict}"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_launches.py counts CUDA kernels: no CUDA device here (or a CPU build of torch).")
        return 2
    pool = {w.name: w for w in cpu_workloads() + gpu_workloads()}
    print(
        f"{'workload':<11} {'tensors':>7} {'bare kernels':>12} {'+ordinary':>9} {'+sampled':>8} {'path':>8}  "
        "sync-free steps 1-30"
    )
    for name in ("mlp8", "mlp128", "gpt2-small"):
        print(one(pool[name]))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
