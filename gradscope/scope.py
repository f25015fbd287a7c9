"""GradScope, the orchestrator: owns the hooks, the device buffer, the rules and the sinks.

Data flow of one optimizer step::

    loss.backward()                      autograd fills .grad (accumulation, DDP all-reduce...)
    scaler.unscale_(opt); clip_grad_...  the gradients become what the optimizer will use
    opt.step()     -> pre-hook           moments of every gradient and weight -> device buffer (no sync)
                   -> post-hook          moments of the update (w_after - w_before) -> device buffer
    scope.step(loss=loss)                Python counter += 1; scalars -> device buffer
        every `flush_every` recorded steps: ONE device-to-host copy -> rules -> sinks

Without an optimizer the gradient moments are taken at ``scope.step()``, which must then come before
``opt.zero_grad()``.
"""

from __future__ import annotations

import atexit
import math
import numbers
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from gradscope.capture.activations import ActivationMonitor
from gradscope.capture.distributed import DistributedContext
from gradscope.capture.hooks import HookManager
from gradscope.capture.layout import ParamLayout, unwrap_model
from gradscope.errors import ConfigurationError, GradscopeWarning, NonFiniteGradientError
from gradscope.options import DEFAULT_HISTORY, WatchOptions
from gradscope.report import Report
from gradscope.rules.base import RuleContext
from gradscope.rules.engine import RuleEngine, RuleSpec
from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate
from gradscope.sinks.registry import build_sink
from gradscope.stats.buffer import StatsBuffer
from gradscope.stats.frame import ACTIVATION_STATISTICS, FrameSchema, StatsFrame
from gradscope.stats.moments import MOMENT_INDEX, MomentPlan, _local

__all__ = ["GradScope", "watch"]

