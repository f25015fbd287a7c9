"""Host-side cost at scale: flushes, ``report()`` and the HTML of runs with many layers and many steps.

What monitoring does on the host (the statistics frame, the layer aggregates, the rules, the tables
behind the plots) works on whole NumPy arrays (steps x parameters), so its cost grows linearly with
the run and the model and stays small. This script measures it on models and runs chosen to be large
where the device work is small (many ``Linear(8, 8)`` layers), and on synthetic histories, and prints
the times. Times are the CPU time of the process (as in ``overhead_cpu.py``: on a machine shared with
other jobs, wall-clock times of a few milliseconds move by several times), with one intra-op thread.
It judges nothing (times are printed for context, never asserted)::

    python benchmarks/host_scale.py                      # every case
    python benchmarks/host_scale.py --cases flush,report --quick

Cases:

* ``flush``: a watched ``nn.Sequential`` of 1,000 ``Linear(8, 8)`` layers, 50 steps, ``flush_every=50``:
  the host time of the flush at step 50 (moving the rows into the frame and running every rule over
  all 50 rows, the live evaluations off), then in a default run, where live evaluations judge most
  rows before it (their time is printed).
* ``wide``: the same with 5,000 layers: the flush at ``close()``, then the HTML report.
* ``report``: ``scope.report()`` after 100,000 steps of a 100-layer model (real steps, then
  synthetic rows put into the frame, all judged by that ``report()``), then ``str(report)``.
* ``html``: the HTML report of 200 layers x 4,000 steps (synthetic rows, ``history=None``).
* ``step``: the host work of an ordinary step with 16, 256 and 2,048 parameter tensors (8, 128 and
  1,024 ``Linear(8, 8)`` layers): ``scope.step()``, on steps without and with the live screen, and
  the capture of the optimizer's pre-hook, caches as the step leaves them and after touching 64 MiB.
  ``scope.step()`` makes the same calls whatever the model (none loops over the parameters); the
  screen reads every parameter's new rows, as often as its budget allows; the capture hands every
  gradient to the compiled kernel in one call, which reads each tensor's metadata (tens of
  nanoseconds a tensor when they are in the caches).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradscope
from gradscope.stats.moments import MOMENT_INDEX, MOMENTS


def chain(n_layers: int) -> nn.Sequential:
    """``n_layers`` ``Linear(8, 8)`` layers with Tanh every 8 layers: many layers, little compute."""
    mods: list[nn.Module] = []
    for i in range(n_layers):
        mods.append(nn.Linear(8, 8))
        if i % 8 == 7:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def train(scope: Any, model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss=loss)


class Timer:
    """Wraps methods of one object and records the CPU time of each call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    def wrap(self, obj: Any, name: str) -> None:
        fn: Callable[..., Any] = getattr(obj, name)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.calls.setdefault(name, []).append(time.process_time() - t0)

        setattr(obj, name, timed)


def synthetic_rows(frame: Any, first_step: int, n: int, rng: np.random.Generator, *, sample_every: int = 10) -> dict:
    """``n`` rows for ``frame`` (steps from ``first_step``): moments of gradients that shrink slowly, all finite.

    Every parameter has a gradient; every ``sample_every``-th step is sampled (its activations taken).
    """
    sch = frame.schema
    P, C = len(sch.param_names), len(MOMENTS) + len(sch.custom)
    numel = np.asarray(sch.numels, dtype=np.float64)
    steps = np.arange(first_step, first_step + n, dtype=np.int64)
    scale = (1e-2 / np.sqrt(1.0 + steps / 1000.0))[:, None] * rng.uniform(0.5, 2.0, size=(1, P))
    m = np.zeros((n, P, C))
    m[..., MOMENT_INDEX["sumsq"]] = numel * scale**2 * rng.uniform(0.9, 1.1, size=(n, P))
    m[..., MOMENT_INDEX["sum"]] = np.sqrt(numel) * scale * rng.standard_normal((n, P))
    m[..., MOMENT_INDEX["min"]] = -3 * scale
    m[..., MOMENT_INDEX["max"]] = 3 * scale
    m[..., MOMENT_INDEX["nnz"]] = numel
    m[..., MOMENT_INDEX["psumsq"]] = numel * 0.1
    m[..., MOMENT_INDEX["dsumsq"]] = numel * (1e-3 * scale) ** 2
    sampled = (steps - 1) % sample_every == 0
    A = len(sch.act_modules)
    act = np.full((n, A, 3), np.nan)
    act[sampled] = rng.uniform(0.0, 0.3, size=(int(sampled.sum()), A, 3))
    width = len(frame.scalar_names)
    scalars = np.full((n, width), np.nan)
    if width:
        scalars[:, 0] = 1.0 / np.sqrt(steps)
    return {
        "steps": steps,
        "skipped": np.zeros(n, dtype=bool),
        "has_grad": np.ones((n, P), dtype=bool),
        "trainable": np.ones((n, P), dtype=bool),
        "sampled": sampled,
        "moments": m,
        "act": act,
        "scalars": scalars,
    }


