"""The hot path: one recorded step, from the optimizer's hooks to a row of the device buffer.

Lifecycle of a recorded step (see :class:`StepRecorder`)::

    begin(step)           claim a buffer row; on sampled steps arm the activation hooks
    optimizer pre-hook    moments of every gradient the optimizer uses (after accumulation,
                          GradScaler.unscale_, clipping, DDP all-reduce) and weight -> the row
    optimizer post-hook   moments of the update (w_after - w_before) -> the row (sampled steps)
    finish(values, step)  scalars and the skip flag -> the row; host metadata -> a RecordedRow
    commit()              at a flush: reduce across ranks, ONE device-to-host copy, rows -> frame

Everything up to ``commit`` is device work: no host sync, and a number of kernel launches that does
not grow with the number of parameters. Without an optimizer the gradient moments are taken at
``finish`` (``scope.step()``).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
import torch
from torch import Tensor

from gradscope.capture.activations import ActivationMonitor
from gradscope.capture.distributed import DistributedContext
from gradscope.capture.hooks import HookManager
from gradscope.capture.kernels import FusedMoments
from gradscope.capture.layout import ParamInfo, ParamLayout
from gradscope.errors import ConfigurationError
from gradscope.sinks.base import Sink
from gradscope.stats.buffer import StatsBuffer
from gradscope.stats.frame import ACTIVATION_STATISTICS, FrameSchema, StatsFrame
from gradscope.stats.moments import MOMENT_INDEX, MomentPlan, _local

if TYPE_CHECKING:
    from gradscope.options import WatchOptions

__all__ = [
    "MAX_SCALARS",
    "SKIP_COL",
    "GradMarker",
    "PendingStep",
    "RecordedRow",
    "StepRecorder",
    "frame_schema",
    "grad_marker",
    "same_marker",
    "scalar_value",
    "step_values",
]

_M = MOMENT_INDEX
#: Most named scalars a scope records (loss, val_loss and the user's); later names are dropped.
MAX_SCALARS = 16
#: One more slot after the scalars: 1 when the optimizer step was skipped (GradScaler found inf). Known
#: on the host for ordinary optimizers; written on the device by fused ones (their found_inf tensor).
SKIP_COL = MAX_SCALARS
# With an optimizer, a step whose pre-hook did not run is a skipped step (GradScaler found inf). If
# the hook never runs at all, the optimizer passed is not the one stepping: stop trusting it.
_NO_OPTIMIZER_STEP_LIMIT = 20

_Warn = Callable[[str, str], None]
_NOT_NONE = functools.partial(operator.is_not, None)

#: Identity (a weak reference: the id of a freed gradient can be reused by the next one) and version
#: of one gradient tensor: both change when a backward pass writes the gradients.
GradMarker = tuple["weakref.ref[Tensor]", int]


def grad_marker(tensors: Sequence[Tensor]) -> GradMarker | None:
    """The :data:`GradMarker` of the first of ``tensors`` with a gradient; None when none has one."""
    for t in tensors:
        g = t.grad
        if g is not None:
            return (weakref.ref(g), g._version)
    return None


def same_marker(a: GradMarker | None, b: GradMarker | None) -> bool:
    """Whether two markers name the same live gradient at the same version (no backward pass in between)."""
    if a is None or b is None or a[1] != b[1]:
        return False
    g = a[0]()
    return g is not None and g is b[0]()


@dataclass(slots=True)
class PendingStep:
    """The recorded step in progress, between :meth:`StepRecorder.begin` and :meth:`StepRecorder.finish`.

    Attributes:
        slot: its buffer row (a flush that keeps it moves it to the front).
        step: its step number (counted from 1).
        sampled: whether it also takes the sampled statistics and the activation statistics.
        grads_done: the gradient moments are in the row.
        opt_stepped: the optimizer's pre-hook ran for it (else, with an optimizer, it was skipped).
        present: indices (layout order) of the tensors whose gradient was captured.
        trainable: ``requires_grad`` of every tensor at capture; None before the capture.
        grad_marker: :data:`GradMarker` of one gradient right after the capture (see ``marked``).
        marked: ``grad_marker`` was taken (a None marker means no gradient existed then).
        grad_scale: the loss scale still in the gradients (GradScaler with a fused optimizer step).
        found_inf: the device flag of a fused step skipped by GradScaler.
        finite: with ``on_nonfinite="raise"``, a 0-d device bool: every captured gradient is finite.
        updated: indices of the tensors whose weights were snapshot for the update ratio.
        psumsq_due: the weights' sums of squares are left to the weight snapshot (one read of the weights).
    """

    slot: int
    step: int
    sampled: bool
    grads_done: bool = False
    opt_stepped: bool = False
    present: list[int] = field(default_factory=list)
    trainable: list[bool] | None = None
    grad_marker: GradMarker | None = None
    marked: bool = False
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    finite: Tensor | None = None
    updated: list[int] = field(default_factory=list)
    psumsq_due: bool = False


@dataclass(slots=True)
class RecordedRow:
    """Host metadata of one finished step whose statistics wait in the device buffer for a flush.

    Attributes:
        step: the step number.
        skipped: the optimizer skipped the step (as known on the host; the device flag adds to it).
        passed: scalar columns written at this step (a distributed reduction averages only those).
        has_grad: ``[n_params]`` bool, a gradient was captured.
        trainable: ``[n_params]`` bool, ``requires_grad`` at the step.
        sampled: the step took the sampled statistics.
    """

    step: int
    skipped: bool
    passed: list[int]
    has_grad: np.ndarray
    trainable: np.ndarray
    sampled: bool


class StepRecorder:
    """Owns the device buffer and everything written into it, step by step, until a flush.

    It holds the moment plan, the buffer, the step in progress (:class:`PendingStep`), the finished
    rows (:class:`RecordedRow`), the weights before the optimizer step (update ratio), the scalar
    columns and the skipped steps. The scope calls :meth:`begin` and :meth:`finish` once per step and
    :meth:`commit` at a flush; the optimizer calls the hooks that :meth:`attach` registers.

    Args:
        layout: the watched parameters.
        plan: which moments to take (``MomentPlan.for_statistics``).
        options: the scope's options (``every``, ``sample_every``, ``flush_every``, ``history``,
            ``on_nonfinite``).
        stat_names: the statistics collected (``update_ratio`` turns on the weight snapshots).
        optimizer: the optimizer whose step hooks capture the gradients, or None.
        device: the buffer's device (the model's).
        acts: the activation monitor, or None.
        dist: the distributed context (reduction of rows, agreement on a non-finite step).
        hooks: the scope's hook manager (owns the optimizer hooks).
        warn: ``warn(key, message)``: a warning, once per key.
        problem: ``problem(key, message)``: an error of gradscope itself, recorded, training goes on.
        moment_path: how gradient moments are computed (:class:`gradscope.capture.kernels.FusedMoments`):
            ``"auto"`` (the compiled kernel on a CPU, multi-tensor operators on accelerators),
            ``"kernel"``, ``"foreach"`` (the accelerator path, also on CPU tensors) or ``"eager"``.
    """

    def __init__(
        self,
        *,
        layout: ParamLayout,
        plan: MomentPlan,
        options: WatchOptions,
        stat_names: Sequence[str],
        optimizer: torch.optim.Optimizer | None,
        device: torch.device,
        acts: ActivationMonitor | None,
        dist: DistributedContext,
        hooks: HookManager,
        warn: _Warn,
        problem: _Warn,
        moment_path: str = "auto",
    ) -> None:
        self.layout = layout
        self.plan = plan
        #: The columns of the rows written here, as the frame reads them.
        self.schema = frame_schema(layout, plan, stat_names, acts)
        #: Where finished rows go at :meth:`commit`.
        self.frame = StatsFrame(self.schema, history=options.history, thin_every=options.sample_every)
        self._optimizer = optimizer
        #: The activation monitor; None when activations are off or turned off (see :meth:`end_step`).
        self.acts = acts
        self._options = options
        self._dist = dist
        self._step_sinks: list[Sink] = []
        self._hooks = hooks
        self._warn = warn
        self._problem = problem
        self._update_on = "update_ratio" in stat_names
        self._param_on = "psumsq" in plan.moments
        self.buffer = StatsBuffer(
            capacity=options.flush_every + 1,  # +1: the row of the step in progress survives a flush
            n_params=len(layout.params),
            n_cols=plan.n_cols,
            n_act=len(acts.paths) if acts else 0,
            n_act_cols=len(ACTIVATION_STATISTICS),
            n_scalars=MAX_SCALARS + 1,  # + the skip flag
            device=device,
        )
        #: The recorded step in progress; None between steps and on steps that are not recorded.
        self.pending: PendingStep | None = None
        #: Finished steps whose statistics wait in the buffer for the next :meth:`commit`.
        self.rows: list[RecordedRow] = []
        #: Steps the optimizer skipped (GradScaler found inf), in order.
        self.skipped_steps: list[int] = []
        #: Distributed: rows dropped at a non-collective commit (shard-local moments cannot be global).
        self.unreduced_rows = 0
        # The live copy in flight (accelerators): its rows, the pinned host tensor, the event after it.
        self._streaming: tuple[list[RecordedRow], Tensor, Any] | None = None
        self._scalar_cols: dict[str, int] = {}
        self._passed_cache: dict[tuple[str, ...], list[int]] = {}
        self._dropped_scalars: set[str] = set()
        self._opt_seen = False
        self._trust_optimizer = optimizer is not None
        self._prev: dict[int, Tensor] = {}  # weights before the optimizer step (update ratio)
        # DTensor shards go through the eager path (the fused ones read plain storage). So does every
        # distributed run: ranks must compute bit-identical moments of the same replicated gradients,
        # and a rank without the compiled kernel (another machine, a build in progress) would not.
        self.moments = FusedMoments(plan, path="eager" if dist.sharded or dist.active else moment_path)
        self._custom_names = list(plan.custom_reduce)
        self._in_opt_cache: tuple[Any, list[int], list[int]] | None = None
        # (present indices updated, their snapshot buffers, the weights themselves when all are plain tensors)
        self._prev_list: tuple[list[int], list[Tensor], list[Tensor] | None] | None = None
        self._custom_warned: set[int] = set()
        # Per-step host work that does not grow with the parameters: everything that only depends on
        # the layout is computed once (see _present and finish).
        n = len(layout.params)
        self._all_idx = list(range(n))
        self._all_true = np.ones(n, dtype=bool)
        self._all_true.flags.writeable = False
        self._all_trainable = [True] * n
        self._mask_cache: dict[str, tuple[list[Any], np.ndarray]] = {}
        self._frozen_cache: tuple[list[int], list[bool]] | None = None
        self._one_device = len({t.device for t in layout.tensors}) <= 1
        #: Optimizer steps seen by the pre-hook since the last :meth:`finish` (``scope.step()``): 0 when
        #: ``scope.step()`` is called again without an optimizer step in between.
        self.optimizer_steps = 0
        #: Called in the optimizer's pre-hook once the step's gradients are captured (the NaN locator's
        #: weight copy, :func:`gradscope.capture.nonfinite.auto_locate`), or None. Not called when the
        #: compiled CPU kernel has just said that every gradient is finite (no update writes NaN then).
        self.before_update: Callable[[], None] | None = None
        #: ``(step, finite)``: whether the gradients captured for recorded step ``step`` were all finite,
        #: as known on the host without reading the row (the compiled CPU kernel returns it; the live
        #: diagnosis sets it when it reads the row). ``step`` -1: nothing known.
        self.finite_known: tuple[int, bool] = (-1, True)
        #: ``(step, marker)``: the :data:`GradMarker` read at the end of recorded step ``step`` (by
        #: :meth:`finish`, once: the scope's repeat detector reuses it).
        self.end_marker: tuple[int, GradMarker | None] = (-1, None)

    # -- lifecycle -------------------------------------------------------------------------------------
    def attach(self, model_name: str, sinks: Sequence[Sink] = ()) -> None:
        """Register the optimizer's step pre- and post-hooks (none without an optimizer).

        Args:
            model_name: the watched model's class name, for the warnings.
            sinks: the scope's sinks; those that override :meth:`Sink.on_step` get the gradients of each
                recorded step.

        Warns (through ``warn``): custom statistics cannot be combined across FSDP/DTensor shards; none
        of the model's parameters is in the optimizer (statistics are then taken at ``scope.step()``).
        """
        self._step_sinks = [s for s in sinks if type(s).on_step is not Sink.on_step]
        custom, optimizer = self.plan.custom_reduce, self._optimizer
        if self._dist.sharded and custom:
            self._warn(
                "distributed-custom",
                f"Custom statistics {sorted(custom)} are computed per shard and cannot be combined across FSDP/DTensor "
                "shards: they are NaN for sharded parameters (the built-in statistics are global).",
            )
        if optimizer is not None:
            in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(t) in in_opt for t in self.layout.tensors):
                self._warn(
                    "optimizer-params",
                    f"None of the {model_name}'s parameters is in the optimizer passed to watch(). Build the "
                    "optimizer from model.parameters() and call watch() after wrapping the model (fully_shard "
                    "replaces the parameters), or statistics will be taken at scope.step() instead.",
                )
            self._register(optimizer)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose step hooks capture the gradients (None: captured at ``scope.step()``)."""
        return self._optimizer

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Follow ``optimizer`` from now on: hooks off the previous one, on this one; per-optimizer state reset.

        The weight snapshots of ``update_ratio`` are freed (they belonged to the previous optimizer's
        parameters); trust in the optimizer is restored (a new one gets the same
        :data:`_NO_OPTIMIZER_STEP_LIMIT` steps to show it steps). A step in progress whose gradients the
        previous optimizer already captured keeps them.
        """
        self._hooks.remove("optimizer")
        self._optimizer = optimizer
        self._prev.clear()
        self._prev_list = None
        self._in_opt_cache = None
        self._opt_seen = False
        self._trust_optimizer = True
        pending = self.pending
        if pending is not None:
            pending.updated = []  # the snapshot (if any) was taken for the previous optimizer
        self._register(optimizer)

    def _register(self, optimizer: torch.optim.Optimizer) -> None:
        self._hooks.add("optimizer", optimizer.register_step_pre_hook(self._on_optimizer_pre))
        self._hooks.add("optimizer", optimizer.register_step_post_hook(self._on_optimizer_post))

    def begin(self, step: int) -> None:
        """Prepare step ``step``: claim a buffer row when it is recorded, arm activation hooks when sampled."""
        if not self._options.recorded(step):
            return
        slot = self.buffer.claim()
        sampled = self._options.sampled(step)
        self.pending = PendingStep(slot=slot, step=step, sampled=sampled)
        acts = self.acts
        if sampled and acts is not None and acts.entries:
            buffer = self.buffer
            acts.arm(lambda: buffer.activations(slot))

    def finish(self, values: dict[str, Union[float, Tensor]], step: int) -> bool:
        """End the step in progress (if recorded) as step ``step``: scalars, skip flag, its host row.

        Args:
            values: the scalars passed to ``scope.step`` (see :func:`scalar_value`).
            step: the step count after this step.

        Returns:
            True when ``on_nonfinite="raise"`` and a captured gradient holds NaN or Inf: the caller raises.
        """
        pending = self.pending
        if pending is None:
            return False
        skipped = False
        if self._trust_optimizer and not pending.opt_stepped:
            skipped = True
            if not self._opt_seen and step >= _NO_OPTIMIZER_STEP_LIMIT:
                self._distrust_optimizer(step)
                skipped = False
        if not pending.grads_done:
            self._capture_grads(pending)
        marker = grad_marker(self.layout.tensors)
        self.end_marker = (step, marker)
        if pending.marked and marker is not None and not same_marker(pending.grad_marker, marker):
            self._warn(
                "order",
                "A backward pass ran between optimizer.step() and scope.step(): call scope.step() right after "
                "optimizer.step(), once per optimizer step, or the statistics land one step late.",
            )
        self.optimizer_steps = 0
        slot = pending.slot
        if values:
            self._write_scalars(slot, values)
        if skipped:
            self.buffer.set_scalar(slot, SKIP_COL, 1.0)  # carried through distributed reductions
        n = len(self._all_idx)
        if len(pending.present) == n:
            has = self._all_true  # read-only, shared: rows are stacked (copied) at a flush
        else:
            has = self._mask_of(pending.present, "has")
        trainable = pending.trainable
        if trainable is None:  # the capture failed or never ran
            trainable = [t.requires_grad for t in self.layout.tensors]
        self.rows.append(
            RecordedRow(
                step=step,
                skipped=skipped,
                passed=self._passed(values),
                has_grad=has,
                trainable=self._all_true
                if trainable is self._all_trainable or all(trainable)
                else self._mask_of(trainable, "trainable"),
                sampled=pending.sampled,
            )
        )
        if skipped:
            self.skipped_steps.append(step)
        if self._options.on_nonfinite == "raise" and not skipped and pending.finite is not None:
            # sync point: on_nonfinite="raise" reads one flag per recorded step, by request.
            return not bool(pending.finite)
        return False

    def end_step(self) -> bool:
        """After :meth:`finish`: forget the step in progress and disarm the activation hooks.

        Returns:
            True when activation statistics were just turned off: the model was compiled after
            ``watch()``, so its activation hooks ran inside a graph and measured nothing. They are no
            longer armed (adding and removing hooks would recompile); the caller says so.
        """
        self.pending = None
        acts = self.acts
        if acts is None:
            return False
        acts.disarm()
        if acts.compiled:
            self.acts = None
            return True
        return False

    def commit(self, *, collective: bool = True) -> int:
        """Move the finished rows into the frame: reduce across ranks, one device-to-host copy, append.

        The row of a step in progress stays in the buffer (moved to the front). Collective in an
        active distributed run unless ``collective=False``; then sharded rows, which cannot become
        global, are dropped and counted in :attr:`unreduced_rows`.

        Returns:
            How many rows were appended to the frame.
        """
        appended = self._take_streamed(wait=True)
        rows = self.rows
        n = len(rows)
        if not n:
            return appended
        dist = self._dist
        if dist.active and collective:
            self._reduce_rows(n)
        moments, act, scalars = self._snapshot(n)
        if dist.active and not collective and dist.sharded:
            # Shard-local moments cannot become global without the other ranks: leave these rows out
            # rather than report a shard's norm as the layer's (report.meta["distributed"] counts them).
            self.unreduced_rows += n
            self.rows = []
            return appended
        self._append(rows, moments, act, scalars, thin=True)
        self.rows = []
        return appended + n

    def stream(self) -> int:
        """Live evaluation between flushes: move finished rows into the frame without waiting on the device.

        Not for an active distributed run (its rows must be reduced, collectively, at a flush). On a
        CPU the rows are host memory: they are copied into the frame now. On an accelerator the rows
        are copied into pinned host memory without blocking (the copy is queued on the stream, with
        an event after it) and freed from the buffer; they reach the frame at a later call whose
        event has completed, or at the next :meth:`commit`, which waits for them. At most one such
        copy is in flight; while it is, new rows wait in the buffer.

        Returns:
            How many rows were appended to the frame.
        """
        appended = self._take_streamed(wait=False)
        rows = self.rows
        n = len(rows)
        if not n or self._streaming is not None:
            return appended
        if self.buffer.device.type == "cpu":
            moments, act, scalars = self.buffer.take_cpu(n)
            self._moved(n)
            self._append(rows, moments, act, scalars, thin=False)
            self.rows = []
            return appended + n
        # Not in CI (no device there); ran on an H200 (benchmarks/gpu_launches.py, live evaluations under
        # torch.cuda.set_sync_debug_mode("error"), none reported).
        host, event = self.buffer.copy_async(n)
        self._moved(n)
        self._streaming = (rows, host, event)
        self.rows = []
        return appended

    def nonfinite_layer(self, depth_order: Sequence[int]) -> str | None:
        """The frame's last row: the first layer in backward order whose gradient holds NaN or Inf."""
        frame, members = self.frame, self.schema.layer_members
        if not len(frame):
            return None
        last = frame.moments[-1]
        for li in reversed(list(depth_order)):
            vals = last[members[li]][:, [_M["min"], _M["sumsq"]]]
            if not np.all(np.isfinite(vals)):
                return self.layout.layers[li]
        return None

    @property
    def scalar_names(self) -> list[str]:
        """The scalar names recorded so far, in column order."""
        return list(self._scalar_cols)

    @property
    def waiting(self) -> int:
        """Finished rows not in the frame yet (in the buffer, or on their way to the host)."""
        return len(self.rows) + (len(self._streaming[0]) if self._streaming is not None else 0)

    def local_rows(self) -> dict[str, np.ndarray] | None:
        """Distributed ``report()``: this rank's rows not yet reduced, as a frame chunk; None when none.

        Read from the buffer without freeing them (the next collective flush reduces them). Moments
        of sharded parameters are shard-local, so they are NaN here (no shard's norm passes for the
        layer's); replicated (DDP) gradients are already global. Scalars are this rank's own.
        """
        rows = self.rows
        if not rows:
            return None
        moments, act, scalars = self.buffer.peek(len(rows))
        moments = moments.copy()
        for shard_set in self._dist.shard_sets:
            moments[:, shard_set.members, :] = np.nan
        return self._chunk(rows, moments, act, scalars, note_skips=False)

    def _take_streamed(self, *, wait: bool) -> int:
        """Append the rows of the copy in flight once it is done (``wait``: wait for it); how many."""
        streaming = self._streaming
        if streaming is None:
            return 0
        rows, host, event = streaming
        if wait:
            # sync point: at a flush, the live copy still in flight is waited for (the flush copies anyway).
            event.synchronize()
        elif not event.query():
            return 0
        self._streaming = None
        # sync point: CPU tensors only; pinned host memory that the completed event says is written.
        data = host.numpy().astype(np.float64, copy=True)
        moments, act, scalars = self.buffer.split(data)
        self._append(rows, moments, act, scalars, thin=wait)
        return len(rows)

    def _chunk(
        self,
        rows: list[RecordedRow],
        moments: np.ndarray,
        act: np.ndarray,
        scalars: np.ndarray,
        *,
        note_skips: bool = True,
    ) -> dict[str, np.ndarray]:
        skipped = np.array([r.skipped for r in rows], dtype=bool)
        if self._trust_optimizer:
            # Steps skipped on the device (fused optimizer + GradScaler) or, after a distributed
            # reduction, on any rank.
            late = (scalars[:, SKIP_COL] > 0) & ~skipped
            if late.any():
                skipped |= late
            if late.any() and note_skips:
                self.skipped_steps = sorted({*self.skipped_steps, *(r.step for r, x in zip(rows, late) if x)})
        return {
            "steps": np.array([r.step for r in rows], dtype=np.int64),
            "skipped": skipped,
            "has_grad": _stack_masks([r.has_grad for r in rows]),
            "trainable": _stack_masks([r.trainable for r in rows]),
            "sampled": np.array([r.sampled for r in rows], dtype=bool),
            "moments": moments,
            "act": act,
            "scalars": scalars[:, : len(self._scalar_cols)],
        }

    def _append(
        self, rows: list[RecordedRow], moments: np.ndarray, act: np.ndarray, scalars: np.ndarray, *, thin: bool
    ) -> None:
        if not self.moments.nonfinite_seen and np.any(moments[..., _M["nonfinite"]] > 0):
            self.moments.nonfinite_seen = True  # the multi-tensor path counts exactly from now on
        self.frame.append(self._chunk(rows, moments, act, scalars), list(self._scalar_cols), thin=thin)

    def close(self) -> None:
        """Forget the step in progress and free the weight snapshots (the scope removes the hooks)."""
        self.pending = None
        self._prev.clear()
        self._prev_list = None

    # -- optimizer hooks -------------------------------------------------------------------------------
    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        pending = self.pending
        self._opt_seen = True
        self.optimizer_steps += 1
        if pending is None:
            return None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure):
            # opt.step(closure) (Lightning, LBFGS): the backward pass runs inside step(), so the gradients
            # the optimizer uses exist only once the closure returns. Capture then, not now.
            return _with_closure(args, kwargs, self._after_closure(optimizer, closure, pending))
        self._capture_for_step(optimizer, pending)
        before_update = self.before_update
        if before_update is not None and self.finite_known != (pending.step, True):
            try:
                before_update()
            except Exception as exc:  # a hook inside the user's optimizer.step() must never raise
                self._problem("before-update", f"copying the weights before the update failed: {exc}")
        return None

    def _after_closure(self, optimizer: Any, closure: Any, pending: PendingStep) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            out = closure(*a, **kw)
            if not pending.grads_done:  # LBFGS evaluates several times: the first is the step's gradient
                self._capture_for_step(optimizer, pending)
            else:  # a later evaluation within the same step is not a stray backward pass
                pending.grad_marker, pending.marked = grad_marker(self.layout.tensors), True
            return out

        return wrapped

    def _capture_for_step(self, optimizer: Any, pending: PendingStep) -> None:
        try:
            pending.opt_stepped = True
            self._read_loss_scale(optimizer, pending)
            self._capture_grads(pending, snapshot=self._update_on and pending.sampled)
            pending.grad_marker, pending.marked = grad_marker(self.layout.tensors), True
            if self._update_on and pending.sampled:
                self._snapshot_weights(pending)
        except Exception as exc:
            self._problem(
                "optimizer-pre", f"capturing gradients before optimizer.step() failed: {type(exc).__name__}: {exc}"
            )

    def _on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending = self.pending
        if pending is None or not self._update_on or not pending.updated:
            return
        try:
            upd = pending.updated
            cached = self._prev_list
            if cached is not None and cached[0] is upd and cached[2] is not None:
                prev, after = cached[1], cached[2]  # the snapshot's lists (plain tensors)
            else:
                prev = [self._prev[i] for i in upd]
                tensors = self.layout.tensors
                after = [_local(tensors[i]) for i in upd]
            view = self.buffer.moments(pending.slot)
            rows = [] if len(upd) == view.shape[0] else upd
            # ||before - after||^2 without writing the difference (the compiled CPU kernel: two reads)
            if self.moments.diff_sumsq(prev, after, view, rows, _M["dsumsq"]):
                return
            # prev <- before - after; its sum of squares is ||update||^2 (prev is refilled next step)
            with torch.no_grad():  # (no per-tensor detach(): a fixed number of operator calls)
                torch._foreach_sub_(prev, after)
            if self.moments.write_sumsq(prev, view, rows, _M["dsumsq"]):
                return
            dsq = self.moments.sumsq(prev)
            col = view[:, _M["dsumsq"]]
            dsq = dsq.to(device=view.device, dtype=view.dtype, non_blocking=True)
            if len(upd) == view.shape[0]:
                col.copy_(dsq)
            else:
                col.index_copy_(0, self._index_tensor(upd), dsq)
        except Exception as exc:
            self._problem("optimizer-post", f"measuring the optimizer update failed: {type(exc).__name__}: {exc}")

    # -- capture ---------------------------------------------------------------------------------------
    def _present(self) -> tuple[list[int], list[bool], list[Tensor]]:
        """Indices of the tensors with a gradient to capture, ``requires_grad`` of all, and those gradients."""
        tensors = self.layout.tensors
        grads = [t.grad for t in tensors]
        trainable = [t.requires_grad for t in tensors]
        # (no `None in grads`: that compares tensors with ==, a torch call per tensor)
        if all(trainable) and all(map(_NOT_NONE, grads)):
            return self._all_idx, trainable, grads  # type: ignore[return-value]  # reason: no None in grads
        idx = [i for i, (g, tr) in enumerate(zip(grads, trainable)) if tr and g is not None]
        return idx, trainable, [grads[i] for i in idx]  # type: ignore[misc]  # reason: filtered above

    def _mask_of(self, key: list[Any], kind: str) -> np.ndarray:
        """A row's mask from present indices (``kind="has"``) or a list of bools, read-only.

        The same array while ``key`` is the same list: a partly frozen model's rows share it, as others
        share the all-true mask.
        """
        cached = self._mask_cache.get(kind)
        if cached is not None and cached[0] is key:
            return cached[1]
        if kind == "has":
            mask = np.zeros(len(self._all_idx), dtype=bool)
            mask[key] = True
        else:
            mask = np.array(key, dtype=bool)
        mask.setflags(write=False)
        self._mask_cache[kind] = (key, mask)
        return mask

    def _trainable_without(self, frozen: list[int]) -> list[bool]:
        """``requires_grad`` of every tensor when exactly ``frozen`` are not trainable (kept while they are the same)."""
        cached = self._frozen_cache
        if cached is None or cached[0] is not frozen:  # (the kernel hands the same list while it is the same)
            trainable = [True] * len(self.layout.tensors)
            for i in frozen:
                trainable[i] = False
            cached = self._frozen_cache = (frozen, trainable)
        return cached[1]

    def _index_tensor(self, idx: list[int]) -> Tensor:
        """``idx`` on the buffer's device (no host sync on CUDA: :meth:`FusedMoments.rows_tensor`)."""
        return self.moments.rows_tensor(idx, self.buffer.device)

    def _capture_grads(self, pending: PendingStep, *, snapshot: bool = False) -> None:
        """Moments of every present gradient and weight into the pending row (device work only)."""
        if self._one_device and pending.grad_scale is None and self.plan.needs_grads:
            # The common CPU step: the kernel reads every p.grad itself (no Python loop over parameters).
            view = self.buffer.moments(pending.slot)
            if self.moments.write_params(self.layout.tensors, view, sampled=pending.sampled):
                self.finite_known = (pending.step, self.moments.last_finite)
                pending.grads_done = True
                present = self.moments.last_present
                if present is not None:  # some tensors without a gradient (frozen, or not used this step)
                    pending.present = present
                    frozen = self.moments.last_frozen
                    pending.trainable = self._trainable_without(frozen) if frozen else self._all_trainable
                    if self._param_on and pending.sampled:
                        tensors = self.layout.tensors
                        self._write_param_sumsq([tensors[i] for i in present], view, present)
                    self._after_capture(pending, view, present)
                    return
                pending.present = self._all_idx
                pending.trainable = self._all_trainable
                if self._param_on and pending.sampled:
                    if snapshot:
                        pending.psumsq_due = True  # the weight snapshot reads the weights: it writes them
                    else:
                        self._write_param_sumsq(self.layout.tensors, view, [])
                self._after_capture(pending, view, self._all_idx)
                return
        idx, trainable, grads = self._present()
        pending.grads_done = True
        pending.present = idx
        pending.trainable = trainable
        if not idx:
            return
        plan = self.plan
        view = self.buffer.moments(pending.slot)
        tensors = self.layout.tensors
        if (
            not pending.sampled
            and self._one_device
            and pending.grad_scale is None
            and self.moments.write_core(grads, view, None if idx is self._all_idx else idx)
        ):
            # an ordinary step on the multi-tensor path: written into the row's columns directly
            self._after_capture(pending, view, idx)
            return
        params = tensors if idx is self._all_idx else [tensors[i] for i in idx]
        if self._one_device and pending.grad_scale is None and plan.needs_grads:
            # The CPU kernel writes the moments straight into the buffer row: one call for all tensors.
            rows = [] if idx is self._all_idx else idx
            if self.moments.write(grads, params, view, rows, sampled=pending.sampled):
                self.finite_known = (pending.step, self.moments.last_finite)
                if self._param_on and pending.sampled:
                    self._write_param_sumsq(params, view, rows)
                self._after_capture(pending, view, idx)
                return
        if self._one_device:
            by_device = {grads[0].device: self._all_idx if idx is self._all_idx else list(range(len(idx)))}
        else:
            by_device = {}
            for k, g in enumerate(grads):
                by_device.setdefault(g.device, []).append(k)
        blocks: list[tuple[list[int], Tensor]] = []
        for dev_idx in by_device.values():
            whole = len(dev_idx) == len(grads)
            g_sub = grads if whole else [grads[k] for k in dev_idx]
            p_sub = params if whole else [params[k] for k in dev_idx]
            block = self.moments(g_sub, p_sub, sampled=pending.sampled) if plan.needs_grads else None
            if block is None:
                block = torch.full(
                    (len(dev_idx), plan.n_cols), float("nan"), dtype=torch.float64, device=g_sub[0].device
                )
            if pending.grad_scale is not None:
                block = _unscale_moments(block, pending.grad_scale)
            if self._param_on and pending.sampled:
                if snapshot and self._one_device:
                    pending.psumsq_due = True  # the weight snapshot reads the weights: it writes them
                else:
                    with torch.no_grad():
                        block[:, _M["psumsq"]] = self.moments.sumsq([_local(p) for p in p_sub])
            blocks.append((idx if whole else [idx[k] for k in dev_idx], block.to(view.device, non_blocking=True)))
        for rows, block in blocks:
            block = block.to(view.dtype)
            if len(rows) == view.shape[0]:
                view.copy_(block)
            else:
                view.index_copy_(0, self._index_tensor(rows), block)
        self._after_capture(pending, view, idx)

    def _write_param_sumsq(self, params: Sequence[Tensor], view: Tensor, rows: list[int]) -> None:
        """The weights' sums of squares into column ``psumsq`` of ``view[rows]`` (all rows when empty)."""
        with torch.no_grad():
            local = [_local(p) for p in params]
            if not self.moments.write_sumsq(local, view, rows, _M["psumsq"]):
                col = view[:, _M["psumsq"]]
                dsq = self.moments.sumsq(local).to(col.dtype)
                col.copy_(dsq) if not rows else col.index_copy_(0, self._index_tensor(rows), dsq)

    def _after_capture(self, pending: PendingStep, view: Tensor, idx: list[int]) -> None:
        """Sinks that take the gradients, the failed custom statistics, the finite flag of on_nonfinite="raise"."""
        if self.plan.failed and len(self._custom_warned) < len(self.plan.failed):
            self._warn_failed_custom()
        grads: list[tuple[ParamInfo, Tensor]] | None = None  # built once, for the sinks that read it now
        for sink in self._step_sinks:
            try:
                if sink.wants_grads(pending.step):
                    if grads is None:
                        params, tensors = self.layout.params, self.layout.tensors
                        grads = [(params[i], tensors[i].grad) for i in idx]  # type: ignore[misc]  # present tensors (from _present) have a .grad
                    sink.on_step(pending.step, grads)
                else:
                    sink.on_step(pending.step, [])
            except Exception as exc:
                self._problem(f"sink-step-{type(sink).__name__}", f"{type(sink).__name__}.on_step failed: {exc}")
        if self._options.on_nonfinite == "raise":
            finite = self._finite_flag(view, idx)
            if self._dist.sharded:
                finite = self._dist.all_finite(finite)  # a NaN sits in one rank's shard; all must stop
            if pending.found_inf is not None:
                finite = finite | (pending.found_inf.reshape(()) > 0)  # the fused step skips it
            pending.finite = finite

    def _warn_failed_custom(self) -> None:
        for k, reason in self.plan.failed.items():
            if k in self._custom_warned:
                continue
            self._custom_warned.add(k)
            name = self._custom_names[k] if k < len(self._custom_names) else f"custom statistic #{k}"
            self._warn(
                f"custom-stat-{name}",
                f"Custom statistic {name!r} failed ({reason}); it is turned off (NaN) for the rest of the run, "
                "every other statistic goes on. Fix the function passed to register_statistic.",
            )

    def _finite_flag(self, view: Tensor, idx: list[int]) -> Tensor:
        rows = view if len(idx) == view.shape[0] else view.index_select(0, self._index_tensor(idx))
        cols = [_M[m] for m in ("sumsq", "sum", "min", "max") if m in self.plan.moments]
        return torch.isfinite(rows[:, cols[:1] or [_M["sumsq"]]]).all()

    def _read_loss_scale(self, optimizer: Any, pending: PendingStep) -> None:
        """Note the loss scale still in the gradients and the device-side skip flag of a fused step.

        GradScaler with an optimizer that unscales inside its own (fused) step: at the pre-hook the
        gradients still carry the loss scale, and the step is skipped on the device when found_inf > 0.
        GradScaler sets both tensors on the optimizer for the duration of its step only.
        """
        scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(scale, Tensor):
            pending.grad_scale = scale
        if isinstance(found_inf, Tensor) and self._trust_optimizer:
            pending.found_inf = found_inf
            col = self.buffer.scalars(pending.slot)[SKIP_COL]
            col.copy_(found_inf.reshape(()).to(device=col.device, dtype=col.dtype, non_blocking=True))

    def _snapshot_weights(self, pending: PendingStep) -> None:
        upd = self._in_optimizer(pending.present)
        pending.updated = upd
        if not upd:
            if pending.psumsq_due:
                self._write_param_sumsq(self.layout.tensors, self.buffer.moments(pending.slot), [])
            return
        # DTensor (FSDP2): copy the local shard; the update's moments are reduced with the others.
        tensors = self.layout.tensors
        cached = self._prev_list
        if cached is not None and cached[0] is upd and cached[2] is not None:
            dst, src = cached[1], cached[2]  # the same tensors as last time: their buffers (checked then)
        else:
            src = [_local(tensors[i]) for i in upd]
            if cached is not None and cached[0] is upd:
                dst = cached[1]
            else:
                dst = []
                for i, p in zip(upd, src):
                    buf = self._prev.get(i)
                    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                        buf = torch.empty_like(p)
                        self._prev[i] = buf
                    dst.append(buf)
            # plain tensors are their own local part: the list is kept (a DTensor's local view is not)
            plain = src if all(a is tensors[i] for a, i in zip(src, upd)) else None
            self._prev_list = (upd, dst, plain)
        if pending.psumsq_due:
            view = self.buffer.moments(pending.slot)
            # every tensor present and updated: the copy and the weights' sums of squares in one read
            if len(upd) == view.shape[0] and self.moments.copy_sumsq(src, dst, view, _M["psumsq"]):
                return
            self._write_param_sumsq(self.layout.tensors, view, [])
        with torch.no_grad():
            torch._foreach_copy_(dst, src)

    def _in_optimizer(self, present: list[int]) -> list[int]:
        """The present tensors the optimizer updates (cached per optimizer, param groups and present set)."""
        opt = self._optimizer
        groups = opt.param_groups  # type: ignore[union-attr]  # reason: only called when an optimizer was given
        key = (id(opt), len(groups), sum(len(g["params"]) for g in groups), len(present))
        cached = self._in_opt_cache
        if cached is not None and cached[0] == key and cached[1] is present:
            return cached[2]
        in_opt = {id(p) for group in groups for p in group["params"]}
        tensors = self.layout.tensors
        upd = [i for i in present if id(tensors[i]) in in_opt]
        self._in_opt_cache = (key, present, upd)
        return upd

    # -- host side of a step ---------------------------------------------------------------------------
    def _distrust_optimizer(self, step: int) -> None:
        self._trust_optimizer = False
        self.skipped_steps.clear()
        for row in [*self.rows, *(self._streaming[0] if self._streaming is not None else ())]:
            row.skipped = False
        if len(self.frame):
            self.frame.skipped[:] = False
        self._warn(
            "optimizer-never-stepped",
            f"gradscope saw no optimizer.step() in {step} steps on the optimizer passed to watch(); is it the "
            "one your loop steps? Statistics are now taken at scope.step() and no step is treated as skipped.",
        )

    def _passed(self, values: dict[str, Union[float, Tensor]]) -> list[int]:
        """The scalar columns of ``values`` (cached per set of names: the same few at every step)."""
        key = tuple(values)
        cols = self._passed_cache.get(key)
        if cols is None:
            cols = [self._scalar_cols[k] for k in values if k in self._scalar_cols]
            if len(self._passed_cache) < 64:
                self._passed_cache[key] = cols
        return cols

    def _write_scalars(self, slot: int, values: dict[str, Union[float, Tensor]]) -> None:
        view: Tensor | None = None
        for name, v in values.items():
            col = self._scalar_cols.get(name)
            if col is None:
                if len(self._scalar_cols) >= MAX_SCALARS:
                    if name not in self._dropped_scalars:
                        self._dropped_scalars.add(name)
                        self._warn(
                            f"scalar-{name}", f"gradscope records at most {MAX_SCALARS} scalars; {name!r} is dropped."
                        )
                    continue
                col = self._scalar_cols[name] = len(self._scalar_cols)
                self._passed_cache.clear()
            if isinstance(v, Tensor):
                view = self.buffer.scalars(slot) if view is None else view
                view[col].copy_(v.to(device=view.device, dtype=view.dtype, non_blocking=True))
            else:
                self.buffer.set_scalar(slot, col, v)

    # -- flush -----------------------------------------------------------------------------------------
    def _reduce_rows(self, n: int) -> None:
        """Distributed: make the first ``n`` buffer rows global, in place on the device (collective)."""
        passed = np.zeros((n, MAX_SCALARS + 1), dtype=bool)
        for i, r in enumerate(self.rows):
            passed[i, r.passed] = True
        names = list(self._scalar_cols)
        moments, act, scalars = self.buffer.rows(n)
        agreed = self._dist.reduce(
            moments, act, scalars, names=names, passed=passed, skip_col=SKIP_COL, max_names=MAX_SCALARS
        )
        if agreed != names:
            # Another rank logged other scalars: columns now follow the list every rank shares.
            self._scalar_cols = {name: i for i, name in enumerate(agreed)}
            self._passed_cache.clear()

    def _snapshot(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first ``n`` rows on the host; the row of the step in progress moves to the front."""
        out = self.buffer.snapshot(n)
        self._moved(n)
        return out

    def _moved(self, n: int) -> None:
        """The buffer freed its first ``n`` rows: the step in progress, if it kept its row, moved up by ``n``."""
        pending = self.pending
        if n and pending is not None and pending.slot >= n:
            # Activations of a sampled step may already be in its row: point the hooks at the new place.
            pending.slot -= n
            if pending.sampled and self.acts is not None:
                buffer, slot = self.buffer, pending.slot
                self.acts.retarget(lambda: buffer.activations(slot))


def _stack_masks(masks: list[np.ndarray]) -> np.ndarray:
    """``np.stack(masks)``; one copy when every row holds the same (shared, read-only) mask, as most do."""
    first = masks[0] if masks else None
    if first is not None and all(m is first for m in masks):
        return np.broadcast_to(first, (len(masks), *first.shape)).copy()
    return np.stack(masks)


def frame_schema(
    layout: ParamLayout, plan: MomentPlan, stat_names: Sequence[str], acts: ActivationMonitor | None
) -> FrameSchema:
    """The columns of the rows a :class:`StepRecorder` writes, as the frame reads them."""
    return FrameSchema(
        param_names=[p.name for p in layout.params],
        param_layers=[p.layer for p in layout.params],
        param_leaves=[p.param for p in layout.params],
        numels=np.array([p.numel for p in layout.params], dtype=np.float64),
        layers=list(layout.layers),
        layer_members=layout.layer_members(),
        stats=stat_names,
        custom=plan.custom_reduce,
        sampled_stats=plan.sampled_stats,
        act_modules=acts.paths if acts else [],
        act_kinds=acts.kinds if acts else [],
        dtypes=[p.dtype for p in layout.params],
    )


def _with_closure(args: Any, kwargs: Any, closure: Any) -> tuple[Any, Any]:
    """``(args, kwargs)`` of ``optimizer.step`` with its closure replaced (args[0] is the optimizer)."""
    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure}
    return (args[0], closure, *args[2:]), kwargs


_SCALE_1 = [_M["sum"], _M["min"], _M["max"]]


def _unscale_moments(block: Tensor, scale: Tensor) -> Tensor:
    """Moments of ``g / scale`` from those of ``g`` (a loss-scaled gradient), on the device.

    Sums, min and max scale by ``1/scale``, the sum of squares by ``1/scale**2``; counts are unchanged.
    """
    s = scale.detach().reshape(()).to(device=block.device, dtype=block.dtype, non_blocking=True)
    block = block.clone()
    block[:, _SCALE_1] = block[:, _SCALE_1] / s
    block[:, _M["sumsq"]] = block[:, _M["sumsq"]] / (s * s)
    return block


def step_values(
    loss: Any, val_loss: Any, scalars: dict[str, Any], noise: Any = None
) -> dict[str, Union[float, Tensor]]:
    """The scalars of one ``scope.step()`` call, validated (:func:`scalar_value`); None values left out.

    ``noise``: the scope's noise-scale estimator, whose per-step scalars join them (None: off).
    """
    if not scalars and val_loss is None and not noise:  # the common call: the loss alone
        return {} if loss is None else {"loss": scalar_value("loss", loss)}
    named = {"loss": loss, "val_loss": val_loss, **scalars, **(noise.scalars() if noise else {})}
    return {k: scalar_value(k, v) for k, v in named.items() if v is not None}


def scalar_value(name: str, value: Any) -> Union[float, Tensor]:
    """Validate a scalar passed to ``scope.step``; tensors stay on their device.

    Raises:
        ConfigurationError: ``value`` is not a real number or a one-element real tensor.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ConfigurationError(
                f"Expected `{name}` passed to scope.step() to be a scalar, but got a tensor of shape "
                f"{list(value.shape)}. Pass {name}=tensor.mean() (or the reduction your loss uses)."
            )
        if value.dtype.is_complex:
            raise ConfigurationError(f"Expected `{name}` passed to scope.step() to be real, but got a complex tensor.")
        if value.is_cpu:
            # sync point: CPU tensors only; the value is in host memory already, there is no device to wait for.
            # (item() reads it without the detach and reshape a device tensor needs: a fraction of a microsecond)
            return float(value.item())
        v = value.detach().reshape(())
        return v if v.is_floating_point() else v.float()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(
            f"Expected `{name}` passed to scope.step() to be a number or a one-element tensor, but got "
            f"{type(value).__name__} {value!r}."
        )
    return float(value) if not (isinstance(value, float) and math.isnan(value)) else math.nan
