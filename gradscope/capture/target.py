"""What ``watch()`` is handed: the model and optimizer, checked and unwrapped before any hook is attached."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from gradscope.capture.layout import ParamLayout
from gradscope.errors import ConfigurationError

__all__ = [
    "MAX_BUFFER_BYTES",
    "check_arguments",
    "check_buffer_size",
    "is_compiled",
    "unwrap_optimizer",
    "watchable_layout",
]

#: The largest device buffer a scope allocates (``flush_every`` rows of every tensor's moments).
MAX_BUFFER_BYTES = 2**30


def check_arguments(model: Any, optimizer: Any) -> None:
    """Check the types of what was passed as ``model`` and ``optimizer``.

    Raises:
        ConfigurationError: ``model`` is not an ``nn.Module`` (naming the common mix-ups), or
            ``optimizer`` is neither None nor a ``torch.optim.Optimizer``.
    """
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


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The torch optimizer inside wrappers that never run torch's step hooks (accelerate's AcceleratedOptimizer)."""
    while (
        optimizer is not None
        and not hasattr(optimizer, "_optimizer_step_pre_hooks")
        and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)
    ):
        optimizer = optimizer.optimizer  # type: ignore[attr-defined]  # the wrapper holds the torch optimizer, checked by the loop condition
    return optimizer


def is_compiled(model: nn.Module) -> bool:
    """True for a ``torch.compile``-wrapped module (its forward runs as a traced graph)."""
    return type(model).__name__ == "OptimizedModule"


def watchable_layout(target: nn.Module) -> ParamLayout:
    """The parameter layout of ``target`` (the unwrapped model).

    Raises:
        ConfigurationError: ``target`` has no parameters, none trainable, or some on the 'meta' device.
    """
    lazy = [
        name
        for name, t in [*target.named_parameters(remove_duplicate=False), *target.named_buffers()]
        if nn.parameter.is_lazy(t)
    ]
    if lazy:
        owners = sorted({name.rpartition(".")[0] or "(root)" for name in lazy})
        raise ConfigurationError(
            f"The {type(target).__name__} passed as `model` has uninitialised (lazy) parameters in "
            f"{', '.join(owners[:5])}{' ...' if len(owners) > 5 else ''}: their shapes are known only after a forward "
            "pass. Run one forward pass (model(example_batch)) before watch(model)."
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
    return layout


def check_buffer_size(flush_every: int, n_tensors: int, n_cols: int, itemsize: int = 8) -> None:
    """Refuse a device buffer over :data:`MAX_BUFFER_BYTES` before allocating it.

    Args:
        flush_every: rows buffered between flushes (the buffer has one more).
        n_tensors: watched parameter tensors (one buffer line each per row).
        n_cols: moment columns per tensor.
        itemsize: bytes per value (float64).

    Raises:
        ConfigurationError: naming ``flush_every`` and a value that fits.
    """
    per_row = max(n_tensors * n_cols * itemsize, 1)
    need = (flush_every + 1) * per_row
    if need > MAX_BUFFER_BYTES:
        fits = max(MAX_BUFFER_BYTES // per_row - 1, 1)
        raise ConfigurationError(
            f"`flush_every={flush_every}` would preallocate a {need / 2**30:.1f} GiB statistics buffer on the device "
            f"({n_tensors} tensors x {n_cols} moments per recorded step). Pass flush_every={min(fits, 50)} (at most "
            f"{fits} fits in {MAX_BUFFER_BYTES // 2**20} MiB)."
        )