def fill(scope: Any, until: int, rng: np.random.Generator, chunk: int = 5000) -> None:
    """Put synthetic rows into a scope's frame up to step ``until`` (what many real steps would have left)."""
    frame = scope.frame
    recorder = scope._recorder
    step = int(frame.steps[-1]) + 1 if len(frame) else 1
    while step <= until:
        n = min(chunk, until - step + 1)
        frame.append(synthetic_rows(frame, step, n, rng), recorder.scalar_names)
        step += n
    scope._step = until  # what scope.step() would have counted


def case_flush(n_layers: int, steps: int) -> None:
    # Twice: with the live evaluations off, the flush at step `steps` judges all its rows (the cost of
    # a flush that does everything); with the defaults, the second flush (step 2 * steps) is timed: the
    # live cadence judges most of its rows before (a step this slow gets live evaluations), and the
    # flush leaves the rest to the next one (the first flush of a run always judges: the cadence is
    # not settled yet).
    for live in (False, True):
        torch.manual_seed(0)
        model = chain(n_layers)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        scope = gradscope.watch(model, optimizer=opt, flush_every=steps, report_path=None)
        if not live:
            scope._diagnosis.cadence.budget = 1e-12  # k = flush_every: no screen, no live evaluation
        timer = Timer()
        timer.wrap(scope._diagnosis, "flush")
        timer.wrap(scope._diagnosis, "_judge")
        timer.wrap(scope._recorder, "commit")
        t0 = time.process_time()
        train(scope, model, opt, steps)
        before = len(timer.calls.get("_judge", []))
        if live:
            train(scope, model, opt, steps)
        loop = time.process_time() - t0
        flush = timer.calls.get("flush", [])[-1:]
        judges = list(timer.calls.get("_judge", []))  # (a copy: close() appends its own)
        if live:
            judges = judges[before:]  # those since the first flush
        commit = timer.calls.get("commit", [])[-1:]
        t0 = time.process_time()
        scope.close()
        close = time.process_time() - t0
        n_params = len(scope.schema.param_names)
        what = (
            f"live evaluations since the first flush: {len(judges)}, {1e3 * sum(judges):.1f} ms"
            if live
            else f"rules {1e3 * (judges[-1] if judges else 0):.1f} ms, over all {steps} rows"
        )
        print(
            f"flush   {n_layers} layers ({n_params} tensors) x {steps} steps, live {'on' if live else 'off'}"
            f"{' (the second flush)' if live else ''}: "
            f"flush {1e3 * sum(flush):.1f} ms (commit {1e3 * sum(commit):.1f} ms; {what}); "
            f"close() {1e3 * close:.1f} ms; training loop {loop:.2f} s"
        )


