"""The "simple" gradient noise scale ``B_simple = tr(Sigma) / |G|^2``, from two batch sizes the run already has.

McCandlish et al., 2018, "An Empirical Model of Large-Batch Training", appendix A. ``G`` is the true
(expected) gradient and ``Sigma`` the per-sample gradient covariance. The mean gradient ``G_B`` of a
batch of ``B`` independent samples has ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``, so two batch sizes
``B_small < B_big`` give unbiased estimates of both, without per-sample gradients::

    |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Single-step estimates are noisy (``|G|^2`` can come out negative), so :meth:`NoiseScale.estimate`
returns the ratio of their running means over steps (or of exponential moving averages, ``decay=``).

Where the two batch sizes come from:

* **Gradient accumulation** (``mode="accumulation"``): the first micro-batch against the accumulated
  gradient of the ``k`` micro-batches of one optimizer step. A ``register_post_accumulate_grad_hook``
  on each parameter adds ``|param.grad|^2`` into a device accumulator on its first call after an
  optimizer step (``param.grad`` then holds the first micro-batch's gradient alone); the number of
  calls per step gives ``k``. At the optimizer's step (a step pre-hook, or :meth:`NoiseScale.mark_step`)
  the accumulated gradient's squared norm is taken with one fused ``_foreach_norm``.
* **DDP** (``mode="ddp"``): each rank's local gradient against the all-reduced one. A communication
  hook wraps the inner hook (the default all-reduce unless told otherwise): it adds the squared norm
  of the local bucket before the reduction, and that of the reduced bucket when its future completes.
  ``B_small`` is the per-rank batch, ``B_big = world_size * B_small``.

Everything on the hot path stays on the device: a few tiny kernels per parameter per step, no host
sync. :meth:`NoiseScale.estimate` reads three numbers back (one sync, by request).

Scale of the gradients. Only the ratio ``B_big / B_small`` and the relative scale of the two gradients
matter for ``B_simple``: a constant factor on every gradient (a loss divided by ``k``, a loss scale
held constant within the step) cancels. With mean-reduced micro-batch losses, the accumulated gradient
is the *sum* of the micro-batch means (``accumulation="sum"``, the default: ``G_big = accumulated / k``,
``G_small = first``) or, when each loss is divided by ``k``, their mean (``accumulation="mean"``:
``G_big = accumulated``, ``G_small = k * first``). The choice changes the reported ``trace_sigma`` and
``grad_sq`` (by ``k^2``), never ``b_simple``. Without ``batch_size=``, ``B_small`` is taken as 1:
``b_simple`` is then counted in micro-batches (DDP: per-rank batches) instead of samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from gradscope.capture.hooks import HookManager
from gradscope.errors import ConfigurationError

__all__ = [
    "ACCUMULATION",
    "MODES",
    "NoiseScale",
    "NoiseScaleEstimate",
    "noise_scale_from_option",
    "scope_estimate",
    "watch_noise_scale",
]

#: ``NoiseScale(mode=...)``: "auto" picks "ddp" for a ``DistributedDataParallel`` model, else "accumulation".
MODES = ("auto", "accumulation", "ddp")
#: ``NoiseScale(accumulation=...)``: how the micro-batch gradients add up (see the module docstring).
ACCUMULATION = ("sum", "mean")
#: A batch this many times below (above) ``b_simple`` is "far below" ("far above") it.
FAR = 10.0
_GROUP = "noise_scale"  # the HookManager group of every handle


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """The current noise-scale estimate and what it is made of.

    Attributes:
        b_simple: ``trace_sigma / grad_sq``, in samples (``unit``); NaN before two usable steps, or
            when ``grad_sq <= 0`` (the gradient is lost in the noise: the noise scale is very large).
        trace_sigma: mean of the per-step estimates of ``tr(Sigma)`` (per-sample gradient variance).
        grad_sq: mean of the per-step estimates of ``|G|^2`` (squared norm of the true gradient).
        steps: optimizer steps averaged (with ``decay``, the effective number: the sum of the weights).
        skipped: steps left out: a single micro-batch (no second batch size), or a non-finite gradient.
        b_small: the smaller batch size of the last step, in ``unit``.
        b_big: the larger one: the batch of one optimizer step (accumulated, or global under DDP).
        unit: "samples" when ``batch_size`` was given, else "micro-batches" or "local batches".
        mode: "accumulation" or "ddp".
    """

    b_simple: float
    trace_sigma: float
    grad_sq: float
    steps: float
    skipped: int
    b_small: float
    b_big: float
    unit: str
    mode: str

    @property
    def steps_factor(self) -> float:
        """``1 + b_simple / b_big``: optimizer steps needed relative to an infinitely large batch.

        From the paper's model ``S = S_min (1 + B_noise / B)``, with ``B_simple`` for ``B_noise``.
        """
        return 1.0 + self.b_simple / self.b_big if self.b_big > 0 else math.nan

    @property
    def data_factor(self) -> float:
        """``1 + b_big / b_simple``: samples processed relative to the smallest possible batch.

        From the paper's model ``E = E_min (1 + B / B_noise)``: above 2 the batch is past the critical
        batch size and most extra samples per step are spent for little progress.
        """
        return 1.0 + self.b_big / self.b_simple if self.b_simple > 0 else math.nan

    @property
    def verdict(self) -> str:
        """``"far below"`` (the batch is under ``b_simple / FAR``), ``"far above"``, ``"near"`` or ``"unknown"``."""
        if not (self.b_simple > 0 and math.isfinite(self.b_simple)):
            return "unknown"
        if self.b_big * FAR < self.b_simple:
            return "far below"
        if self.b_big > FAR * self.b_simple:
            return "far above"
        return "near"

    def to_dict(self) -> dict[str, Any]:
        """Every field and derived figure, JSON-ready (NaN stays NaN)."""
        out = asdict(self)
        out.update(steps_factor=self.steps_factor, data_factor=self.data_factor, verdict=self.verdict)
        return out


def _sq_norm(t: Tensor) -> Tensor:
    """``|t|^2`` as a 0-d tensor: accumulated in float32 at least (bf16/fp16 gradients), float64 kept."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=dtype).square()