_M = MOMENT_INDEX
_MAX_SCALARS = 16
# One more slot after the scalars: 1 when the optimizer step was skipped (GradScaler found inf). Known
# on the host for ordinary optimizers; written on the device by fused ones (their found_inf tensor).
_SKIP_COL = _MAX_SCALARS
# With an optimizer, a step whose pre-hook did not run is a skipped step (GradScaler found inf). If
# the hook never runs at all, the optimizer passed is not the one stepping: stop trusting it.
_NO_OPTIMIZER_STEP_LIMIT = 20

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
        if not isinstance(model, nn.Module):
            if isinstance(model, torch.optim.Optimizer):
                hint = " Pass the model first and the optimizer as watch(model, optimizer=opt)."
            elif isinstance(model, Iterable) and not isinstance(model, (str, bytes)):
                hint = " Pass the model itself, not its parameters."
            else:
                hint = ""
            raise ConfigurationError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.{hint}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationError(
                f"Expected `optimizer` to be a torch.optim.Optimizer, but got {type(optimizer).__name__}. "
                "Pass the optimizer whose step() your loop calls, or leave it out."
            )
        optimizer = _unwrap_optimizer(optimizer)
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
        layout = ParamLayout.from_model(target)
        if not layout.params:
            raise ConfigurationError(
                f"The {type(target).__name__} passed as `model` has no parameters, so there are no gradients to watch."
            )
        if not any(t.requires_grad for t in layout.tensors):
            raise ConfigurationError(
                f"The {type(target).__name__} passed as `model` has no trainable parameters: all {len(layout.params)} "
                "have requires_grad=False. Unfreeze what you train (p.requires_grad_(True)) before watching."
            )
        devices = {t.device for t in layout.tensors}
        if any(d.type == "meta" for d in devices):
            raise ConfigurationError("The model has parameters on the 'meta' device; materialise it before watching.")

        self.model = model
        self.module = target
        self.optimizer = optimizer
        self.layout = layout
        self.on_nonfinite = options.on_nonfinite
        self._hooks = HookManager()

        self._plan = MomentPlan.for_statistics(self.stat_names)
        builtin, custom, sampled_stats = self._plan.builtin, self._plan.custom_reduce, self._plan.sampled_stats
        self._update_on = "update_ratio" in self.stat_names
        self._param_on = "psumsq" in self._plan.moments

        # Activation hooks would be traced into a compiled graph; under torch.compile they are off.
        self.compiled = _is_compiled(model)
        self._acts = ActivationMonitor(target, self._hooks) if activations and not self.compiled else None
        self._dist = DistributedContext.detect(layout.tensors, options.distributed)
        act_paths = self._acts.paths if self._acts else []
        self.schema = FrameSchema(
            param_names=[p.name for p in layout.params],
            param_layers=[p.layer for p in layout.params],
            param_leaves=[p.param for p in layout.params],
            numels=np.array([p.numel for p in layout.params], dtype=np.float64),
            layers=list(layout.layers),
            layer_members=layout.layer_members(),
            stats=self.stat_names,
            builtin=builtin,
            custom=custom,
            sampled_stats=sampled_stats,
            act_modules=act_paths,
            act_kinds=self._acts.kinds if self._acts else [],
            dtypes=[p.dtype for p in layout.params],
        )
        self.engine = RuleEngine(options.build_rules())
        self.engine.check_requirements(
            self.stat_names, activations=bool(act_paths) or (activations and not self.compiled)
        )

        self.device = next(t.device for t in layout.tensors if t.requires_grad)
        self._buffer = StatsBuffer(
            capacity=self.flush_every + 1,  # +1: the row of the step in progress survives a flush
            n_params=len(layout.params),
            n_cols=self._plan.n_cols,
            n_act=len(act_paths),
            n_act_cols=len(ACTIVATION_STATISTICS),
            n_scalars=_MAX_SCALARS + 1,  # + the skip flag
            device=self.device,
        )
        self.frame = StatsFrame(self.schema, history=self.history, thin_every=self.sample_every)
        self._sinks: list[Sink] = []
        for s in options.sinks:
            self._sinks.append(build_sink(s))
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
        self._pending: dict[str, Any] | None = None  # the step in progress, when it is recorded
        self._rows: list[dict[str, Any]] = []  # host metadata of buffered rows (finalised steps)
        self._scalar_cols: dict[str, int] = {}
        self._dropped_scalars: set[str] = set()
        self._skipped_steps: list[int] = []
        self._opt_seen = False
        self._trust_optimizer = optimizer is not None
        self._prev: dict[int, Tensor] = {}  # weights before the optimizer step (update ratio)
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._forward_order: list[int] = []
        # activation index -> how many parameter layers had started forward when it first ran
        self._act_position: dict[int, int] = {}
        self._warned: set[str] = set()
        self._errors: list[str] = []
        self._ended_by: str | None = None
        self._unreduced_rows = 0  # distributed: rows dropped at a non-collective close (shard-local)
        for note in self._dist.notes:
            self._problem("distributed", note)
        if self._dist.sharded and custom:
            self._warn(
                "distributed-custom",
                f"Custom statistics {sorted(custom)} are computed per shard and cannot be combined across FSDP/DTensor "
                "shards: they are NaN for sharded parameters (the built-in statistics are global).",
            )
        if optimizer is not None:
            in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(t) in in_opt for t in layout.tensors):
                self._warn(
                    "optimizer-params",
                    f"None of the {type(target).__name__}'s parameters is in the optimizer passed to watch(). Build the "
                    "optimizer from model.parameters() and call watch() after wrapping the model (fully_shard "
                    "replaces the parameters), or statistics will be taken at scope.step() instead.",
                )

        # -- attach: from here on the model carries hooks, so failures must clean up ---------------------
        try:
            self._attach()
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
        self._begin_step()

    # -- construction helpers ------------------------------------------------------------------------
    def _attach(self) -> None:
        if self.optimizer is not None:
            self._hooks.add("optimizer", self.optimizer.register_step_pre_hook(self._on_optimizer_pre))
            self._hooks.add("optimizer", self.optimizer.register_step_post_hook(self._on_optimizer_post))
        if not _is_compiled(self.model):
            # Learn the depth order of layers from the first forward pass (removed after step 1).
            owners: dict[str, list[int]] = {}
            for li, layer in enumerate(self.layout.layers):
                for owner in self.layout.owners(layer):
                    owners.setdefault(owner, []).append(li)
            for path, module in self.module.named_modules():
                if path in owners:
                    self._hooks.add("order", module.register_forward_pre_hook(self._order_hook(owners[path])))
            # Where each activation module runs among the layers: one after every layer is an output
            # activation (a confident sigmoid classifier saturates by design).
            for info, module in self._acts.entries if self._acts else []:
                self._hooks.add("order", module.register_forward_pre_hook(self._act_order_hook(info.index)))

    def _order_hook(self, layer_indices: list[int]) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            for li in layer_indices:
                if li not in self._forward_order:
                    self._forward_order.append(li)

        return hook

    def _act_order_hook(self, act_index: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._act_position.setdefault(act_index, len(self._forward_order))

        return hook

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
        return [self.layout.layers[i] for i in self._depth_order()]

    def _depth_order(self) -> list[int]:
        seen = list(self._forward_order)
        return seen + [i for i in range(len(self.layout.layers)) if i not in seen]

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
        """
        if self._closed:
            raise ConfigurationError(
                "This gradscope scope is closed; scope.step() can no longer be called. Watch again."
            )
        named = {"loss": loss, "val_loss": val_loss, **scalars}
        values = {k: _scalar_value(k, v) for k, v in named.items() if v is not None}
        self._step += 1
        if self._hooks.count("order"):
            self._hooks.remove("order")
        pending = self._pending
        if pending is not None:
            try:
                self._finish_recorded_step(pending, values)
            except NonFiniteGradientError:
                raise
            except Exception as exc:  # monitoring must never stop training
                self._problem("step", f"recording step {self._step} failed: {type(exc).__name__}: {exc}")
        self._pending = None
        if self._acts is not None:
            self._acts.disarm()
            if self._acts.compiled:
                # The model was compiled after watch(): its activation hooks ran inside a graph and
                # measured nothing. Stop arming them (adding and removing hooks would recompile).
                self._acts = None
                self._warn(
                    "compiled-activations",
                    "The watched model runs under torch.compile, so gradscope takes no activation statistics "
                    "(dead / saturated units); gradient statistics are unaffected. Watch the compiled module, "
                    "or pass activations=False, to silence this.",
                )
        if len(self._rows) >= self.flush_every:
            self.flush()
        self._begin_step()

    def flush(self) -> list:
        """Copy buffered statistics to the host, run the rules and write the sinks now.

        In a distributed run (see :mod:`gradscope.capture.distributed`) this is collective: call it on
        every rank.

        Returns:
            The findings first reported by this flush.
        """
        return self._flush(final=False)

    def report(self) -> Report:
        """Flush, then return the :class:`Report` of everything recorded so far (valid before close).

        In a distributed run it does not flush (a flush is collective, and ``report()`` is often called
        on rank 0 alone): it covers the steps up to the last flush. Call :meth:`flush` on every rank
        first, or read it after :meth:`close`, for every step.
        """
        if not self._closed and not self._dist.active:
            self._flush(final=False)
        return self._make_report()

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
            self._pending = None
            self._hooks.remove_all()
            self._prev.clear()
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

    # -- the hot path ----------------------------------------------------------------------------------
    def _recorded(self, step: int) -> bool:
        return (step - 1) % self.every == 0

    def _begin_step(self) -> None:
        """Prepare the upcoming step: claim a buffer row and arm activation hooks when it is sampled."""
        upcoming = self._step + 1
        if not self._recorded(upcoming):
            return
        slot = self._buffer.claim()
        sampled = (upcoming - 1) % self.sample_every == 0
        self._pending = {"slot": slot, "step": upcoming, "grads_done": False, "opt_stepped": False, "sampled": sampled}
        if sampled and self._acts is not None and self._acts.entries:
            buffer = self._buffer
            self._acts.arm(lambda: buffer.activations(slot))  # type: ignore[union-attr]

    def _present(self) -> tuple[list[int], list[bool]]:
        idx: list[int] = []
        trainable: list[bool] = []
        for i, t in enumerate(self.layout.tensors):
            tr = t.requires_grad
            trainable.append(tr)
            if tr and t.grad is not None:
                idx.append(i)
        return idx, trainable

    def _index_tensor(self, idx: list[int]) -> Tensor:
        key = tuple(idx)
        t = self._index_cache.get(key)
        if t is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            t = torch.tensor(idx, dtype=torch.long, device=self._buffer.device)
            self._index_cache[key] = t
        return t

    def _capture_grads(self, pending: dict[str, Any]) -> None:
        """Moments of every present gradient and weight into the pending row (device work only)."""
        idx, trainable = self._present()
        pending["grads_done"] = True
        pending["present"] = idx
        pending["trainable"] = trainable
        if not idx:
            return
        slot = pending["slot"]
        view = self._buffer.moments(slot)
        grads = [self.layout.tensors[i].grad for i in idx]
        params = [self.layout.tensors[i] for i in idx]
        by_device: dict[torch.device, list[int]] = {}
        for k, g in enumerate(grads):
            by_device.setdefault(g.device, []).append(k)  # type: ignore[union-attr]
        blocks: list[tuple[list[int], Tensor]] = []
        for dev_idx in by_device.values():
            g_sub = [grads[k] for k in dev_idx]
            p_sub = [params[k] for k in dev_idx]
            block = (
                self._plan.grad_moments(g_sub, p_sub, sampled=pending["sampled"]) if self._plan.needs_grads else None
            )
            if block is None:
                block = torch.full(
                    (len(dev_idx), self._plan.n_cols), float("nan"), dtype=torch.float64, device=g_sub[0].device
                )
            scale = pending.get("grad_scale")
            if scale is not None:
                block = _unscale_moments(block, scale)
            if self._param_on and pending["sampled"]:
                block[:, _M["psumsq"]] = MomentPlan.param_sumsq(p_sub)
            blocks.append(([idx[k] for k in dev_idx], block.to(view.device, non_blocking=True)))
        for rows, block in blocks:
            block = block.to(view.dtype)
            if len(rows) == view.shape[0]:
                view.copy_(block)
            else:
                view.index_copy_(0, self._index_tensor(rows), block)
        for sink in self._sinks:
            if type(sink).on_step is not Sink.on_step:
                try:
                    sink.on_step(pending["step"], [(self.layout.params[i], self.layout.tensors[i].grad) for i in idx])  # type: ignore[misc]
                except Exception as exc:
                    self._problem(f"sink-step-{type(sink).__name__}", f"{type(sink).__name__}.on_step failed: {exc}")
        if self.on_nonfinite == "raise":
            finite = self._finite_flag(view, idx)
            if self._dist.sharded:
                finite = self._dist.all_finite(finite)  # a NaN sits in one rank's shard; all must stop
            if pending.get("found_inf") is not None:
                finite = finite | (pending["found_inf"].reshape(()) > 0)  # the fused step skips it
            pending["finite"] = finite

    def _finite_flag(self, view: Tensor, idx: list[int]) -> Tensor:
        rows = view if len(idx) == view.shape[0] else view.index_select(0, self._index_tensor(idx))
        cols = [_M[m] for m in ("sumsq", "sum", "min", "max") if m in self._plan.moments]
        return torch.isfinite(rows[:, cols[:1] or [_M["sumsq"]]]).all()

    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        pending = self._pending
        self._opt_seen = True
        if pending is None:
            return None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure):
            # opt.step(closure) (Lightning, LBFGS): the backward pass runs inside step(), so the gradients
            # the optimizer uses exist only once the closure returns. Capture then, not now.
            return _with_closure(args, kwargs, self._after_closure(optimizer, closure, pending))
        self._capture_for_step(optimizer, pending)
        return None

    def _after_closure(self, optimizer: Any, closure: Any, pending: dict[str, Any]) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            out = closure(*a, **kw)
            if not pending["grads_done"]:  # LBFGS evaluates several times: the first is the step's gradient
                self._capture_for_step(optimizer, pending)
            else:  # a later evaluation within the same step is not a stray backward pass
                pending["grad_marker"] = self._grad_marker()
            return out

        return wrapped

    def _capture_for_step(self, optimizer: Any, pending: dict[str, Any]) -> None:
        try:
            pending["opt_stepped"] = True
            self._read_loss_scale(optimizer, pending)
            self._capture_grads(pending)
            pending["grad_marker"] = self._grad_marker()
            if self._update_on and pending["sampled"]:
                self._snapshot_weights(pending)
        except Exception as exc:
            self._problem(
                "optimizer-pre", f"capturing gradients before optimizer.step() failed: {type(exc).__name__}: {exc}"
            )

    def _read_loss_scale(self, optimizer: Any, pending: dict[str, Any]) -> None:
        """Note the loss scale still in the gradients and the device-side skip flag of a fused step.

        GradScaler with an optimizer that unscales inside its own (fused) step: at the pre-hook the
        gradients still carry the loss scale, and the step is skipped on the device when found_inf > 0.
        GradScaler sets both tensors on the optimizer for the duration of its step only.
        """
        scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(scale, Tensor):
            pending["grad_scale"] = scale
        if isinstance(found_inf, Tensor) and self._trust_optimizer:
            pending["found_inf"] = found_inf
            col = self._buffer.scalars(pending["slot"])[_SKIP_COL]
            col.copy_(found_inf.reshape(()).to(device=col.device, dtype=col.dtype, non_blocking=True))

    def _grad_marker(self) -> tuple[int, int] | None:
        # Identity and version of one gradient: changes when a backward pass writes the gradients.
        for t in self.layout.tensors:
            if t.grad is not None:
                return (id(t.grad), t.grad._version)
        return None

    def _snapshot_weights(self, pending: dict[str, Any]) -> None:
        in_opt = {id(p) for group in self.optimizer.param_groups for p in group["params"]}  # type: ignore[union-attr]
        upd = [i for i in pending["present"] if id(self.layout.tensors[i]) in in_opt]
        pending["updated"] = upd
        if not upd:
            return
        # DTensor (FSDP2): copy the local shard; the update's moments are reduced with the others.
        src = [_local(self.layout.tensors[i].detach()) for i in upd]
        dst = []
        for i, p in zip(upd, src):
            buf = self._prev.get(i)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = torch.empty_like(p)
                self._prev[i] = buf
            dst.append(buf)
        torch._foreach_copy_(dst, src)

    def _on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending = self._pending
        if pending is None or not self._update_on or not pending.get("updated"):
            return
        try:
            upd = pending["updated"]
            prev = [self._prev[i] for i in upd]
            # prev <- before - after; its sum of squares is ||update||^2 (prev is refilled next step)
            torch._foreach_sub_(prev, [_local(self.layout.tensors[i].detach()) for i in upd])
            dsq = MomentPlan.param_sumsq(prev)
            view = self._buffer.moments(pending["slot"])
            col = view[:, _M["dsumsq"]]
            dsq = dsq.to(device=view.device, dtype=view.dtype, non_blocking=True)
            if len(upd) == view.shape[0]:
                col.copy_(dsq)
            else:
                col.index_copy_(0, self._index_tensor(upd), dsq)
        except Exception as exc:
            self._problem("optimizer-post", f"measuring the optimizer update failed: {type(exc).__name__}: {exc}")

    def _finish_recorded_step(self, pending: dict[str, Any], values: dict[str, Any]) -> None:
        skipped = False
        if self._trust_optimizer:
            if not pending["opt_stepped"]:
                skipped = True
                if not self._opt_seen and self._step >= _NO_OPTIMIZER_STEP_LIMIT:
                    self._distrust_optimizer()
                    skipped = False
        if not pending["grads_done"]:
            self._capture_grads(pending)
        elif (
            "grad_marker" in pending
            and pending["grad_marker"] != self._grad_marker()
            and self._grad_marker() is not None
        ):
            self._warn(
                "order",
                "A backward pass ran between optimizer.step() and scope.step(): call scope.step() right after "
                "optimizer.step(), once per optimizer step, or the statistics land one step late.",
            )
        slot = pending["slot"]
        if values:
            self._write_scalars(slot, values)
        if skipped:
            self._buffer.scalars(slot)[_SKIP_COL].fill_(1.0)  # carried through distributed reductions
        n_params = len(self.layout.params)
        has = np.zeros(n_params, dtype=bool)
        has[pending.get("present", [])] = True
        self._rows.append(
            {
                "step": self._step,
                "skipped": skipped,
                "passed": [self._scalar_cols[k] for k in values if k in self._scalar_cols],
                "has_grad": has,
                "trainable": np.array(
                    pending.get("trainable", [t.requires_grad for t in self.layout.tensors]), dtype=bool
                ),
                "sampled": pending["sampled"],
            }
        )
        if skipped:
            self._skipped_steps.append(self._step)
        if self.on_nonfinite == "raise" and not skipped and "finite" in pending:
            # sync point: on_nonfinite="raise" reads one flag per recorded step, by request.
            if not bool(pending["finite"]):
                self._raise_nonfinite()

    def _raise_nonfinite(self) -> None:
        new = self._flush(final=False)
        found = [f for f in self.engine.findings if f.kind == "nonfinite_gradients" and f.step == self._step] or [
            f for f in new if f.severity == "error"
        ]
        if found:
            msg = "\n".join(str(f) for f in found)
        else:
            frame = self.frame
            row = len(frame) - 1
            bad = [
                self.layout.layers[li]
                for li in reversed(self._depth_order())
                if np.any(~np.isfinite(frame.moments[row, self.schema.layer_members[li], _M["min"]]))
                or np.any(~np.isfinite(frame.moments[row, self.schema.layer_members[li], _M["sumsq"]]))
            ]
            msg = (
                f"Non-finite gradient at step {self._step}; first layer in backward order: "
                f"{bad[0] if bad else '(unknown)'!r}."
            )
        raise NonFiniteGradientError(msg, report=self._make_report())

    def _distrust_optimizer(self) -> None:
        self._trust_optimizer = False
        self._skipped_steps.clear()
        for row in self._rows:
            row["skipped"] = False
        if len(self.frame):
            self.frame.skipped[:] = False
        self._warn(
            "optimizer-never-stepped",
            f"gradscope saw no optimizer.step() in {self._step} steps on the optimizer passed to watch(); is it the "
            "one your loop steps? Statistics are now taken at scope.step() and no step is treated as skipped.",
        )

    def _write_scalars(self, slot: int, values: dict[str, Any]) -> None:
        view = self._buffer.scalars(slot)
        for name, v in values.items():
            col = self._scalar_cols.get(name)
            if col is None:
                if len(self._scalar_cols) >= _MAX_SCALARS:
                    if name not in self._dropped_scalars:
                        self._dropped_scalars.add(name)
                        self._warn(
                            f"scalar-{name}", f"gradscope records at most {_MAX_SCALARS} scalars; {name!r} is dropped."
                        )
                    continue
                col = self._scalar_cols[name] = len(self._scalar_cols)
            if isinstance(v, Tensor):
                view[col].copy_(v.to(device=view.device, dtype=view.dtype, non_blocking=True))
            else:
                view[col].fill_(v)

    # -- flush -----------------------------------------------------------------------------------------
    def _flush(self, *, final: bool, collective: bool = True) -> list:
        n = len(self._rows)
        new_findings: list = []
        if n:
            pending_row = self._buffer.used > n  # the step in progress holds the last row
            if self._dist.active and collective:
                self._reduce_rows(n)
            moments, act, scalars = self._snapshot(n, keep_pending=pending_row)
            if self._dist.active and not collective and self._dist.sharded:
                # Shard-local moments cannot become global without the other ranks: leave these rows out
                # rather than report a shard's norm as the layer's (report.meta["distributed"] counts them).
                self._unreduced_rows += n
                self._rows = []
                n = 0
        if n:
            skipped = np.array([r["skipped"] for r in self._rows], dtype=bool)
            if self._trust_optimizer:
                # Steps skipped on the device (fused optimizer + GradScaler) or, after a distributed
                # reduction, on any rank.
                late = (scalars[:, _SKIP_COL] > 0) & ~skipped
                if late.any():
                    skipped |= late
                    self._skipped_steps = sorted(
                        {*self._skipped_steps, *(r["step"] for r, x in zip(self._rows, late) if x)}
                    )
            chunk = {
                "steps": np.array([r["step"] for r in self._rows], dtype=np.int64),
                "skipped": skipped,
                "has_grad": np.stack([r["has_grad"] for r in self._rows]),
                "trainable": np.stack([r["trainable"] for r in self._rows]),
                "sampled": np.array([r["sampled"] for r in self._rows], dtype=bool),
                "moments": moments,
                "act": act,
                "scalars": scalars[:, : len(self._scalar_cols)],
            }
            self.frame.append(chunk, list(self._scalar_cols))
            start = len(self.frame) - n  # after append: bounded history may have thinned older rows
            self._rows = []
        else:
            start = len(self.frame)
        if n or final:
            ctx = RuleContext(
                frame=self.frame,
                new_from=start,
                forward_order=self._depth_order(),
                has_optimizer=self.optimizer is not None,
                final=final,
                every=self.every,
                sample_every=self.sample_every,
                step_count=self._step,
                output_activations=tuple(self._output_activations()),
            )
            if len(self.frame):
                new_findings = self.engine.run(ctx)
            update = SinkUpdate(
                frame=self.frame,
                new_from=start,
                findings=new_findings,
                layers_by_depth=self.layers_by_depth(),
                final=final,
            )
            for sink in self._sinks:
                try:
                    sink.write(update)
                except Exception as exc:
                    self._problem(
                        f"sink-{type(sink).__name__}",
                        f"{type(sink).__name__}.write failed: {type(exc).__name__}: {exc}",
                    )
        return new_findings

    def _output_activations(self) -> list[int]:
        """Activation modules that ran after every parameter layer had started (nothing learnable follows)."""
        n_layers = len(self._forward_order)
        return sorted(a for a, pos in self._act_position.items() if n_layers and pos >= n_layers)

    def _reduce_rows(self, n: int) -> None:
        """Distributed: make the first ``n`` buffer rows global, in place on the device (collective)."""
        buf = self._buffer
        passed = np.zeros((n, _MAX_SCALARS + 1), dtype=bool)
        for i, r in enumerate(self._rows):
            passed[i, r["passed"]] = True
        names = list(self._scalar_cols)
        moments = buf.storage[:n, : buf._a].view(n, *buf.shape_moments)
        act = buf.storage[:n, buf._a : buf._b].view(n, *buf.shape_act)
        agreed = self._dist.reduce(
            moments,
            act,
            buf.storage[:n, buf._b :],
            names=names,
            passed=passed,
            skip_col=_SKIP_COL,
            max_names=_MAX_SCALARS,
        )
        if agreed != names:
            # Another rank logged other scalars: columns now follow the list every rank shares.
            self._scalar_cols = {name: i for i, name in enumerate(agreed)}

    def _snapshot(self, n: int, *, keep_pending: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        buf = self._buffer
        used = buf.used
        buf.used = n
        out = buf.snapshot()
        if keep_pending:
            # Move the row of the step in progress (activations may already be in it) to the front.
            buf.storage[0].copy_(buf.storage[used - 1])
            buf.used = 1
            if self._pending is not None:
                self._pending["slot"] = 0
                if self._pending["sampled"] and self._acts is not None:
                    self._acts.retarget(lambda: buf.activations(0))
        return out

    def _make_report(self) -> Report:
        meta = {
            "model": type(self.module).__name__,
            "parameters": int(sum(p.numel for p in self.layout.params)),
            "trainable_parameters": int(sum(t.numel() for t in self.layout.tensors if t.requires_grad)),
            "tensors": len(self.layout.params),
            "layers": len(self.layout.layers),
            "layers_by_depth": self.layers_by_depth(),
            "device": str(self.device),
            "steps": self._step,
            "recorded_steps": len(self.frame) + len(self._rows),
            "every": self.every,
            "sample_every": self.sample_every,
            "stats": list(self.stat_names),
            "rules": [r.name for r in self.engine.rules],
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "history": self.frame.history_info(),
            "compiled": self.compiled,
            "activations": self._acts is not None and bool(self._acts.entries),
        }
        if self._dist.world_size > 1:
            meta["distributed"] = {**self._dist.describe(), "unreduced_rows_dropped": self._unreduced_rows}
        if self._ended_by is not None:
            meta["ended_by"] = self._ended_by
        return Report(
            findings=list(self.engine.findings),
            frame=self.frame,
            skipped_steps=list(self._skipped_steps),
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


def _unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The torch optimizer inside wrappers that never run torch's step hooks (accelerate's AcceleratedOptimizer)."""
    while (
        optimizer is not None
        and not hasattr(optimizer, "_optimizer_step_pre_hooks")
        and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)
    ):
        optimizer = optimizer.optimizer  # type: ignore[attr-defined]
    return optimizer


