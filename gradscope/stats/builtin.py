"""The built-in statistics, one block each: name, moments, host derivation, and reference definition.

Adding a built-in statistic is one block here (the test suite picks it up from the registry and holds
its derivation to its reference definition). Each block reads:

* the name users see, and the moments (:data:`gradscope.stats.moments.MOMENTS`) it is derived from;
  whether it is taken at every recorded step or on sampled steps only follows from those moments;
* ``derive``: its value from (aggregated) moments on the host, ``m.<moment>`` and ``m.numel``; NumPy
  warnings are off, so an empty layer simply gives NaN;
* the decorated function: its plain definition as a pure function of ``(grad, param)``, a 0-d tensor
  on the gradient's device that never synchronises with the host. It is the readable definition and
  the reference the fused path is tested against; training never calls it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from gradscope.stats.base import EXACT, MomentView, Statistic
from gradscope.stats.moments import CORE_MOMENTS
from gradscope.stats.registry import STATISTICS

__all__ = [
    "BUILTIN_STATISTICS",
    "DEFAULT_STATISTICS",
    "abs_max",
    "l2_norm",
    "mean",
    "nonfinite_count",
    "param_norm",
    "rms",
    "std",
    "update_ratio",
    "zero_fraction",
]

Reference = Callable[[Tensor, Tensor], Tensor]


def _builtin(
    name: str,
    *,
    moments: tuple[str, ...],
    derive: Callable[[MomentView], np.ndarray],
    needs_optimizer: bool = False,
) -> Callable[[Reference], Reference]:
    """Register the decorated reference definition as the built-in statistic ``name``."""

    def register(fn: Reference) -> Reference:
        stat = Statistic(
            name=name,
            fn=fn,
            reduce=EXACT,
            moments=moments,
            derive=derive,
            sampled=not set(moments) <= CORE_MOMENTS,
            needs_optimizer=needs_optimizer,
        )
        if name not in STATISTICS:  # importing this module twice (a reload) must not fail
            STATISTICS.register(name, stat)
        return fn

    return register


def _acc(x: Tensor) -> Tensor:
    # Reduce half-precision gradients in float32: a bf16 sum of a million entries is meaningless.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@_builtin("l2_norm", moments=("sumsq",), derive=lambda m: np.sqrt(m.sumsq))
def l2_norm(grad: Tensor, param: Tensor) -> Tensor:
    """Euclidean norm ``sqrt(sum(g**2))`` of the gradient."""
    return torch.linalg.vector_norm(_acc(grad))


@_builtin("rms", moments=("sumsq",), derive=lambda m: np.sqrt(m.sumsq / m.numel))
def rms(grad: Tensor, param: Tensor) -> Tensor:
    """Root mean square ``sqrt(mean(g**2))``: the L2 norm with the layer's size divided out."""
    g = _acc(grad)
    return torch.linalg.vector_norm(g) / (g.numel() ** 0.5)


@_builtin("mean", moments=("sum",), derive=lambda m: m.sum / m.numel)
def mean(grad: Tensor, param: Tensor) -> Tensor:
    """Mean gradient entry."""
    return _acc(grad).mean()


def _std(m: MomentView) -> np.ndarray:
    mu = m.sum / m.numel
    # Population variance from the first two moments, clipped at 0 against rounding.
    return np.sqrt(np.maximum(m.sumsq / m.numel - mu * mu, 0.0))


@_builtin("std", moments=("sum", "sumsq"), derive=_std)
def std(grad: Tensor, param: Tensor) -> Tensor:
    """Population standard deviation of the gradient entries (``correction=0``)."""
    return _acc(grad).std(correction=0)


@_builtin("abs_max", moments=("min", "max"), derive=lambda m: np.maximum(np.abs(m.min), np.abs(m.max)))
def abs_max(grad: Tensor, param: Tensor) -> Tensor:
    """Largest absolute gradient entry (NaN if any entry is NaN)."""
    lo, hi = torch.aminmax(_acc(grad))
    return torch.maximum(hi, -lo)


@_builtin("zero_fraction", moments=("nnz",), derive=lambda m: (m.numel - m.nnz) / m.numel)
def zero_fraction(grad: Tensor, param: Tensor) -> Tensor:
    """Fraction of gradient entries that are exactly zero (dead units leave whole rows at zero)."""
    return 1.0 - torch.count_nonzero(grad).to(torch.float64) / grad.numel()


# The sum of squares doubles as a free "all finite?" flag, so the exact count (a pass of its own)
# only runs on steps where that flag is down (see MomentPlan._nonfinite); both are taken every step.
@_builtin("nonfinite_count", moments=("sumsq", "nonfinite"), derive=lambda m: m.nonfinite.copy())
def nonfinite_count(grad: Tensor, param: Tensor) -> Tensor:
    """Number of NaN or infinite gradient entries."""
    return (~torch.isfinite(grad)).sum()


@_builtin("param_norm", moments=("psumsq",), derive=lambda m: np.sqrt(m.psumsq))
def param_norm(grad: Tensor, param: Tensor) -> Tensor:
    """Euclidean norm of the parameter itself (the weights the gradient was computed at)."""
    return torch.linalg.vector_norm(_acc(param.detach()))


@_builtin(
    "update_ratio",
    moments=("psumsq", "dsumsq"),
    derive=lambda m: np.sqrt(m.dsumsq) / np.sqrt(m.psumsq),
    needs_optimizer=True,
)
def update_ratio(before: Tensor, after: Tensor) -> Tensor:
    """``||after - before|| / ||before||``: how far one optimizer step moved the weights, relatively.

    Not a function of one gradient: it takes the weights before and after the optimizer's step.
    """
    b, a = _acc(before.detach()), _acc(after.detach())
    return torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)


#: Every built-in statistic, in the order above.
BUILTIN_STATISTICS: tuple[str, ...] = tuple(name for name, s in STATISTICS.items() if s.builtin)
#: Collected when ``watch(stats=None)``; ``update_ratio`` only when an optimizer is given.
DEFAULT_STATISTICS: tuple[str, ...] = BUILTIN_STATISTICS