def _sq_norm_sum(ts: list[Tensor]) -> Tensor:
    """``sum |t|^2`` over ``ts`` in float64: one fused ``_foreach_norm`` per dtype class."""
    wide = [t for t in ts if t.dtype == torch.float64]
    rest = [t for t in ts if t.dtype != torch.float64]
    parts = [torch.stack(torch._foreach_norm(rest, 2, dtype=torch.float32)).double()] if rest else []
    if wide:
        parts.append(torch.stack(torch._foreach_norm(wide, 2)))
    return torch.cat(parts).square().sum()


class _Detached:
    """A handle whose ``remove()`` marks the estimator detached (a DDP comm hook cannot be removed)."""

    def __init__(self, owner: NoiseScale) -> None:
        self.owner = owner

    def remove(self) -> None:
        self.owner._attached = False
        self.owner._closed = True


def _is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


class NoiseScale:
    """Estimates the simple gradient noise scale of a training run, on the device, without host syncs.

    Args:
        model: the model that is trained (a ``DistributedDataParallel`` wrapper for ``mode="ddp"``).
        optimizer: its optimizer; each of its steps ends one estimation step. Without it, call
            :meth:`mark_step` after the last backward of each step (required under accumulation; under
            DDP each synchronised backward is one step anyway).
        batch_size: samples per micro-batch (accumulation) or per rank (DDP); None counts
            ``b_simple`` in those batches instead of samples.
        mode: one of :data:`MODES`.
        accumulation: one of :data:`ACCUMULATION`; only the reported components depend on it.
        decay: None for plain running means since :meth:`attach` / :meth:`reset`; a float in (0, 1) for
            exponential moving averages that follow the noise scale as training moves on (it grows
            as the loss falls).
        comm_hook: under DDP, the communication hook to wrap, with ``comm_state`` its state (default:
            ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook`` on the default
            group). DDP takes one hook per model: pass yours here instead of registering it.
        comm_state: the state passed to ``comm_hook``.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision run under accumulation. The first
            micro-batch's gradient is read while still scaled, the accumulated one after
            ``scaler.unscale_``; its squared norm is divided by the scale squared, on the device.
        hooks: a :class:`~gradscope.capture.hooks.HookManager` to keep the handles in (group
            ``"noise_scale"``; a scope passes its own, so that removing its hooks removes these too).

    Raises:
        ConfigurationError: an argument is out of range, or ``mode="ddp"`` without a DDP model.

    Example::

        ns = NoiseScale(model, optimizer=opt, batch_size=32).attach()
        ...  # train: k backward passes, opt.step(), opt.zero_grad()
        print(ns.estimate().b_simple)
        ns.close()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        batch_size: int | None = None,
        mode: str = "auto",
        accumulation: str = "sum",
        decay: float | None = None,
        comm_hook: Callable[[Any, Any], Any] | None = None,
        comm_state: Any = None,
        scaler: Any = None,
        hooks: HookManager | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"NoiseScale: expected `model` to be a torch.nn.Module, but got {model!r}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationError(
                f"NoiseScale: expected `optimizer` to be a torch.optim.Optimizer or None, but got {optimizer!r}."
            )
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ConfigurationError(
                f"NoiseScale: expected `batch_size` to be a positive int (samples per micro-batch, or per rank "
                f"under DDP) or None, but got {batch_size!r}."
            )
        if mode not in MODES:
            raise ConfigurationError(f"NoiseScale: expected `mode` to be one of {MODES}, but got {mode!r}.")
        if mode == "auto":
            mode = "ddp" if _is_ddp(model) else "accumulation"
        if mode == "ddp" and not _is_ddp(model):
            raise ConfigurationError(
                f"NoiseScale: mode='ddp' needs the DistributedDataParallel wrapper, but got a "
                f"{type(model).__name__}. Pass the DDP model, or mode='accumulation'."
            )
        if accumulation not in ACCUMULATION:
            raise ConfigurationError(
                f"NoiseScale: expected `accumulation` to be one of {ACCUMULATION}, but got {accumulation!r}."
            )
        if decay is not None and not (isinstance(decay, (int, float)) and 0.0 < decay < 1.0):
            raise ConfigurationError(
                f"NoiseScale: expected `decay` to be None or a float in (0, 1) (e.g. 0.99), but got {decay!r}."
            )
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise ConfigurationError(f"NoiseScale: expected `scaler` to be a torch.amp.GradScaler, but got {scaler!r}.")
        if comm_hook is not None and mode != "ddp":
            raise ConfigurationError("NoiseScale: `comm_hook` applies to mode='ddp' only; drop it.")
        self.model, self.optimizer, self.batch_size = model, optimizer, batch_size
        self.mode, self.accumulation, self.decay = mode, accumulation, decay
        self._comm_hook, self._comm_state = comm_hook, comm_state
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigurationError(f"NoiseScale: this {type(model).__name__} has no parameter that requires grad.")
        self.device = self.params[0].device
        self._hooks = HookManager() if hooks is None else hooks
        self._attached = False
        self._closed = False
        self._comm_registered = False
        self._world = 1
        # Device accumulators (float64 scalars): the current step's two squared norms, and the running
        # sums (or EMAs) of the per-step estimates and of their weights.
        self._place(torch.zeros(5, dtype=torch.float64, device=self.device))
        # Host-side counts (Python ints: no sync).
        self._calls = [0] * len(self.params)
        self._steps = 0
        self._skipped = 0
        self._pending = False  # DDP: a synchronised backward ran and was not folded into the sums yet
        self._last = (math.nan, math.nan)

    def _place(self, acc: Tensor) -> None:
        self._acc = acc
        self._cur_small, self._cur_big, self._sum_g2, self._sum_tr, self._weight = acc.unbind(0)
        self.device = acc.device

    def _follow(self, device: torch.device) -> None:
        # The model moved after construction (watch() before .to("cuda")): move the accumulators once.
        if device != self.device:
            self._place(self._acc.to(device))

    # -- lifecycle -----------------------------------------------------------------------------------
    def attach(self) -> NoiseScale:
        """Register the hooks; returns ``self``. Under DDP, call it before the first backward."""
        if self._closed:
            raise ConfigurationError("NoiseScale: this estimator is closed; build a new one.")
        if self._attached:
            return self
        if self.mode == "accumulation":
            for i, p in enumerate(self.params):
                self._hooks.add(_GROUP, p.register_post_accumulate_grad_hook(self._grad_hook(i)))
        else:
            self._attach_ddp()
        if self.optimizer is not None:
            self._hooks.add(_GROUP, self.optimizer.register_step_pre_hook(self._optimizer_pre_hook))
        self._hooks.add(_GROUP, _Detached(self))  # a scope's remove_all() also stops the DDP wrapper
        self._attached = True
        return self

    def close(self) -> NoiseScaleEstimate:
        """Remove the hooks and return the last estimate (one sync).

        A DDP communication hook cannot be unregistered: it stays, and from now on only forwards to the
        inner hook.
        """
        est = self.estimate()
        self.detach()
        return est

    def detach(self) -> None:
        """Remove the hooks without reading the estimate (no sync); :meth:`estimate` still works."""
        self._hooks.remove(_GROUP)
        self._attached = False
        self._closed = True

    def reset(self) -> None:
        """Forget every step so far (the next estimate averages from here)."""
        self._acc.zero_()
        self._calls = [0] * len(self.params)
        self._steps = self._skipped = 0
        self._pending = False

    def __enter__(self) -> NoiseScale:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- hot path ------------------------------------------------------------------------------------
    def _grad_hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            self._calls[i] += 1
            if self._calls[i] == 1 and p.grad is not None:
                self._follow(p.grad.device)
                # First backward of the step for this parameter: .grad holds the first micro-batch alone
                # (the optimizer step was followed by zero_grad). One norm kernel, added on the device.
                sq = _sq_norm(p.grad)
                scale = getattr(self.scaler, "_scale", None)  # device tensor; get_scale() would sync
                if scale is not None:
                    sq = sq / scale.to(sq.device).square()
                self._cur_small.add_(sq)

        return hook

    def _optimizer_pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.mark_step()

    def mark_step(self) -> None:
        """End the current step: fold its two squared norms into the running estimates.

        Called by the optimizer's step pre-hook when ``optimizer=`` was given; call it yourself after
        the last backward of each step otherwise. Under DDP it is optional (each synchronised backward
        is a step).
        """
        if self.mode == "accumulation":
            k = max(self._calls)
            self._calls = [0] * len(self.params)
            if k == 0:
                return  # no backward since the last step (an optimizer step with no new gradient)
            if k == 1:
                self._skipped += 1  # one micro-batch: a single batch size, nothing to compare
                self._cur_small.zero_()
                return
            grads = [p.grad for p in self.params if p.grad is not None and p.grad.device == self.device]
            big = _sq_norm_sum(grads)  # fused: one kernel for the whole accumulated gradient
            self._fold(self._cur_small, big, k)
        elif self._pending:
            self._pending = False
            self._fold(self._cur_small, self._cur_big, self._world)

    def _fold(self, small_raw: Tensor, big_raw: Tensor, k: int) -> None:
        """Add one step's estimates of ``|G|^2`` and ``tr(Sigma)`` to the running sums, on the device."""
        b = float(self.batch_size or 1)
        b_small, b_big = b, k * b
        if self.mode == "accumulation" and self.accumulation == "mean":
            small, big = small_raw * (k * k), big_raw  # first = G_small / k, accumulated = G_big
        elif self.mode == "accumulation":
            small, big = small_raw, big_raw / (k * k)  # first = G_small, accumulated = k * G_big
        else:
            small, big = small_raw, big_raw  # DDP averages over ranks: reduced = G_big
        g2 = (b_big * big - b_small * small) / (b_big - b_small)
        tr = (small - big) / (1.0 / b_small - 1.0 / b_big)
        ok = torch.isfinite(g2) & torch.isfinite(tr)  # a NaN step must not poison the running means
        if self.decay is not None:
            self._acc[2:].mul_(self.decay)
        self._sum_g2.add_(torch.where(ok, g2, 0.0))
        self._sum_tr.add_(torch.where(ok, tr, 0.0))
        self._weight.add_(ok.to(torch.float64))
        self._cur_small.zero_()
        self._cur_big.zero_()
        self._steps += 1
        self._last = (b_small, b_big)

    # -- DDP -----------------------------------------------------------------------------------------
    def _attach_ddp(self) -> None:
        import torch.distributed as dist

        if self._comm_registered:
            return
        self._world = dist.get_world_size(self._group())
        if self._world < 2:
            raise ConfigurationError(
                "NoiseScale: mode='ddp' needs at least 2 ranks (the local and the reduced gradient differ "
                "only then); with one process use gradient accumulation and mode='accumulation'."
            )
        inner = self._comm_hook
        if inner is None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            inner = allreduce_hook
        try:
            self.model.register_comm_hook(self._comm_state, self._wrap(inner))  # type: ignore[operator]  # a DDP model (checked at construction)
        except RuntimeError as exc:  # DDP takes one communication hook per model
            raise ConfigurationError(
                f"NoiseScale: could not register its DDP communication hook ({exc}). DDP takes one hook per "
                "model: build NoiseScale before registering yours and pass it as comm_hook=/comm_state=."
            ) from None
        self._comm_registered = True

    def _group(self) -> Any:
        import torch.distributed as dist

        # The default hook's state is its process group (None: the default group).
        return self._comm_state if isinstance(self._comm_state, dist.ProcessGroup) else None

    def _wrap(self, inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def hook(state: Any, bucket: Any) -> Any:
            if not self._attached:
                return inner(state, bucket)
            if self._pending:
                self.mark_step()  # the previous synchronised backward, all its reductions done
            self._follow(bucket.buffer().device)
            # The local gradient, before the inner hook divides and reduces it in place.
            self._cur_small.add_(_sq_norm(bucket.buffer()))
            if bucket.is_last():
                self._pending = True
            fut = inner(state, bucket)

            def reduced(f: Any) -> Tensor:
                value = f.value()
                t = value[0] if isinstance(value, (list, tuple)) else value
                self._cur_big.add_(_sq_norm(t))
                return t

            return fut.then(reduced)

        # DDP compares the annotations with dist.GradBucket / Future[Tensor]; under postponed
        # evaluation they are strings and would be refused, so the hook carries none at run time.
        hook.__annotations__.clear()
        return hook

    # -- reading -------------------------------------------------------------------------------------
    def value(self) -> Tensor:
        """The current ``b_simple`` as a 0-d float64 tensor on the device, without a host sync.

        NaN until a usable step, or while the running ``|G|^2`` is not positive. Made to be passed to
        ``scope.step(noise_scale=ns.value())``, which records it with the other scalars.
        """
        if self.mode == "ddp" and self._pending:
            self.mark_step()
        g2, tr = self._sum_g2, self._sum_tr
        return torch.where(g2 > 0, tr / g2, torch.full_like(g2, math.nan))

    def estimate(self, *, all_ranks: bool = False) -> NoiseScaleEstimate:
        """The current estimate: the ratio of the running means of ``tr(Sigma)`` and ``|G|^2``.

        Args:
            all_ranks: under DDP, average the per-step estimates of every rank (one all-reduce: every
                rank must call it). Each rank's own estimate is unbiased; averaging only lowers its
                variance.

        Returns:
            A :class:`NoiseScaleEstimate`.
        """
        if self.mode == "ddp" and self._pending:
            self.mark_step()
        sums = self._acc[2:].clone()
        ranks = self._world if all_ranks and self.mode == "ddp" else 1
        if ranks > 1:
            import torch.distributed as dist

            dist.all_reduce(sums, group=self._group())
        # sync point: estimate() by request, three numbers read back.
        g2_sum, tr_sum, weight = sums.tolist()
        g2 = g2_sum / weight if weight > 0 else math.nan
        tr = tr_sum / weight if weight > 0 else math.nan
        b_simple = tr / g2 if weight > 0 and g2 > 0 else math.nan
        if self.batch_size is not None:
            unit = "samples"
        else:
            unit = "micro-batches" if self.mode == "accumulation" else "local batches"
        b_small, b_big = self._last
        return NoiseScaleEstimate(
            b_simple=b_simple,
            trace_sigma=tr,
            grad_sq=g2,
            steps=weight / ranks,
            skipped=self._skipped + (self._steps - round(weight / ranks) if self.decay is None else 0),
            b_small=b_small,
            b_big=b_big,
            unit=unit,
            mode=self.mode,
        )

    def scalars(self) -> dict[str, Tensor | float]:
        """What a scope adds to the scalars of each step (no sync).

        ``noise_scale``: :meth:`value`. Without ``decay``, also the running sums of the per-step estimates
        of ``tr(Sigma)`` and ``|G|^2`` (``noise_scale_trace_sum``, ``noise_scale_grad_sq_sum``) and the
        batch of the last step (``noise_scale_batch``, ``b_big``): the rules ``batch_size_too_small`` and
        ``batch_size_too_large`` difference the sums between recorded steps to judge a recent window,
        whatever ``every`` is (an exponential moving average cannot be differenced, so ``decay`` leaves
        them out).
        """
        out: dict[str, Tensor | float] = {"noise_scale": self.value()}
        if self.decay is None:
            out["noise_scale_trace_sum"] = self._sum_tr
            out["noise_scale_grad_sq_sum"] = self._sum_g2
            out["noise_scale_batch"] = self._last[1]
        return out

    def __repr__(self) -> str:
        return f"NoiseScale(mode={self.mode!r}, batch_size={self.batch_size}, steps={self._steps})"


def watch_noise_scale(model: nn.Module, **kwargs: Any) -> NoiseScale:
    """Build a :class:`NoiseScale` with ``kwargs`` and attach it: ``watch_noise_scale(model, optimizer=opt)``."""
    return NoiseScale(model, **kwargs).attach()


def noise_scale_from_option(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, option: bool | int, hooks: HookManager | None = None
) -> NoiseScale | None:
    """The estimator ``watch(noise_scale=option)`` asks for, attached; None when ``option`` is False.

    Args:
        model: the watched model (the DDP wrapper under DDP).
        optimizer: the watched optimizer (its steps end the estimation steps).
        option: False (off), True (on, ``b_simple`` in micro-batches or per-rank batches), or the
            micro-batch (DDP: per-rank) size in samples.
        hooks: the scope's hook manager (its ``remove_all()`` then removes these hooks too).
    """
    if option is False:
        return None
    return NoiseScale(model, optimizer=optimizer, batch_size=None if option is True else option, hooks=hooks).attach()


def scope_estimate(noise: NoiseScale | None) -> NoiseScaleEstimate:
    """``scope.noise_scale()``: the estimate of the scope's estimator (one host sync).

    Raises:
        ConfigurationError: the scope was watched without ``noise_scale=``.
    """
    if noise is None:
        raise ConfigurationError(
            "scope.noise_scale() needs the estimator: watch(model, optimizer=opt, noise_scale=True), or "
            "noise_scale=<micro-batch size> (per rank under DDP) for b_simple in samples."
        )
    return noise.estimate()
