"""Overhead as CPU work: the same paired design as ``overhead.py``, timed with the process's CPU clock.

On a machine shared with other jobs, wall-clock ratios swing by tens of percent between runs (a
parallel region waits for its threads to be scheduled). The CPU time of the process (every thread
of it: TensorBoard's writer thread included, and gradscope flushes the writer at each flush, so the
work lands in the step that caused it) is what monitoring adds, whoever else uses the machine. With
one intra-op thread there is no spinning to inflate it. Ratios only::

    python benchmarks/overhead_cpu.py [--variants gradscope,gradscope-tb] [--threads 1]
    python benchmarks/overhead_cpu.py --baseline gradscope --variants gradscope-tb   # what TensorBoard adds
    python benchmarks/overhead_cpu.py --workloads mlp8,mlp128,digits --pairs 100      # many small tensors
    python benchmarks/overhead_cpu.py --workloads mlp8,mlp128,digits --settle         # as a long run flushes
    python benchmarks/overhead_cpu.py --workloads digits-cl --variants gradscope     # channels-last CNN
    python benchmarks/overhead_cpu.py --workloads mlp8-bf16,emb-mlp8 --variants gradscope  # bfloat16; sparse

Besides the ratios it prints the *fixed* cost of a watched step (median over pairs of watched minus
bare CPU time over the ordinary steps, in microseconds: what every step pays whatever the model),
the cost of one flush and of one sampled step (the mean extra time of the steps that flushed, and
of the sampled steps that did not, beyond the fixed cost, in milliseconds). The
compiled CPU moment kernel is loaded before timing when this machine has it built (build it once
with ``python -m gradscope.capture.kernels``, or pass ``--kernel sync``); the header says which
path ran (``--kernel off`` times the eager path).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overhead import Runner, settle_history, step_costs
from workloads import Workload, cpu_workloads, extra_workloads, layout_workloads

import gradscope
from gradscope.capture import kernels


def measure(
    wl: Workload,
    variant: str,
    *,
    warmup: int,
    pairs: int,
    baseline: str = "bare",
    settle: bool = False,
    batches: int = 4,
    data_seed: int = 1,
    freeze: float = 0.0,
) -> dict:
    """Paired CPU times of ``pairs`` steps: ratios, the fixed per-step cost and the flush cost.

    ``settle``: before the pairs, the watched run alone trains until its host frame has thinned once
    (``history * (1 + THIN_SLACK)`` recorded steps and one flush), so the pairs see a long run's
    flushes, not the first minutes' (a frame that has not reached ``history`` rows never thins).
    ``batches``: how many batches the steps go through in turn (both runs see the same ones), drawn from a
    generator seeded with ``data_seed``. ``freeze``: the share of the model's parameter tensors, the
    first ones, frozen in both runs (``requires_grad=False``, as in fine-tuning).
    """
    torch.manual_seed(0)
    base = wl.make_model()
    tensors = list(base.parameters())
    for p in tensors[: int(len(tensors) * freeze)]:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(data_seed)
    batches = [wl.make_batch(g) for _ in range(batches)]
    bare = Runner(wl, base, "cpu", None, baseline, pairs)
    watched = Runner(wl, copy.deepcopy(base), "cpu", None, variant, pairs)

    def timed(r: Runner, i: int) -> float:
        x, y = batches[i % len(batches)]
        t0 = time.process_time()
        r.step(x, y)
        return time.process_time() - t0

    for i in range(warmup):
        timed(bare, i)
        timed(watched, i)
    settled = settle_history(watched, batches) if settle else 0
    scope = watched.scope
    tb, tw, flushed, sampled = [], [], [], []
    for i in range(pairs):
        first, second = (bare, watched) if i % 2 == 0 else (watched, bare)
        a = timed(first, i)
        b = timed(second, i)
        tb.append(a if first is bare else b)
        tw.append(b if first is bare else a)
        flushed.append(scope is not None and scope.step_count % scope.flush_every == 0)
        sampled.append(scope is not None and (scope.step_count - 1) % scope.sample_every == 0)
    bare.close()
    watched.close()
    return {
        "bare_ms": statistics.median(tb) * 1e3,
        "amortised": sum(tw) / sum(tb),
        "median": statistics.median(w / b for b, w in zip(tb, tw) if b > 0),
        **step_costs(tb, tw, flushed, sampled),
        "settled": settled,
    }


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("gradscope").setLevel(logging.CRITICAL)  # findings lines would interleave the table
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="gradscope,gradscope-tb,gradscope-all-every-step")
    ap.add_argument("--workloads", default="mlp8,mlp128,digits,mlp,cnn,gpt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=None, help="default: 200 (mlp, cnn), 120 (gpt)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--baseline", default="bare", help="the variant ratios are taken against (e.g. gradscope)")
    ap.add_argument(
        "--batches",
        type=int,
        default=4,
        help="batches the steps go through in turn (more: statistics as noisy as fresh data)",
    )
    ap.add_argument("--data-seed", type=int, default=1, help="seed of the batches' generator")
    ap.add_argument("--freeze", type=float, default=0.0, help="share of the parameter tensors frozen (the first ones)")
    ap.add_argument(
        "--settle",
        action="store_true",
        help="train the watched run until its host history has thinned once before timing (a long run's flushes)",
    )
    ap.add_argument(
        "--kernel",
        choices=["auto", "sync", "off"],
        default="auto",
        help="compiled CPU kernel: use if built, build, off",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ[kernels.KERNEL_ENV] = args.kernel
    kernels.cpu_kernel()  # loaded (or, with --kernel sync, built) now, before anything is timed
    pool = {w.name: w for w in cpu_workloads() + layout_workloads() + extra_workloads()}
    print(
        f"gradscope {gradscope.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, CPU time, "
        f"CPU kernel {kernels.cpu_kernel_state()}"
    )
    print(
        f"{'workload':<10} {'variant':<26} {args.baseline + ' cpu ms':>16} {'amortised':>10} {'median':>8} "
        f"{'fixed us':>9} {'flush ms':>9} {'sampled ms':>10}"
    )
    for name in args.workloads.split(","):
        for variant in args.variants.split(","):
            pairs = args.pairs or (120 if name in ("gpt", "mlp128") else 200)
            r = measure(
                pool[name],
                variant,
                warmup=args.warmup,
                pairs=pairs,
                baseline=args.baseline,
                settle=args.settle,
                batches=args.batches,
                data_seed=args.data_seed,
                freeze=args.freeze,
            )
            print(
                f"{name:<10} {variant:<26} {r['bare_ms']:>16.2f} {r['amortised']:>9.3f}x {r['median']:>7.3f}x "
                f"{r['fixed_us']:>9.0f} {r['flush_ms']:>9.2f} {r['sampled_ms']:>10.2f}"
                + (f"   (settled: {r['settled']} steps first)" if args.settle else "")
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
