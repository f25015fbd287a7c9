"""Run one scenario through ``gradscope.watch`` and record what an independent observer sees.

The observer (``Oracle``) reads the model's gradients with plain torch at every step (host syncs are
fine here: this is the benchmark, not the hot path), so ground truth such as "the first step with a
non-finite gradient" never comes from gradscope itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

import gradscope
from gradscope.report import Finding, Report
from gradscope.sinks.base import Sink, SinkUpdate

__all__ = ["DeadOracle", "Expect", "RunResult", "Scenario", "Setup", "run_scenario"]


class DeadOracle:
    """At every step, the share of each ReLU module's units that output <= 0 for the whole batch.

    Plain torch forward hooks, independent of gradscope's own activation statistics.
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.dead: dict[str, dict[int, float]] = {}
        self.step = 0

    def attach(self, model: nn.Module) -> None:
        for path, m in model.named_modules():
            if isinstance(m, nn.ReLU):
                self.handles.append(m.register_forward_hook(self._hook(path)))

    def before_step(self, step: int) -> None:
        self.step = step

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not module.training or self.step in self.dead.get(path, {}):
                return
            y = out.detach()
            units = y.transpose(0, 1).reshape(y.shape[1], -1) if y.dim() > 2 else y.t()
            self.dead.setdefault(path, {})[self.step] = float((units <= 0).all(dim=1).double().mean())

        return hook

    def onset(self, modules: frozenset[str] | None, threshold: float = 0.5) -> Optional[int]:
        """First step at which one of ``modules`` (any ReLU when None) has ``threshold`` of its units dead."""
        steps = []
        for path, series in self.dead.items():
            if modules is None or path in modules:
                steps += [s for s, v in series.items() if v >= threshold]
        return min(steps) if steps else None

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@dataclass
class Setup:
    """What a scenario trains: built fresh (and seeded) for every run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], tuple[Any, Any]]  # step (1-based) -> (inputs, targets)
    loss_fn: Callable[[Any, Any], torch.Tensor]
    val: Optional[Callable[[nn.Module], float]] = None  # -> validation loss, called every val_every steps
    val_every: int = 10
    accum: int = 1
    scaler: Any = None  # a GradScaler
    scheduler: Any = None  # stepped after every optimizer step
    before_step: Optional[Callable[[int, nn.Module, torch.optim.Optimizer], None]] = None  # fault injection
    backward_hook: Optional[Callable[[int], None]] = None  # called between backward and optimizer step


@dataclass
class Expect:
    """A fault the scenario must produce: its onset step and, where objective, the layer(s) it comes from."""

    onset: Optional[int] = 1  # None: measured by the harness's observer (first NaN, best validation step...)
    origin: Optional[frozenset[str]] = None


@dataclass
class Scenario:
    name: str
    group: str  # "healthy" or the fault kind it is built around
    description: str
    build: Callable[[], Setup]
    expected: dict[str, Expect] = field(default_factory=dict)
    allowed: frozenset[str] = frozenset()  # kinds objectively present too (a consequence): neither required nor false
    steps: int = 200
    seed: int = 0


class _FlushLog(Sink):
    """Records the last step of the flush at which each finding was first reported."""

    def __init__(self) -> None:
        self.reported_at: dict[tuple[str, Optional[str]], int] = {}

    def write(self, update: SinkUpdate) -> None:
        last = int(update.frame.steps[-1]) if len(update.frame) else 0
        for f in update.findings:
            self.reported_at.setdefault((f.kind, f.layer), last)


@dataclass
class RunResult:
    scenario: Scenario
    report: Report
    findings: list[Finding]
    reported_at: dict[tuple[str, Optional[str]], int]
    losses: np.ndarray
    val_losses: dict[int, float]
    first_nonfinite: Optional[int]
    grad_norms: np.ndarray
    extra: dict[str, Any]
    seconds: float
    rule_seconds: float


def run_scenario(
    sc: Scenario,
    *,
    watch_kwargs: Optional[dict[str, Any]] = None,
    observers: tuple[Any, ...] = (),
) -> RunResult:
    """Train ``sc`` for ``sc.steps`` steps under ``gradscope.watch`` (defaults unless overridden).

    ``observers`` are objects with optional ``attach(model)``, ``before_step(step)``,
    ``on_backward(step, model)``, ``after_step(step, scope)`` (after ``scope.step``) and ``detach()``
    methods (the SageMaker-baseline probes and the alert-latency probes use them).
    """
    import time

    torch.manual_seed(sc.seed)
    setup = sc.build()
    model, opt = setup.model, setup.optimizer
    log = _FlushLog()
    kwargs = {"optimizer": opt, "sinks": [log]}
    kwargs.update(watch_kwargs or {})
    for ob in observers:
        if hasattr(ob, "attach"):
            ob.attach(model)
    losses: list[float] = []
    val_losses: dict[int, float] = {}
    norms: list[float] = []
    first_nonfinite: Optional[int] = None
    t0 = time.perf_counter()
    scope = gradscope.watch(model, **kwargs)
    rule_time = [0.0]
    engine = scope.engine
    base = type(engine)

    class TimedEngine(base):  # type: ignore[misc, valid-type]
        # Timed at class level: report()'s provisional pass deep-copies the engine, and a bound method
        # stored on the instance would survive the copy and run the real engine in final mode.
        def run(self, ctx: Any) -> list:
            t = time.perf_counter()
            try:
                return base.run(self, ctx)
            finally:
                if self is engine:
                    rule_time[0] += time.perf_counter() - t

    engine.__class__ = TimedEngine
    try:
        for step in range(1, sc.steps + 1):
            if setup.before_step is not None:
                setup.before_step(step, model, opt)
            for ob in observers:
                if hasattr(ob, "before_step"):
                    ob.before_step(step)
            total = 0.0
            model.train()
            for micro in range(setup.accum):
                x, y = setup.batch(step if setup.accum == 1 else (step - 1) * setup.accum + micro + 1)
                loss = setup.loss_fn(model(x), y) / setup.accum
                (setup.scaler.scale(loss) if setup.scaler is not None else loss).backward()
                total += float(loss.detach())
            if setup.backward_hook is not None:
                setup.backward_hook(step)
            # The independent observer: plain torch reads of the gradients the optimizer will use.
            grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
            if setup.scaler is not None:
                inv = 1.0 / setup.scaler.get_scale()
                grads = [g * inv for g in grads]
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            skipped_by_scaler = setup.scaler is not None and not finite
            if not finite and not skipped_by_scaler and first_nonfinite is None:
                first_nonfinite = step
            norms.append(
                math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) if grads and finite else math.inf
            )
            for ob in observers:
                if hasattr(ob, "on_backward"):
                    ob.on_backward(step, model)
            if setup.scaler is not None:
                setup.scaler.step(opt)
                setup.scaler.update()
            else:
                opt.step()
            val = None
            if setup.val is not None and step % setup.val_every == 0:
                model.eval()
                with torch.no_grad():
                    val = float(setup.val(model))
                model.train()
                val_losses[step] = val
            losses.append(total)
            scope.step(loss=total, val_loss=val)
            for ob in observers:
                if hasattr(ob, "after_step"):
                    ob.after_step(step, scope)
            opt.zero_grad(set_to_none=True)
            if setup.scheduler is not None:
                setup.scheduler.step()
    finally:
        report = scope.close()
        for ob in observers:
            if hasattr(ob, "detach"):
                ob.detach()
    seconds = time.perf_counter() - t0
    return RunResult(
        scenario=sc,
        report=report,
        findings=list(report.findings),
        reported_at=dict(log.reported_at),
        losses=np.array(losses),
        val_losses=val_losses,
        first_nonfinite=first_nonfinite,
        grad_norms=np.array(norms),
        extra={"frame": scope.frame, "layers_by_depth": scope.layers_by_depth()},
        seconds=seconds,
        rule_seconds=rule_time[0],
    )
