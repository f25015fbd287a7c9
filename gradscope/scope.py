"""GradScope: wiring and lifecycle. It builds the parts and runs step, flush, report and close.

The hot path (optimizer hooks, the device buffer) is :mod:`gradscope.capture.step`; the forward order
is :mod:`gradscope.capture.order`. ``scope.step()`` ends a step; every ``flush_every`` recorded steps
one device-to-host copy moves the rows into the frame, the rules run and the sinks write.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn as nn

from gradscope.capture.activations import ActivationMonitor
from gradscope.capture.distributed import DistributedContext
from gradscope.capture.hooks import HookManager
from gradscope.capture.layout import unwrap_model
from gradscope.capture.live import Diagnosis, stop_message
from gradscope.capture.order import ForwardOrder
from gradscope.capture.step import StepRecorder, scalar_value
from gradscope.capture.target import check_arguments, is_compiled, unwrap_optimizer, watchable_layout
from gradscope.errors import ConfigurationError, GradientHealthError, GradscopeWarning, NonFiniteGradientError
from gradscope.findings import Finding
from gradscope.options import DEFAULT_HISTORY, WatchOptions
from gradscope.report import Report
from gradscope.rules.engine import RuleEngine, RuleSpec
from gradscope.sinks.base import ScopeInfo, Sink
from gradscope.sinks.registry import build_sink
from gradscope.stats.moments import MomentPlan

__all__ = ["GradScope", "watch"]

# Models watched by an open scope (the unwrapped module), and the open scopes (flushed at exit).
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_OPEN: weakref.WeakSet[GradScope] = weakref.WeakSet()


@atexit.register
def _close_open_scopes() -> None:
    for scope in list(_OPEN):
        try:
            # Not collective: other ranks may be gone or still training (see GradScope._close).
            scope._close(collective=False, ended_by="interpreter exit")
        except Exception:  # at interpreter exit, never raise
            pass


class GradScope:
    """Watches one model's gradients; build it with :func:`watch`.

    Use as a context manager, or call :meth:`close`. See :func:`watch` for the arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        options: WatchOptions | None = None,
    ) -> None:
        options = WatchOptions() if options is None else options
        # -- validate everything before touching the model ------------------------------------------
        check_arguments(model, optimizer)
        optimizer = unwrap_optimizer(optimizer)
        self.options = options
        self.every, self.flush_every, self.sample_every = options.every, options.flush_every, options.sample_every
        self.history, self.report_path = options.history, options.report_path
        self.stat_names = options.stat_names(has_optimizer=optimizer is not None)
        activations, log_dir, writer = options.activations, options.log_dir, options.writer
        target = unwrap_model(model)
        if target in _WATCHED:
            raise ConfigurationError(
                f"This {type(target).__name__} is already watched by an open gradscope scope. Close that scope "
                "(scope.close() or leave its `with` block) before watching the model again, or keep using it."
            )
        layout = watchable_layout(target)
        self.model, self.module, self.optimizer, self.layout = model, target, optimizer, layout
        self.on_nonfinite = options.on_nonfinite
        self._hooks = HookManager()

        plan = MomentPlan.for_statistics(self.stat_names)
        # Activation hooks would be traced into a compiled graph; under torch.compile they are off.
        self.compiled = is_compiled(model)
        acts = ActivationMonitor(target, self._hooks) if activations and not self.compiled else None
        self._dist = DistributedContext.detect(layout.tensors, options.distributed)
        self._order = ForwardOrder(layout, self._hooks)
        act_paths = acts.paths if acts else []
        self.engine = RuleEngine(options.build_rules())
        self.engine.check_requirements(
            self.stat_names, activations=bool(act_paths) or (activations and not self.compiled)
        )
        self.device = next(t.device for t in layout.tensors if t.requires_grad)
        self._recorder = StepRecorder(
            layout=layout,
            plan=plan,
            options=options,
            stat_names=self.stat_names,
            optimizer=optimizer,
            device=self.device,
            acts=acts,
            dist=self._dist,
            hooks=self._hooks,
            warn=self._warn,
            problem=self._problem,
        )
        self.schema, self.frame = self._recorder.schema, self._recorder.frame
        self._sinks: list[Sink] = [build_sink(s) for s in options.sinks]
        if not self._dist.writes:
            self._sinks = []  # distributed: only rank 0 writes; the other ranks never open a sink
        elif log_dir is not None or writer is not None:
            from gradscope.sinks.tensorboard import TensorBoardSink

            tb = options.tensorboard_kwargs()
            self._sinks.append(
                TensorBoardSink(writer=writer, **tb) if writer is not None else TensorBoardSink(log_dir, **tb)
            )

        # -- state -------------------------------------------------------------------------------------
        self._step = 0
        self._closed = False
        self._warned: set[str] = set()
        self._errors: list[str] = []
        self._ended_by: str | None = None
        for note in self._dist.notes:
            self._problem("distributed", note)
        self._diagnosis = Diagnosis(
            engine=self.engine, recorder=self._recorder, order=self._order, options=options,
            has_optimizer=optimizer is not None, dist=self._dist, sinks=self._sinks, problem=self._problem,
        )  # fmt: skip

        # -- attach: from here on the model carries hooks, so failures must clean up ---------------------
        try:
            self._recorder.attach(type(target).__name__, self._sinks)
            if not self.compiled:
                # Learn the depth order of layers from the first forward pass (removed after step 1).
                self._order.attach(target, acts.entries if acts else [])
            info = ScopeInfo(
                layout=layout,
                model_name=type(target).__name__,
                stats=self.stat_names,
                every=self.every,
                activation_modules=act_paths,
            )
            for sink in self._sinks:
                sink.open(info)
        except BaseException:
            self._hooks.remove_all()
            raise
        _WATCHED.add(target)
        _OPEN.add(self)
        self._recorder.begin(self._step + 1)

    # -- public API ----------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """How many times :meth:`step` has been called."""
        return self._step

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def layers_by_depth(self) -> list[str]:
        """Layer keys in the order their modules first ran forward (input side first)."""
        return self._order.layers_by_depth()

    def step(self, loss: Any = None, val_loss: Any = None, **scalars: Any) -> None:
        """End one optimizer step: record the statistics of the gradients it used.

        Call it once per optimizer step, after ``opt.step()`` (and, without ``optimizer=``, before
        ``opt.zero_grad()``). Under gradient accumulation that is once per accumulated step.

        Args:
            loss: the training loss of the step: a 0-d tensor on any device, or a Python number. Tensors
                stay on the device (no sync); NaN is recorded as NaN.
            val_loss: a validation loss when you have one (the overfitting rule needs it).
            **scalars: any other scalars to record (``lr=...``, ``accuracy=...``).

        Raises:
            ConfigurationError: a scalar is not a number or a one-element tensor, or the scope is closed.
            NonFiniteGradientError: with ``on_nonfinite="raise"``, when a gradient holds NaN or Inf.
            GradientHealthError: a finding that ``stop_on`` selects was confirmed (by this step's
                evaluation, or by a ``flush()`` since the previous step).
        """
        if self._closed:
            raise ConfigurationError(
                "This gradscope scope is closed; scope.step() can no longer be called. Watch again."
            )
        named = {"loss": loss, "val_loss": val_loss, **scalars}
        values = {k: scalar_value(k, v) for k, v in named.items() if v is not None}
        diagnosis = self._diagnosis
        diagnosis.cadence.step_started()
        self._step += 1
        self._order.detach()
        recorder = self._recorder
        if recorder.pending is not None:
            diagnosis.recorded()
        try:
            if recorder.finish(values, self._step):
                self._raise_nonfinite()
        except NonFiniteGradientError:
            raise
        except Exception as exc:  # monitoring must never stop training
            self._problem("step", f"recording step {self._step} failed: {type(exc).__name__}: {exc}")
        if recorder.end_step():
            self._warn(
                "compiled-activations",
                "The watched model runs under torch.compile, so gradscope takes no activation statistics "
                "(dead / saturated units); gradient statistics are unaffected. Watch the compiled module, "
                "or pass activations=False, to silence this.",
            )
        if diagnosis.unflushed >= self.flush_every:
            self.flush()
        else:
            diagnosis.live(self._step)
        recorder.begin(self._step + 1)
        diagnosis.cadence.step_ended()
        stop = diagnosis.take_stop()
        if stop:
            self._stop(stop)

    def flush(self) -> list:
        """Copy buffered statistics to the host, run the rules and write the sinks now.

        In a distributed run (see :mod:`gradscope.capture.distributed`) this is collective: call it on
        every rank. It never raises for ``stop_on``: a finding it confirms that ``stop_on`` selects
        makes the next ``scope.step()`` raise.

        Returns:
            The findings first reported by this flush.
        """
        return self._flush(final=False)

    def report(self) -> Report:
        """The :class:`Report` of everything recorded so far: what ``close()`` would say if the run ended now.

        Before ``close()``, the rules run once more, in final mode, on a copy of their state: findings
        that only this judgement of the partial window gives are marked ``provisional`` (later steps
        can still withdraw them; outputs written during the run never hold them).
        ``report.meta["live"]`` says up to which step it judged. Never collective, never raises for
        ``stop_on``: in a distributed run it judges what the last flush reduced plus this rank's rows
        since (``meta["live"]["rank_local_steps"]``; sharded parameters have no values there).
        """
        if self._closed:
            return self._make_report()
        if not self._dist.active:
            self._flush(final=False)
        extra, frame, live = self._diagnosis.provisional(self._step)
        return self._make_report(extra=extra, frame=frame, live=live)

    def close(self) -> Report:
        """Final flush, close the sinks and remove every hook (idempotent). Returns the report.

        Writes ``report_path`` (atomically) when one was given. Collective in a distributed run.
        """
        return self._close(collective=True)

    def _close(self, *, collective: bool, ended_by: str | None = None) -> Report:
        if self._closed:
            return self._make_report()
        if ended_by is not None and self._ended_by is None:
            self._ended_by = ended_by
        try:
            self._flush(final=True, collective=collective)
            report = self._make_report()
            for sink in self._sinks:
                try:
                    sink.close(report)
                except Exception as exc:
                    self._problem(f"sink-close-{type(sink).__name__}", f"{type(sink).__name__}.close failed: {exc}")
            if self.report_path is not None and self._dist.writes:
                try:
                    self._make_report().to_json(self.report_path)  # atomic: temporary file + rename
                except Exception as exc:
                    self._problem("report-path", f"writing the report to {self.report_path!r} failed: {exc}")
        finally:
            self._closed = True
            self._recorder.close()
            self._hooks.remove_all()
            _WATCHED.discard(self.module)
            _OPEN.discard(self)
        return self._make_report()

    def __enter__(self) -> GradScope:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Also on exceptions (NaN, KeyboardInterrupt): flush what was recorded, write the outputs, then
        # let it propagate. With an exception, other ranks may not reach close(): no collectives then.
        if exc_type is None:
            self.close()
        else:
            self._close(collective=False, ended_by=exc_type.__name__)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"GradScope({type(self.module).__name__}, {len(self.layout.params)} params in "
            f"{len(self.layout.layers)} layers, step={self._step}, {state})"
        )

    # -- flush, rules, sinks ---------------------------------------------------------------------------
    def _flush(self, *, final: bool, collective: bool = True) -> list:
        return self._diagnosis.flush(final=final, collective=collective, step_count=self._step)

    def _stop(self, found: list) -> None:
        written = None
        if self.report_path is not None and self._dist.writes:
            try:  # confirmed findings only: the file never contradicts the one close() writes
                self._make_report().to_json(self.report_path)
                written = os.fspath(self.report_path)
            except Exception as exc:
                self._problem("report-path", f"writing the report to {self.report_path!r} failed: {exc}")
        report = self._make_report()
        raise GradientHealthError(stop_message(found, self.options.stop_on, self._step, written), report=report)

    def _raise_nonfinite(self) -> None:
        new = self._flush(final=False)
        found = [f for f in self.engine.findings if f.kind == "nonfinite_gradients" and f.step == self._step] or [
            f for f in new if f.severity == "error"
        ]
        if found:
            msg = "\n".join(str(f) for f in found)
        else:
            bad = self._recorder.nonfinite_layer(self._order.depth_order())
            msg = f"Non-finite gradient at step {self._step}; first layer in backward order: {bad or '(unknown)'!r}."
        raise NonFiniteGradientError(msg, report=self._make_report())

    def _make_report(self, extra: Sequence = (), frame: Any = None, live: dict | None = None) -> Report:
        recorder, frame = self._recorder, self.frame if frame is None else frame
        meta = {
            "model": type(self.module).__name__,
            "parameters": int(sum(p.numel for p in self.layout.params)),
            "trainable_parameters": int(sum(t.numel() for t in self.layout.tensors if t.requires_grad)),
            "tensors": len(self.layout.params),
            "layers": len(self.layout.layers),
            "layers_by_depth": self.layers_by_depth(),
            "device": str(self.device),
            "steps": self._step,
            "recorded_steps": len(self.frame) + recorder.waiting,
            "every": self.every,
            "sample_every": self.sample_every,
            "stats": list(self.stat_names),
            "rules": [r.name for r in self.engine.rules],
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "history": self.frame.history_info(),
            "compiled": self.compiled,
            "activations": recorder.acts is not None and bool(recorder.acts.entries),
        }
        if self._dist.world_size > 1:
            meta["distributed"] = {**self._dist.describe(), "unreduced_rows_dropped": recorder.unreduced_rows}
        if self._ended_by is not None:
            meta["ended_by"] = self._ended_by
        if live is not None:
            meta["live"] = live
        return Report(
            findings=[*self.engine.findings, *extra],
            frame=frame,
            skipped_steps=list(recorder.skipped_steps),
            frozen=self.layout.frozen,
            meta=meta,
            errors=[*self._errors, *self.engine.errors],
        )

    # -- problems --------------------------------------------------------------------------------------
    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, GradscopeWarning, stacklevel=3)

    def _problem(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._errors.append(message)
        self._warn(key, f"gradscope: {message} (training goes on)")


def watch(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    writer: Any = None,
    every: int = 1,
    flush_every: int = 50,
    stats: Union[str, Iterable[str], None] = None,
    rules: RuleSpec = "all",
    thresholds: Mapping[str, Mapping[str, Any]] | None = None,
    activations: bool = True,
    sample_every: int = 10,
    on_nonfinite: str = "record",
    on_finding: Callable[[Finding], Any] | None = None,
    stop_on: Union[str, Iterable[str], None] = None,
    sinks: Sequence[Union[Sink, str]] = (),
    history: int | None = DEFAULT_HISTORY,
    report_path: str | os.PathLike[str] | None = None,
    distributed: str = "auto",
    histogram_every: int | None = 100,
    histogram_weights: bool = False,
    figure_every: int | None = 1000,
) -> GradScope:
    """Watch ``model``'s gradients: per-layer statistics on the device, rules, and outputs.

    Args:
        model: any ``nn.Module`` (also DDP-, DataParallel-, FSDP2- or ``torch.compile``-wrapped; watch an
            FSDP2 model after ``fully_shard``, which replaces its parameters). Under ``torch.compile`` no
            activation statistics are taken (their hooks would be traced into the graph).
        optimizer: the optimizer your loop steps. With it, statistics are taken right before its step
            (after accumulation, ``GradScaler.unscale_``, clipping and DDP all-reduce), steps it skips are
            recorded as skipped, and the update ratio is available.
        log_dir: write a TensorBoard run here.
        writer: or write into your own ``torch.utils.tensorboard.SummaryWriter``.
        every: record every ``every``-th step (1 = every step; steps 1, 1+every, ...).
        flush_every: copy statistics to the host, run the rules and write outputs every this many
            recorded steps (one device-to-host copy each time).
        stats: statistic names to collect; default all built-ins (``update_ratio`` only with an optimizer).
        rules: ``"all"`` (default), ``"none"``, or a list of rule names / Rule instances; ``"-name"`` removes one.
        thresholds: per-rule threshold overrides, ``{"vanishing_gradients": {"ratio": 1e-4}}``.
        activations: measure ReLU/tanh/sigmoid outputs (dead and saturated units) on sampled steps.
        sample_every: every this many steps (a multiple of ``every``), also take the statistics that cost
            extra passes over gradients and weights (mean, std, abs_max, zero_fraction, param_norm,
            update_ratio) and the activation statistics. ``l2_norm``, ``rms`` and ``nonfinite_count``
            come from a single pass and are taken at every recorded step. ``sample_every=1`` takes
            everything every step (see docs/performance.md for what each costs).
        on_nonfinite: ``"record"`` (a finding at the next flush) or ``"raise"`` (stop at the step where a
            gradient first holds NaN/Inf, naming the layer; costs one host sync per recorded step).
        on_finding: called with each new :class:`Finding`, once, on the training thread, at the step
            it becomes visible (an exception it raises is reported as a warning; training goes on).
        stop_on: ``"error"``, ``"warning"`` or rule kinds: when such a finding becomes visible,
            ``scope.step()`` raises :class:`GradientHealthError` naming it (the report is still
            written on the way out of the ``with`` block). None (default): never stop.
        sinks: extra outputs (Sink instances or registered names).
        history: recorded steps kept at full resolution on the host (default 2000, at least 100 and
            ``flush_every``). Older steps are thinned, not dropped: kept at a stride of ``sample_every``
            steps that doubles whenever they outnumber ``history``, so memory stays bounded over any
            run length while ``report.stats`` still spans the run (``report.meta["history"]`` says
            from which step it is full). ``None`` keeps every step.
        report_path: write the JSON report here at ``close()``, also when the loop raises (NaN,
            ``KeyboardInterrupt``) and at interpreter exit; atomically (temporary file + rename), so a
            killed process leaves the previous complete file or none, never a truncated one.
        distributed: ``"auto"`` (default): under ``torch.distributed`` with several ranks, statistics
            are global (DDP gradients are already all-reduced; FSDP2/DTensor shards are combined at each
            flush), scalars are averaged over ranks, and only rank 0 writes outputs. ``flush()`` and
            ``close()`` are then collective. ``"local"``: every rank is on its own (shard statistics).
        histogram_every: with ``log_dir`` or ``writer``: histograms of each layer's gradients, computed on
            the device, on the first recorded step of every this many steps; None: no histograms.
        histogram_weights: with ``log_dir`` or ``writer``: also histograms of the weights.
        figure_every: with ``log_dir`` or ``writer``: the gradient-flow figure every this many steps
            (and at ``close()``); None: only at ``close()``. See docs/tensorboard.md.

    Returns:
        A :class:`GradScope`; use it as a context manager or call ``close()``.

    Raises:
        ConfigurationError: for any invalid argument, before anything is attached to the model.

    Example:
        >>> import torch, gradscope
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradscope.watch(model, optimizer=opt) as scope:
        ...     for _ in range(3):
        ...         loss = model(torch.randn(16, 4)).pow(2).mean()
        ...         loss.backward()
        ...         opt.step()
        ...         scope.step(loss=loss)
        ...         opt.zero_grad()
        >>> scope.report().steps
        3
    """
    options = WatchOptions(
        log_dir=log_dir,
        writer=writer,
        every=every,
        flush_every=flush_every,
        stats=stats,
        rules=rules,
        thresholds=thresholds,
        activations=activations,
        sample_every=sample_every,
        on_nonfinite=on_nonfinite,
        on_finding=on_finding,
        stop_on=stop_on,
        sinks=sinks,
        history=history,
        report_path=report_path,
        distributed=distributed,
        histogram_every=histogram_every,
        histogram_weights=histogram_weights,
        figure_every=figure_every,
    )
    return GradScope(model, optimizer=optimizer, options=options)