def case_wide(n_layers: int, steps: int, html: bool) -> None:
    torch.manual_seed(0)
    model = chain(n_layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scope = gradscope.watch(model, optimizer=opt, flush_every=steps + 1)
    timer = Timer()
    timer.wrap(scope._diagnosis, "flush")
    timer.wrap(scope._diagnosis, "_judge")
    train(scope, model, opt, steps)
    live = sum(timer.calls.get("_judge", []))
    t0 = time.process_time()
    report = scope.close()
    close = time.process_time() - t0
    flush = timer.calls.get("flush", [0.0])[-1]
    print(
        f"wide    {n_layers} layers x {steps} steps: flush at close() {1e3 * flush:.0f} ms, close() {1e3 * close:.0f} ms, "
        f"live evaluations {1e3 * live:.0f} ms"
    )
    if html:
        t0 = time.process_time()
        text = report.to_html() if hasattr(report, "to_html") else _render(report)
        print(
            f"wide    {n_layers} layers x {steps} steps: HTML {time.process_time() - t0:.2f} s ({len(text) // 1024} KiB)"
        )


def _render(report: Any) -> str:
    from gradscope.views.html import render_html

    return render_html(report)


def case_report(n_layers: int, total_steps: int, history: Any) -> None:
    torch.manual_seed(0)
    model = chain(n_layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kw = {} if history == "default" else {"history": history}
    scope = gradscope.watch(model, optimizer=opt, **kw)
    train(scope, model, opt, 20)
    scope.report()  # flush the real rows
    fill(scope, total_steps, np.random.default_rng(0))
    t0 = time.process_time()
    report = scope.report()
    t_report = time.process_time() - t0
    t0 = time.process_time()
    text = str(report)
    t_str = time.process_time() - t0
    t0 = time.process_time()
    n_rows = len(report.stats)
    t_stats = time.process_time() - t0
    scope.close()
    print(
        f"report  {n_layers} layers x {total_steps} steps (history={history}, {len(scope.frame)} rows kept): "
        f"report() {t_report:.2f} s (every rule over every row), str(report) {t_str:.2f} s ({len(text.splitlines())} lines), "
        f"report.stats {t_stats:.2f} s ({n_rows} rows, built when read)"
    )


def case_html(n_layers: int, total_steps: int) -> None:
    torch.manual_seed(0)
    model = chain(n_layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scope = gradscope.watch(model, optimizer=opt, history=None)
    train(scope, model, opt, 10)
    scope.report()
    fill(scope, total_steps, np.random.default_rng(1))
    t0 = time.process_time()
    report = scope.close()
    t_close = time.process_time() - t0
    t0 = time.process_time()
    text = _render(report)
    print(
        f"html    {n_layers} layers x {total_steps} steps: close() {t_close:.2f} s, HTML {time.process_time() - t0:.2f} s "
        f"({len(text) // 1024} KiB, report.stats {len(report.stats)} rows)"
    )


def warm_up() -> None:
    """One small watched run with a report and its HTML, so that imports and first calls are not timed."""
    model = chain(4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scope = gradscope.watch(model, optimizer=opt, flush_every=5)
    train(scope, model, opt, 12)
    report = scope.close()
    str(report)
    _render(report)


def case_step(sizes: list[int], steps: int, evict_mib: int) -> None:
    # The host work of an ordinary step (not sampled, no flush) as the number of parameter tensors
    # grows: scope.step(), and the capture the optimizer's pre-hook makes (every gradient handed to the
    # compiled kernel, or the operators, in one call). scope.step() is split by whether the live screen
    # ran in it: the screen reads the new rows of every parameter, as often as its share of the live
    # budget allows (a quarter of 1 % of the step time), so it runs at most steps of a slow step and
    # few of a fast one. Each step is timed as it comes (caches warm), and every other one after
    # touching `evict_mib` MiB, as a training step with large buffers leaves the caches (the same for
    # every size).
    big = torch.ones(evict_mib * (1 << 20) // 4)
    for n_layers in sizes:
        torch.manual_seed(0)
        model = chain(n_layers)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        scope = gradscope.watch(model, optimizer=opt)
        timer = Timer()
        timer.wrap(scope._recorder, "_capture_for_step")
        screen = scope._diagnosis.screen
        g = torch.Generator().manual_seed(0)
        times: dict[tuple[str, bool], list[float]] = {}
        for i in range(1, steps + 1):
            x = torch.randn(16, 8, generator=g)
            cold = i % 2 == 1
            opt.zero_grad(set_to_none=True)
            loss = model(x).pow(2).mean()
            loss.backward()
            if cold:
                big.mul_(1.0)  # (every byte read and written)
            opt.step()
            t0 = time.process_time()
            scope.step(loss=loss)
            t1 = time.process_time()
            if (i - 1) % scope.sample_every == 0 or i % scope.flush_every == 0 or i <= 20:
                continue
            key = "screened" if screen.screened_step == i else "scope"
            times.setdefault((key, cold), []).append(t1 - t0)
            times.setdefault(("capture", cold), []).append(timer.calls["_capture_for_step"][-1])
        scope.close()

        def med(key: str, cold: bool, times: dict[tuple[str, bool], list[float]] = times) -> str:
            v = times.get((key, cold))
            return f"{float(np.median(v)) * 1e6:.0f}" if v else "-"

        n_tensors = len(list(model.parameters()))
        n_screened = len(times.get(("screened", False), [])) + len(times.get(("screened", True), []))
        n_all = n_screened + len(times.get(("scope", False), [])) + len(times.get(("scope", True), []))
        print(
            f"step    {n_layers} layers ({n_tensors} tensors): scope.step() {med('scope', False)} / "
            f"{med('scope', True)} us (warm / after {evict_mib} MiB), with the live screen "
            f"{med('screened', False)} / {med('screened', True)} us ({n_screened} of {n_all} steps); "
            f"the optimizer pre-hook's capture {med('capture', False)} / {med('capture', True)} us"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="flush,wide,report,html,step")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run: the figures mean nothing)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    q = args.quick
    print(f"gradscope {gradscope.__version__}, torch {torch.__version__}, numpy {np.__version__}, CPU time, 1 thread")
    warm_up()
    for case in args.cases.split(","):
        if case == "flush":
            case_flush(40 if q else 1000, 10 if q else 50)
        elif case == "wide":
            case_wide(60 if q else 5000, 4 if q else 12, html=True)
        elif case == "report":
            case_report(10 if q else 100, 3000 if q else 100_000, "default")
        elif case == "html":
            case_html(12 if q else 200, 300 if q else 4000)
        elif case == "step":
            case_step([8, 64] if q else [8, 128, 1024], 100 if q else 1000, 64)
        else:
            ap.error(f"unknown case {case!r}; expected flush, wide, report, html or step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
