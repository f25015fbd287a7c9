"""Overhead of gradscope against the bare training step, measured side by side in one process.

Each workload is built twice from the same seed: a bare copy and a watched copy. Steps alternate
(bare, watched, then watched, bare, ...) so both see the same machine state, and the ratio of each
pair is taken. Printed per variant:

* ``amortised``: total watched time / total bare time over all timed pairs, so periodic work
  (flushes and rules every 50 steps, activation sampling every 10) is included: this is the figure
  the targets refer to.
* ``median``: median of the per-pair ratios (an ordinary step).
* ``fixed us``: median over ordinary steps of watched minus bare time, in microseconds: what every
  step pays whatever the model (on a model with many small tensors, the cost that matters).
* ``flush ms``: the mean extra time of the steps that flushed, beyond the fixed cost.
* ``sampled ms``: the mean extra time of the sampled steps (every statistic, the activations, the
  weights and the update; one in ``sample_every``) that did not flush, beyond the fixed cost.

Variants: ``gradscope`` is ``watch(model, optimizer=opt)`` with its defaults (``l2_norm``, ``rms`` and
``nonfinite_count`` at every step; the other statistics and the activations every 10 steps; rules
at every flush); ``gradscope-tb`` adds the TensorBoard run; ``gradscope-all-every-step`` takes every
statistic and the activations at every step (``sample_every=1``); ``naive-item-hooks`` is the
hand-written baseline (per-parameter hooks reading four statistics with ``.item()``);
``detect-anomaly`` (not in the default set) runs forward and backward under
``torch.autograd.detect_anomaly()``, the usual way to hunt a NaN.

Run ``python benchmarks/overhead.py`` (CPU) or ``python benchmarks/overhead.py --device cuda --dtype bf16``.
``--compile`` runs both copies through ``torch.compile`` (the watched one is watched as a compiled
module); compilation happens during warm-up, which is then at least 3 steps.
Ratios only; absolute times are printed for context, never judged.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import Workload, cpu_workloads, extra_workloads, gpu_workloads, hf_workloads, layout_workloads

import gradscope
from gradscope.capture import kernels


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


class Runner:
    """One model + optimizer + (optional) monitoring, stepping on pre-generated batches."""

    def __init__(
        self,
        wl: Workload,
        model: nn.Module,
        device: str,
        dtype: torch.dtype | None,
        variant: str,
        steps: int,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.opt = make_optimizer(wl.optimizer, model)
        # With --compile, both the bare and the watched copy run compiled; gradscope watches the
        # compiled module (OptimizedModule), as a user would.
        self.run = torch.compile(model) if compile else model
        model = self.run
        self.wl = wl
        self.device = device
        self.dtype = dtype
        self.variant = variant
        self.scope = None
        self.handles: list = []
        if variant == "gradscope":
            self.scope = gradscope.watch(model, optimizer=self.opt)
        elif variant == "gradscope-tb":
            self.scope = gradscope.watch(model, optimizer=self.opt, log_dir=os.path.join(_tmpdir(), "tb"))
        elif variant == "gradscope-all-every-step":
            # every statistic, activations included, at every step
            self.scope = gradscope.watch(model, optimizer=self.opt, sample_every=1)
        elif variant == "gradscope-every10":
            self.scope = gradscope.watch(model, optimizer=self.opt, every=10)
        elif variant == "naive-item-hooks":
            # what people write by hand: per-parameter hooks with .item() (a host sync per parameter on GPU)
            self.log: list = []
            for name, p in model.named_parameters():
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(self._naive(name)))
        elif variant != "bare" and variant != "detect-anomaly":
            raise ValueError(variant)

    def _naive(self, name: str) -> Callable:
        def hook(p: torch.Tensor) -> None:
            g = p.grad
            self.log.append((name, g.norm().item(), g.abs().max().item(), g.mean().item(), g.std().item()))

        return hook

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.variant == "detect-anomaly":
            # the tool people reach for when a NaN appears: autograd's anomaly mode, over forward and backward
            with torch.autograd.detect_anomaly(check_nan=True):
                self._step(x, y)
        else:
            self._step(x, y)
        self.opt.step()
        if self.scope is not None:
            self.scope.step(loss=self._loss)
        self.opt.zero_grad(set_to_none=True)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.dtype is not None:
            with torch.autocast(device_type=self.device.split(":")[0], dtype=self.dtype):
                loss = self.wl.loss_fn(self.run(x), y)
        else:
            loss = self.wl.loss_fn(self.run(x), y)
        loss.backward()
        self._loss = loss

    def close(self) -> None:
        if self.scope is not None:
            self.scope.close()
        for h in self.handles:
            h.remove()


_TMP: list[str] = []


def _tmpdir() -> str:
    import tempfile

    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="gradscope-bench-"))
    return _TMP[0]


def measure(
    wl: Workload,
    variant: str,
    *,
    device: str,
    dtype: torch.dtype | None,
    warmup: int,
    pairs: int,
    compile: bool = False,
    settle: bool = False,
) -> dict:
    torch.manual_seed(0)
    base = wl.make_model().to(device)
    g = torch.Generator().manual_seed(1)
    batches = [tuple(t.to(device) for t in wl.make_batch(g)) for _ in range(4)]
    bare = Runner(wl, base, device, dtype, "bare", pairs, compile=compile)
    watched = Runner(wl, copy.deepcopy(base), device, dtype, variant, pairs, compile=compile)
    if compile:
        warmup = max(warmup, 3)  # the first steps compile (and recompile once for the backward)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(r: Runner, i: int) -> float:
        x, y = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        r.step(x, y)
        sync()
        return time.perf_counter() - t0

    for i in range(warmup):
        timed(bare, i)
        timed(watched, i)
    settled = settle_history(watched, batches) if settle else 0
    tb, tw, flushed, sampled = [], [], [], []
    scope = watched.scope
    for i in range(pairs):
        if i % 2 == 0:
            a = timed(bare, i)
            b = timed(watched, i)
        else:
            b = timed(watched, i)
            a = timed(bare, i)
        tb.append(a)
        tw.append(b)
        flushed.append(scope is not None and scope.step_count % scope.flush_every == 0)
        sampled.append(scope is not None and (scope.step_count - 1) % scope.sample_every == 0)
    bare.close()
    watched.close()
    ratios = [b / a for a, b in zip(tb, tw)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), 0, max(ratios)]
    return {
        "workload": wl.name,
        "variant": variant,
        "bare_ms": statistics.median(tb) * 1e3,
        "amortised": sum(tw) / sum(tb),
        "median": statistics.median(ratios),
        "iqr": (q[0], q[-1]),
        "pairs": pairs,
        **step_costs(tb, tw, flushed, sampled),
        "settled": settled,
    }


def step_costs(tb: list[float], tw: list[float], flushed: list[bool], sampled: list[bool]) -> dict[str, float]:
    """Watched minus bare time of each pair, split: ``fixed_us`` (median over the ordinary steps),
    ``flush_ms`` and ``sampled_ms`` (mean extra time beyond that of the steps that flushed, and of the
    sampled steps that did not); NaN where no such step was timed."""
    diff = [b - a for a, b in zip(tb, tw)]
    ordinary = [d for d, f, s in zip(diff, flushed, sampled) if not f and not s]
    fixed = statistics.median(ordinary or diff)
    at_flush = [d - fixed for d, f in zip(diff, flushed) if f]
    at_sample = [d - fixed for d, f, s in zip(diff, flushed, sampled) if s and not f]
    nan = float("nan")
    return {
        "fixed_us": fixed * 1e6,
        "flush_ms": statistics.fmean(at_flush) * 1e3 if at_flush else nan,
        "sampled_ms": statistics.fmean(at_sample) * 1e3 if at_sample else nan,
    }


def settle_history(watched: Runner, batches: list) -> int:
    """Train the watched run alone until its host frame has thinned once, ending on a flush; the steps run.

    A run passes ``history`` (2000 recorded steps by default) within minutes; from there on its flushes
    also thin the frame. The 100-300 timed steps of a benchmark never get there unless it settles first.
    """
    scope = watched.scope
    if scope is None or scope.history is None:
        return 0
    i = 0
    while not scope.frame.dropped or scope.step_count % scope.flush_every:
        watched.step(*batches[i % len(batches)])
        i += 1
    return i


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("gradscope").setLevel(logging.CRITICAL)  # findings lines would interleave the table
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--workloads", default=None, help="comma-separated names (default: cpu set, or gpu set on cuda)")
    ap.add_argument("--variants", default="gradscope,gradscope-tb,gradscope-all-every-step,naive-item-hooks")
    ap.add_argument("--pairs", type=int, default=None, help="timed pairs per variant (default by workload)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a few pairs only (smoke test; ratios are noisy)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both the bare and the watched model")
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
    if args.device == "cpu":
        kernels.cpu_kernel()  # loaded (or, with --kernel sync, built) now, before anything is timed
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pool = {
        w.name: w for w in cpu_workloads() + layout_workloads() + extra_workloads() + gpu_workloads() + hf_workloads()
    }
    default = [w.name for w in (gpu_workloads() if args.device.startswith("cuda") else cpu_workloads())]
    if args.device.startswith("cuda") and "hf-gpt2-small" in pool:
        default.append("hf-gpt2-small")  # transformers' own GPT-2 small, when installed
    names = args.workloads.split(",") if args.workloads else default
    default_pairs = {
        "mlp8": 200,
        "mlp128": 100,
        "digits": 150,
        "mlp": 150,
        "cnn": 100,
        "gpt": 60,
        "gpt2-small": 60,
        "resnet50": 60,
        "hf-gpt2": 60,
        "hf-gpt2-small": 60,
    }

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(
        f"gradscope {gradscope.__version__}, torch {torch.__version__}, device {args.device} ({dev}), "
        f"threads {torch.get_num_threads()}, dtype {args.dtype}, compile {args.compile}, CPU kernel {kernels.cpu_kernel_state()}"
    )
    print(
        f"{'workload':<12} {'variant':<24} {'bare ms':>9} {'amortised':>10} {'median':>8} {'IQR':>13} {'pairs':>6} "
        f"{'fixed us':>9} {'flush ms':>9} {'sampled ms':>10}"
    )
    rows = []
    for name in names:
        wl = pool[name]
        print(f"# {wl.name}: {wl.description}")
        for variant in args.variants.split(","):
            pairs = 6 if args.quick else (args.pairs or default_pairs.get(name, 60))
            r = measure(
                wl,
                variant,
                device=args.device,
                dtype=dtype,
                warmup=2 if args.quick else args.warmup,
                pairs=pairs,
                compile=args.compile,
                settle=args.settle,
            )
            rows.append(r)
            print(
                f"{r['workload']:<12} {r['variant']:<24} {r['bare_ms']:>9.2f} {r['amortised']:>9.3f}x {r['median']:>7.3f}x "
                f"{r['iqr'][0]:>6.3f}-{r['iqr'][1]:<6.3f} {r['pairs']:>6} {r['fixed_us']:>9.0f} {r['flush_ms']:>9.2f} "
                f"{r['sampled_ms']:>10.2f}"
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
