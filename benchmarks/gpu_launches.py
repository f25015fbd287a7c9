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

Then the watched copy runs steps 13-30 (step 21 sampled, no flush) under
``torch.cuda.set_sync_debug_mode("error")``: any host sync raises, and the script says so.

``--compile`` runs both copies through ``torch.compile`` (gradscope watches the compiled module, as
a user would) and counts from step 5, after compilation. It was written for the compiled
``resnet50``, whose ordinary step cost 1.1 ms on an H200 against 0.1 ms eager (docs/performance.md):
more kernels per step, or a host sync, would show here. ``resnet50`` runs at batch 16 (the kernel
count does not depend on the batch).

    python benchmarks/gpu_launches.py
    python benchmarks/gpu_launches.py --compile --workloads resnet50,gpt2-small
"""

from __future__ import annotations

import argparse
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


def one(wl, compile: bool = False) -> str:
    """One workload's line: tensors, bare kernels, gradscope's kernels on ordinary and sampled steps, syncs."""
    torch.manual_seed(0)
    base = wl.make_model().cuda()
    g = torch.Generator().manual_seed(1)
    x, y = (t.cuda() for t in wl.make_batch(g))
    if wl.name == "resnet50":
        x, y = x[:16], y[:16]
    models = {"bare": base, "watched": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    runs = {k: torch.compile(m) if compile else m for k, m in models.items()}
    scope = gradscope.watch(runs["watched"], optimizer=opts["watched"], flush_every=1000)

    def step(kind: str) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = wl.loss_fn(runs[kind](x), y)
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
    mode = " (compiled)" if compile else ""
    return f"{wl.name + mode:<22} {n:>7} {bare:>12} {ordinary:>9} {sampled:>8} {sampled_path:>8}  {verdict}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="mlp8,mlp128,gpt2-small")
    ap.add_argument("--compile", action="store_true", help="torch.compile both copies (counted after step 4)")
    args = ap.parse_args()
    pool = {w.name: w for w in cpu_workloads() + gpu_workloads()}
    names = [n for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in pool]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {sorted(pool)}")
    if not torch.cuda.is_available():
        print("gpu_launches.py counts CUDA kernels: no CUDA device here (or a CPU build of torch).")
        return 2
    print(
        f"{'workload':<22} {'tensors':>7} {'bare kernels':>12} {'+ordinary':>9} {'+sampled':>8} {'path':>8}  "
        "sync-free steps 13-30"
    )
    for name in names:
        print(one(pool[name], compile=args.compile))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
