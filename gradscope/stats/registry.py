"""The statistics registry: ``STATISTICS`` and ``@gradscope.register_statistic``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from gradscope._registry import Registry
from gradscope.errors import RegistryError
from gradscope.stats.base import REDUCTIONS, Statistic

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["STATISTICS", "register_statistic"]

STATISTICS: Registry[Statistic] = Registry("statistic", "@gradscope.register_statistic")


def register_statistic(
    name: str, *, reduce: str = "mean", overwrite: bool = False
) -> Callable[[Callable[[Tensor, Tensor], Tensor]], Callable[[Tensor, Tensor], Tensor]]:
    """Register a per-parameter gradient statistic under ``name``.

    The function receives ``(grad, param)`` (same shape, same device) and returns a 0-d tensor on that
    device. It must not synchronise with the host (no ``.item()``, no ``if tensor:``) and must not
    modify its arguments. ``reduce`` says how per-parameter values combine into the layer aggregate
    (``param == "*"`` in ``report.stats``): ``"mean"`` (weighted by element count), ``"sum"``,
    ``"max"``, ``"min"`` or ``"norm"`` (square root of the sum of squares).

    Example:
        >>> import torch, gradscope
        >>> @gradscope.register_statistic("frac_positive", reduce="mean")
        ... def frac_positive(grad, param):
        ...     return (grad > 0).float().mean()
        >>> _ = gradscope.registry.STATISTICS.unregister("frac_positive")

    Returns:
        The decorator, which registers and returns the function unchanged.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(
            f"Expected the statistic name to be a Python identifier such as 'grad_p99', but got {name!r}."
        )
    if reduce not in REDUCTIONS:
        raise RegistryError(
            f"Expected `reduce` for statistic {name!r} to be one of {', '.join(REDUCTIONS)}, but got {reduce!r}."
        )

    def decorator(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        if not callable(fn):
            raise RegistryError(f"@register_statistic({name!r}) must decorate a function, got {fn!r}.")
        STATISTICS.register(name, Statistic(name=name, fn=fn, reduce=reduce), overwrite=overwrite)
        return fn

    return decorator
