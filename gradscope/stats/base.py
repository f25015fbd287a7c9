"""What a statistic is: a named pure function of ``(grad, param)`` and how it aggregates per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

__all__ = ["REDUCTIONS", "Statistic"]

#: How per-parameter values of a statistic combine into the layer aggregate (``param == "*"``).
REDUCTIONS = ("mean", "sum", "max", "min", "norm")


@dataclass(frozen=True)
class Statistic:
    """A registered statistic.

    Attributes:
        name: the key users see (``report.stats["stat"]``, TensorBoard tags).
        fn: ``(grad, param) -> 0-d tensor`` on the gradient's device, never syncing with the host.
            For built-in statistics this is the plain reference definition; the capture engine computes
            the built-ins in one fused pass instead and tests that both agree.
        reduce: how per-parameter values combine into the layer aggregate, one of :data:`REDUCTIONS`.
        builtin: True for the statistics gradscope ships (computed by the fused pass).
        needs_optimizer: True when the value only exists for a step the optimizer took (update ratio).
    """

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    reduce: str = "mean"
    builtin: bool = False
    needs_optimizer: bool = False
