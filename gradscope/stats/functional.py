"""Reference definitions of the built-in statistics: pure functions of ``(grad, param)``.

Each returns a 0-d tensor on the gradient's device and never synchronises with the host. They are
the readable definitions; during training the capture engine computes the same numbers for all
parameters at once from a few fused reductions (:mod:`gradscope.stats.moments`), and the test suite
checks that both agree with NumPy in float64.

``update_ratio`` is not a function of one gradient (it needs the weights before and after the
optimizer step); :func:`update_ratio` takes both weights instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
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


def _acc(x: Tensor) -> Tensor:
    # Reduce half-precision gradients in float32: a bf16 sum of a million entries is meaningless.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def l2_norm(grad: Tensor, param: Tensor) -> Tensor:
    """Euclidean norm ``sqrt(sum(g**2))`` of the gradient."""
    return torch.linalg.vector_norm(_acc(grad))


def rms(grad: Tensor, param: Tensor) -> Tensor:
    """Root mean square ``sqrt(mean(g**2))``: the L2 norm with the layer's size divided out."""
    g = _acc(grad)
    return torch.linalg.vector_norm(g) / (g.numel() ** 0.5)


def mean(grad: Tensor, param: Tensor) -> Tensor:
    """Mean gradient entry."""
    return _acc(grad).mean()


def std(grad: Tensor, param: Tensor) -> Tensor:
    """Population standard deviation of the gradient entries (``correction=0``)."""
    return _acc(grad).std(correction=0)


def abs_max(grad: Tensor, param: Tensor) -> Tensor:
    """Largest absolute gradient entry (NaN if any entry is NaN)."""
    lo, hi = torch.aminmax(_acc(grad))
    return torch.maximum(hi, -lo)


def zero_fraction(grad: Tensor, param: Tensor) -> Tensor:
    """Fraction of gradient entries that are exactly zero (dead units leave whole rows at zero)."""
    return 1.0 - torch.count_nonzero(grad).to(torch.float64) / grad.numel()


def nonfinite_count(grad: Tensor, param: Tensor) -> Tensor:
    """Number of NaN or infinite gradient entries."""
    return (~torch.isfinite(grad)).sum()


def param_norm(grad: Tensor, param: Tensor) -> Tensor:
    """Euclidean norm of the parameter itself (the weights the gradient was computed at)."""
    return torch.linalg.vector_norm(_acc(param.detach()))


def update_ratio(before: Tensor, after: Tensor) -> Tensor:
    """``||after - before|| / ||before||``: how far one optimizer step moved the weights, relatively."""
    b, a = _acc(before.detach()), _acc(after.detach())
    return torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)
