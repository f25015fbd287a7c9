"""What the TensorBoard output costs on a ~50-layer model, piece by piece.

* scalars: one flush of 50 recorded steps (all statistics, per layer and for the model), written the
  way gradscope does it (one event per step) and the way ``add_scalar`` would (one event per value);
* histograms: binning every layer's gradients on a histogram step;
* figure: rendering the gradient-flow figure.

Each figure is also given per training step, next to the bare step time of the same model, so it
reads as overhead. CPU time of the whole process (``time.process_time``, which includes TensorBoard's
writer thread) is printed with wall time: on a shared machine it is the steadier of the two.

    python benchmarks/tensorboard_write.py [--blocks 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import GPT, lm_loss

import gradscope
from gradscope.sinks import tags as T
from gradscope.sinks.base import ScopeInfo, SinkUpdate
from gradscope.sinks.histograms import histogram_rows
from gradscope.sinks.plots import gradient_flow, render_png
from gradscope.sinks.tensorboard import TensorBoardSink


def timed(fn, repeat: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=8, help="transformer blocks (6 layers each, + 3)")
    ap.add_argument("--steps", type=int, default=50, help="recorded steps in the flush")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT(vocab=2048, ctx=64, d=128, layers=args.blocks, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2048, (8, 64), generator=g)

    def train_step() -> None:
        lm_loss(model(x), x).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        train_step()
    bare, _ = timed(train_step, 5)

    # a frame of `steps` recorded steps (sample_every=10: every statistic on 1 step in 10)
    scope = gradscope.watch(model, optimizer=opt, rules="none")
    for _ in range(args.steps):
        lm_loss(model(x), x).backward()
        opt.step()
        scope.step(loss=1.0)
        opt.zero_grad()
    scope.flush()
    frame = scope.frame
    layers = len(frame.schema.layers)
    update = SinkUpdate(frame=frame, new_from=0, findings=[], layers_by_depth=scope.layers_by_depth(), final=False)
    tmp = tempfile.mkdtemp(prefix="gradscope-tbw-")

    def batched() -> None:
        sink = TensorBoardSink(os.path.join(tmp, f"b{time.perf_counter_ns()}"), histogram_every=None, figure_every=None)
        sink.open(ScopeInfo(layout=scope.layout, model_name="GPT", stats=scope.stat_names, every=1))
        sink._started = True  # time the scalars, not the one-off layout
        sink.write(update)
        sink.writer.close()

    def per_value() -> None:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(os.path.join(tmp, f"p{time.perf_counter_ns()}"))
        sch = frame.schema
        for stat in sch.stats:
            vals = frame.layer_values(stat)
            for r, step in enumerate(frame.steps):
                if stat in sch.sampled_stats and not frame.sampled[r]:
                    continue
                for j, layer in enumerate(sch.layers):
                    w.add_scalar(T.stat_tag(stat, layer), float(vals[r, j]), int(step))
        w.close()

    n_values = 0
    for stat in frame.schema.stats:
        rows = frame.sampled.sum() if stat in frame.schema.sampled_stats else len(frame)
        n_values += int(rows) * (layers + 1)
    lm_loss(model(x), x).backward()
    groups: dict[str, list[torch.Tensor]] = {}
    for info, t in zip(scope.layout.params, scope.layout.tensors):
        groups.setdefault(info.layer, []).append(t.grad)
    grads = list(groups.values())
    opt.zero_grad()
    scope.close()

    wb, cb = timed(batched, args.repeat)
    wp, cp = timed(per_value, args.repeat)
    wh, ch = timed(lambda: histogram_rows(grads, 64), args.repeat)
    flow = (scope.layers_by_depth(), np.random.rand(layers), np.random.rand(layers))
    wf, cf = timed(lambda: render_png(gradient_flow(*flow)), args.repeat)

    n = args.steps
    print(f"gradscope {gradscope.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"model: GPT-style, {args.blocks} blocks, {layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
    )
    print(f"bare training step: {bare * 1e3:.1f} ms")
    print(f"one flush of {n} steps = {n_values} scalar values")
    print(f"{'what':<42} {'wall ms':>9} {'cpu ms':>9} {'per step ms':>12} {'of a step':>10}")
    rows = [
        ("scalars, one event per step (gradscope)", wb, cb, n),
        ("scalars, add_scalar per value", wp, cp, n),
        ("histograms of every layer (one step in 100)", wh, ch, 100),
        ("gradient-flow figure (one step in 1000)", wf, cf, 1000),
    ]
    for what, w, c, per in rows:
        print(f"{what:<42} {w * 1e3:>9.1f} {c * 1e3:>9.1f} {w / per * 1e3:>12.3f} {w / per / bare:>9.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
