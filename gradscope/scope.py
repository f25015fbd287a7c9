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
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn as nn

from gradscope.capture import lifecycle
from gradscope.capture.follow import REPEATED_STEP, OptimizerFollower, RepeatDetector
from gradscope.capture.guard import NonFiniteGuard
from gradscope.capture.hooks import HookManager
from gradscope.capture.layout import unwrap_model
from gradscope.capture.meta import report_meta
from gradscope.capture.noise_scale import NoiseScaleEstimate, noise_scale_from_option, scope_estimate
from gradscope.capture.step import step_values
from gradscope.capture.target import check_arguments, is_compiled, unwrap_optimizer
from gradscope.capture.weakcall import WeakCall
from gradscope.errors import ConfigurationError, GradscopeWarning, NonFiniteGradientError
from gradscope.findings import Finding
from gradscope.options import DEFAULT_HISTORY, WatchOptions
from gradscope.report import Report
from gradscope.rules.engine import RuleEngine, RuleSpec
from gradscope.sinks.base import Sink
from gradscope.sinks.registry import build_sink

if TYPE_CHECKING:
    from gradscope.capture.distributed import DistributedContext
    from gradscope.capture.layout import ParamLayout
    from gradscope.capture.live import Diagnosis
    from gradscope.capture.nonfinite import NonfiniteOrigin
    from gradscope.capture.order import ForwardOrder
    from gradscope.capture.step import StepRecorder
    from gradscope.stats.frame import FrameSchema, StatsFrame

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

    # Built by gradscope.capture.lifecycle.build_parts (again after a re-layout before step 1).
    layout: ParamLayout
    frame: StatsFrame
    schema: FrameSchema
    device: torch.device
    _recorder: StepRecorder
    _diagnosis: Diagnosis
    _dist: DistributedContext
    _order: ForwardOrder

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
        self.model, self.module, self.optimizer = model, target, optimizer
        self.on_nonfinite = options.on_nonfinite
        self._hooks = HookManager()
        # Activation hooks would be traced into a compiled graph; under torch.compile they are off.
        self.compiled = is_compiled(model)
        self._want_acts = activations and not self.compiled
        self.engine = RuleEngine(options.build_rules())
        self._sinks: list[Sink] = [build_sink(s) for s in options.sinks]
        # -- state -------------------------------------------------------------------------------------
        self._step = 0
        self._closed = False
        self._warned: set[str] = set()
        self._errors: list[str] = []
        self._ended_by: str | None = None
        self._repeat = RepeatDetector()
        lifecycle.build_parts(self, first=True)
        if not self._dist.writes:
            self._sinks = []  # distributed: only rank 0 writes; the other ranks never open a sink
        elif log_dir is not None or writer is not None:
            from gradscope.sinks.tensorboard import TensorBoardSink

            tb = options.tensorboard_kwargs()
            self._sinks.append(
                TensorBoardSink(writer=writer, **tb) if writer is not None else TensorBoardSink(log_dir, **tb)
            )
        self._diagnosis.sinks = self._sinks
        for note in self._dist.notes:
            self._problem("distributed", note)
        # Only with on_nonfinite="raise": a pre-hook that stops before the optimizer writes NaN.
        raising = self.on_nonfinite == "raise"
        self._guard = NonFiniteGuard(self._recorder, self._hooks, WeakCall(self, "_nonfinite")) if raising else None
        self._follower = OptimizerFollower(
            lambda: self.layout, lambda: self._recorder, self._hooks, self.attach_optimizer, WeakCall(self, "_warn")
        )

        # -- attach: from here on the model carries hooks, so failures must clean up ---------------------
        try:
            lifecycle.attach_parts(self)
            self._noise = noise_scale_from_option(model, optimizer, options.noise_scale, self._hooks)
            if optimizer is not None:
                self._follower.attach()
                if self._guard is not None:
                    self._guard.attach(optimizer)
        except BaseException:
            self._hooks.remove_all()
            raise
        _WATCHED.add(target)
        _OPEN.add(self)
        self._opened = True
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
        values = step_values(loss, val_loss, scalars, self._noise)
        diagnosis = self._diagnosis
        diagnosis.cadence.step_started()
        self._step += 1
        if self._step == 1:
            lifecycle.relayout_if_changed(self)
        if self._order.seen_any:
            self._order.detach()
        recorder = self._recorder
        if recorder.pending is not None:
            diagnosis.recorded()
        if self._repeat.repeated(recorder, self.layout):
            self._warn("repeated-step", REPEATED_STEP)
        try:
            if recorder.finish(values, self._step):
                lifecycle.raise_nonfinite(self)
        except NonFiniteGradientError:
            raise
        except Exception as exc:  # monitoring must never stop training
            self._problem("step", f"recording step {self._step} failed: {type(exc).__name__}: {exc}")
        self._repeat.ended(self.layout, recorder, self._step)
        if recorder.end_step():
            self._warn(
                "compiled-activations",
                "The watched model runs under torch.compile, so gradscope takes no activation statistics "
                "(dead / saturated units); gradient statistics are unaffected. Watch the compiled module, "
                "or pass activations=False, to silence this.",
            )
        if diagnosis.unflushed >= self.flush_every:
            self._flush(final=False, due=True)
        else:
            diagnosis.live(self._step)
        recorder.begin(self._step + 1)
        diagnosis.cadence.step_ended()
        found = diagnosis.take_stop()
        if found:
            lifecycle.stop(self, found)

    def locate_nonfinite(self, batch: Any = None, loss_fn: Callable | None = None) -> NonfiniteOrigin | None:
        """Name the module and operation where a NaN/Inf first appeared (:mod:`gradscope.capture.nonfinite`).

        With ``batch=(inputs, targets)``: replay ``loss_fn(model(inputs), targets)`` and its backward under
        finiteness checks on a copy of the model, and return the origin (None: all finite). Without: arm the
        checks for the next forward (non-finite weights); a new ``nonfinite_gradients`` finding carries it.
        """
        from gradscope.capture.nonfinite import locate_nonfinite  # (function-local: scope.py stays light to import)

        return locate_nonfinite(self, batch, loss_fn)

    def noise_scale(self) -> NoiseScaleEstimate:
        """The gradient noise scale estimate (``watch(noise_scale=...)``, docs/rules.md); one host sync."""
        return scope_estimate(self._noise)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch the steps of ``optimizer`` from now on, instead of the optimizer passed to ``watch()``.

        Call it when the loop builds a new optimizer over the watched parameters (a resume, an LR finder, a
        new phase). Without the call gradscope notices the new optimizer at its first step, warns once and
        follows it.

        Raises:
            ConfigurationError: ``optimizer`` is not an optimizer, the scope is closed, or ``watch()`` had none.
        """
        lifecycle.attach_optimizer(self, optimizer)

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

    def __del__(self) -> None:
        # An unclosed scope that is collected (a train() helper that forgot close()) still writes its
        # outputs and report_path. Nothing registered on the model or optimizer holds the scope strongly.
        if self.__dict__.get("_closed", True) or not self.__dict__.get("_opened"):
            return  # closed, or __init__ failed before anything was attached
        try:
            self._close(collective=False, ended_by="garbage collection")
        except Exception:  # a finaliser never raises
            pass

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
    def _flush(self, *, final: bool, collective: bool = True, due: bool = False) -> list:
        if self._step and not self._closed:
            lifecycle.warn_unwatched(self, final=final)  # O(parameters) on the host, at some flushes
        return self._diagnosis.flush(final=final, collective=collective, step_count=self._step, due=due)

    def _nonfinite(self) -> None:
        lifecycle.nonfinite_in_step(self)

    def _make_report(self, extra: Sequence = (), frame: Any = None, live: dict | None = None) -> Report:
        recorder, frame = self._recorder, self.frame if frame is None else frame
        meta = report_meta(self, live)
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
    noise_scale: bool | int = False,
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
        rules: ``"all"`` (default), ``"none"``, or a list of rule names / Rule instances; ``"-name"`` removes one
            (a list that starts with a removal starts from ``"all"``).
        thresholds: per-rule threshold overrides, ``{"vanishing_gradients": {"ratio": 1e-4}}``.
        activations: measure ReLU/tanh/sigmoid outputs (dead and saturated units) on sampled steps.
        sample_every: every this many steps (a multiple of ``every``), also take the statistics that cost
            extra passes over gradients and weights (mean, std, abs_max, zero_fraction, param_norm,
            update_ratio) and the activation statistics. ``l2_norm``, ``rms`` and ``nonfinite_count``
            come from a single pass and are taken at every recorded step. ``sample_every=1`` takes
            everything every step (see docs/performance.md for what each costs).
        on_nonfinite: ``"record"`` (a finding at the next flush) or ``"raise"`` (stop at the step where a
            gradient first holds NaN/Inf, naming the layer, from ``optimizer.step()`` before the update, so
            the weights stay intact; costs one host sync per recorded step).
        on_finding: called with each new :class:`Finding`, once, on the training thread, at the step
            it becomes visible (an exception it raises is reported as a warning; training goes on).
        stop_on: ``"error"``, ``"warning"`` or rule kinds: when such a finding becomes visible,
            ``scope.step()`` raises :class:`GradientHealthError` naming it (the report is still
            written on the way out of the ``with`` block). None (default): never stop.
        sinks: extra outputs (Sink instances or registered names).
        history: recorded steps kept at full resolution on the host (default 2000, at least 100 and
            ``flush_every``). Older steps are thinned, not dropped: kept at a stride of ``sample_every``
            steps that doubles whenever they outnumber ``history / 2``, so memory stays bounded over any
            run length while ``report.stats`` still spans the run (``report.meta["history"]`` says
            from which step it is full). ``None`` keeps every step.
        report_path: write the JSON report here at ``close()``, also when the loop raises (NaN,
            ``KeyboardInterrupt``), when an unclosed scope is garbage-collected and at interpreter exit;
            atomically (temporary file + rename), so a
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
        noise_scale: True or the micro-batch size (per rank): the gradient noise scale (docs/rules.md).

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
        noise_scale=noise_scale,
    )
    return GradScope(model, optimizer=optimizer, options=options)
