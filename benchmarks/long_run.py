"""Memory over a long run: 100k training steps of a small model, watched with the default settings.

Prints the resident set size and the frame's size every ``--report-every`` steps, and (with
``--tracemalloc``) the Python/NumPy memory allocated and still alive since the half-way point. With
bounded history (the default, ``history=2000``) both stay flat once the frame is full; with
``--history none`` the frame keeps every row and grows linearly: the control.

Run ``python benchmarks/long_run.py`` (about 1-2 minutes on a CPU) or ``--steps 20000`` for a quick look.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import tracemalloc

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradscope


def rss_mb() -> float:
    """Current resident set size (Linux /proc), else the peak (getrusage)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--history", default="2000", help='rows kept at full resolution, or "none"')
    ap.add_argument("--report-every", type=int, default=10_000)
    ap.add_argument("--tensorboard", action="store_true", help="also write a TensorBoard run (to a temp folder)")
    ap.add_argument("--tracemalloc", action="store_true", help="trace Python/NumPy allocations over the second half")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    history = None if args.history.lower() == "none" else int(args.history)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 32, generator=g), torch.randn(32, 1, generator=g)) for _ in range(16)]
    log_dir = tempfile.mkdtemp(prefix="gradscope-long-") if args.tensorboard else None
    scope = gradscope.watch(model, optimizer=opt, history=history, log_dir=log_dir)

    print(
        f"gradscope {gradscope.__version__}, torch {torch.__version__}, {args.steps} steps, history={history}, "
        f"tensorboard={args.tensorboard}"
    )
    print(f"{'step':>8} {'RSS MB':>8} {'frame rows':>11} {'traced MB':>10} {'us/step':>8}")
    t0 = time.perf_counter()
    last = t0
    rss_at_half = None
    for step in range(1, args.steps + 1):
        x, y = batches[step % len(batches)]
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        if step == args.steps // 2:
            gc.collect()
            rss_at_half = rss_mb()
            if args.tracemalloc:
                tracemalloc.start()
        if step % args.report_every == 0:
            gc.collect()
            now = time.perf_counter()
            traced = tracemalloc.get_traced_memory()[0] / 1e6 if tracemalloc.is_tracing() else float("nan")
            print(
                f"{step:>8} {rss_mb():>8.1f} {len(scope.frame):>11} {traced:>10.3f} "
                f"{(now - last) / args.report_every * 1e6:>8.0f}"
            )
            sys.stdout.flush()
            last = now
    gc.collect()
    rss_end = rss_mb()  # before close(): building the final report allocates its tables
    report = scope.close()
    total = time.perf_counter() - t0
    print(f"RSS growth over the second half: {rss_end - (rss_at_half or 0):+.1f} MB")
    print(f"report: {len(report.stats)} stats rows, history {report.meta['history']}")
    print(f"total {total:.1f} s, {total / args.steps * 1e6:.0f} us per training step (model, optimizer and scope)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