def _with_closure(args: Any, kwargs: Any, closure: Any) -> tuple[Any, Any]:
    """``(args, kwargs)`` of ``optimizer.step`` with its closure replaced (args[0] is the optimizer)."""
    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure}
    return (args[0], closure, *args[2:]), kwargs


def _is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule"


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


def _scalar_value(name: str, value: Any) -> Union[float, Tensor]:
    """Validate a scalar passed to ``scope.step``; tensors stay on their device."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ConfigurationError(
                f"Expected `{name}` passed to scope.step() to be a scalar, but got a tensor of shape "
                f"{list(value.shape)}. Pass {name}=tensor.mean() (or the reduction your loss uses)."
            )
        if value.is_complex():
            raise ConfigurationError(f"Expected `{name}` passed to scope.step() to be real, but got a complex tensor.")
        v = value.detach().reshape(())
        if v.device.type == "cpu":
            # sync point: CPU tensors only; the value is in host memory already, there is no device to wait for.
            return float(v)
        return v if v.is_floating_point() else v.float()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(
            f"Expected `{name}` passed to scope.step() to be a number or a one-element tensor, but got "
            f"{type(value).__name__} {value!r}."
        )
    return float(value) if not (isinstance(value, float) and math.isnan(value)) else math.nan


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
        sinks=sinks,
        history=history,
        report_path=report_path,
        distributed=distributed,
        histogram_every=histogram_every,
        histogram_weights=histogram_weights,
        figure_every=figure_every,
    )
    return GradScope(model, optimizer=optimizer, options=options)
