"""What the TensorBoard output costs, piece by piece, per training step.

For each workload (the CPU set of ``overhead.py`` and a 51-layer transformer), a scope records one
flush of 50 steps, then each piece of work the TensorBoard sink does is timed on it:

* records: turning the flush's rows into ``(step, tag, value)`` records (``SinkUpdate.records_by_step``),
  the part every record sink shares (TensorBoard, CSV, ``log_metrics`` loggers);
* scalars: the flush written the way gradscope does it (records, then one event per step; the records
  included) and, for comparison, the way ``add_scalar`` would (one event per value);
* histograms: binning every layer's gradients (done on one step in ``histogram_every`` = 100);
* figure: rendering the gradient-flow figure (one step in ``figure_every`` = 1000).

Each is divided by the steps it serves and by the bare training step: the overhead it adds. Times
are CPU time of the whole process (TensorBoard's writer thread included: the sink flushes the writer,
so its work is done when ``write`` returns), one intra-op thread by default: on a shared machine,
the steadier clock. ``--clock wall`` for wall time.

    python benchmarks/tensorboard_write.py [--workloads mlp,cnn,gpt,gpt51] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overhead import make_optimizer
from workloads import GPT, Workload, cpu_workloads, lm_loss

import gradscope
from gradscope.sinks import tags as T
from gradscope.sinks.base import ScopeInfo, SinkUpdate
from gradscope.sinks.histograms import histogram_rows
from gradscope.sinks.tensorboard import TensorBoardSink
from gradscope.views.plots import gradient_flow, render_png


def gpt51() -> Workload:
    return Workload(
        "gpt51",
        lambda: GPT(vocab=2048, ctx=64, d=128, layers=8, heads=4),
        lambda g: (torch.randint(0, 2048, (8, 64), generator=g), torch.randint(0, 2048, (8, 64), generator=g)),
        lm_loss,
        "adamw",
        "GPT-style transformer, 8 blocks (51 layers), d=128, ctx 64, vocab 2048 (1.9M params), batch 8, AdamW",
    )


def measure(wl: Workload, *, steps: int, repeat: int, clock: Callable[[], float], tmp: str) -> dict:
    """Time each piece of the sink's work on ``wl``; fractions of the bare training step."""

    def timed(fn: Callable[[], object], times: int = repeat) -> float:
        out = []
        for _ in range(times):
            t0 = clock()
            fn()
            out.append(clock() - t0)
        return statistics.median(out)

    torch.manual_seed(0)
    model = wl.make_model()
    opt = make_optimizer(wl.optimizer, model)
    x, y = wl.make_batch(torch.Generator().manual_seed(1))

    def train_step() -> None:
        wl.loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        train_step()
    bare = timed(train_step, 5)

    scope = gradscope.watch(model, optimizer=opt, rules="none")
    for _ in range(steps):
        wl.loss_fn(model(x), y).backward()
        opt.step()
        scope.step(loss=1.0)
        opt.zero_grad()
    scope.flush()
    frame = scope.frame
    sch = frame.schema
    layers = len(sch.layers)
    info = ScopeInfo(layout=scope.layout, model_name=wl.name, stats=scope.stat_names, every=1)

    def fresh_update() -> SinkUpdate:
        # a new update each time: its records are computed once per update, and that is part of the cost
        return SinkUpdate(frame=frame, new_from=0, findings=[], layers_by_depth=scope.layers_by_depth())

    def batched() -> float:
        sink = TensorBoardSink(os.path.join(tmp, f"b{time.perf_counter_ns()}"), histogram_every=None, figure_every=None)
        sink.open(info)
        sink._started = True  # time the scalars, not the one-off layout
        update = fresh_update()
        t0 = clock()
        sink.write(update)  # ends with writer.flush(): the writer thread's work is done
        spent = clock() - t0
        sink.writer.close()
        return spent

    def per_value() -> None:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(os.path.join(tmp, f"p{time.perf_counter_ns()}"))
        for stat in sch.stats:
            vals = frame.layer_values(stat)
            for r, step in enumerate(frame.steps):
                if stat in sch.sampled_stats and not frame.sampled[r]:
                    continue
                for j, layer in enumerate(sch.layers):
                    w.add_scalar(T.stat_tag(stat, layer), float(vals[r, j]), int(step))
        w.close()

    values = sum((int(frame.sampled.sum()) if s in sch.sampled_stats else len(frame)) * (layers + 1) for s in sch.stats)
    wl.loss_fn(model(x), y).backward()
    groups: dict[str, list[torch.Tensor]] = {}
    for p, t in zip(scope.layout.params, scope.layout.tensors):
        groups.setdefault(p.layer, []).append(t.grad)
    grads = list(groups.values())
    flow = (scope.layers_by_depth(), np.random.rand(layers), np.random.rand(layers))
    out = {
        "layers": layers,
        "bare": bare,
        "values": values,
        "records": timed(lambda: fresh_update().records_by_step()) / steps / bare,
        "scalars": statistics.median(batched() for _ in range(repeat)) / steps / bare,
        "add_scalar": timed(per_value, 1) / steps / bare,
        "histograms": timed(lambda: histogram_rows(grads, 64)) / 100 / bare,
        "figure": timed(lambda: render_png(gradient_flow(*flow))) / 1000 / bare,
    }
    opt.zero_grad()
    scope.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="mlp,cnn,gpt,gpt51")
    ap.add_argument("--steps", type=int, default=50, help="recorded steps in the flush")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    pool = {w.name: w for w in [*cpu_workloads(), gpt51()]}
    tmp = tempfile.mkdtemp(prefix="gradscope-tbw-")
    print(
        f"gradscope {gradscope.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.clock} time"
    )
    print("overhead of each piece, as a fraction of the bare training step:")
    print(
        f"{'workload':<8} {'layers':>6} {'step ms':>8} {'values/flush':>12} {'records':>8} {'scalars':>9} {'add_scalar':>11} "
        f"{'histograms':>11} {'figure':>8} {'total':>8}"
    )
    for name in args.workloads.split(","):
        r = measure(pool[name], steps=args.steps, repeat=args.repeat, clock=clock, tmp=tmp)
        total = r["scalars"] + r["histograms"] + r["figure"]
        print(
            f"{name:<8} {r['layers']:>6} {r['bare'] * 1e3:>8.1f} {r['values']:>12} {r['records']:>8.2%} {r['scalars']:>9.2%} "
            f"{r['add_scalar']:>11.2%} {r['histograms']:>11.2%} {r['figure']:>8.2%} {total:>8.2%}"
        )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
