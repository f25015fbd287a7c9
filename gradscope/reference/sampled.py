"""Gradients known numerically, not entry by entry: what the finite-difference fallback returns.

The fallback cannot afford a full numerical gradient (two forwards per entry), so it returns one of:

- :class:`SampledGradient`: central-difference estimates of chosen entries (every entry of a small tensor),
- :class:`DirectionalGradient`: estimates of the directional derivative ⟨∇, v⟩ along a few random
  directions v that cover the whole tensor.

Each estimate carries its own error bound, so that the comparison with autograd (see
:func:`gradscope.reference.report.compare`) is as tight as the numerics allow and no tighter. They
live here, below :mod:`gradscope.reference.base`, because a reference layer's backward may return one
(the type :data:`~gradscope.reference.base.GradientOrSample` names them) while the fallback that
produces them is itself a reference layer.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = ["DirectionalGradient", "JointEstimate", "SampledGradient", "rademacher", "rounding_rtol"]

#: Relative rounding error to allow between two correct computations of one gradient in a dtype: the
#: default ``rtol`` of :func:`gradscope.verify`, and what a module that computes internally in a lower
#: precision (an RMSNorm in float32 inside a float64 model) is held to.
_ROUNDING_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}


def rounding_rtol(dtype: torch.dtype) -> float:
    """The relative tolerance for two correct gradients computed in ``dtype`` (1e-10 in float64, 1e-4 in float32)."""
    return _ROUNDING_RTOL.get(dtype, 1e-4)


@dataclass(frozen=True)
class SampledGradient:
    """A gradient known on some of its entries, estimated by central differences.

    Attributes:
        shape: the shape of the full gradient.
        indices: ``[k]`` flat (row-major) indices of the entries estimated, ascending.
        values: ``[k]`` the estimates at those entries.
        errors: ``[k]`` a bound on each estimate's error (truncation and rounding); zeros when unknown.
        rtol: the relative rounding error allowed on the autograd side (the module's working precision).
        excluded: why some entries were left out (``""`` when none were).
    """

    shape: torch.Size
    indices: Tensor
    values: Tensor
    errors: Tensor | None = None
    rtol: float = 0.0
    excluded: str = ""

    @property
    def complete(self) -> bool:
        """True when every entry was estimated."""
        return self.indices.numel() == self.shape.numel()

    @property
    def count(self) -> int:
        """How many numbers were compared."""
        return int(self.indices.numel())

    def full(self) -> Tensor:
        """The gradient as a dense tensor (only meaningful when :attr:`complete`)."""
        dense = torch.zeros(self.shape.numel(), dtype=self.values.dtype, device=self.values.device)
        return dense.index_copy_(0, self.indices, self.values).reshape(self.shape)

    def project(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """``grad`` at the estimated entries, and the norm of each direction (1: a unit vector)."""
        picked = grad.detach().reshape(-1)[self.indices.to(grad.device)].to(torch.float64)
        return picked, torch.ones_like(picked)


def rademacher(numel: int, count: int, seed: int, device: torch.device) -> Tensor:
    """``[count, numel]`` float64 random signs (±1), the same for the same ``seed`` on every run and device."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (count, numel), generator=generator, dtype=torch.int8)
    return (signs.to(device=device, dtype=torch.float64) * 2) - 1


def direction_seed(seed: int, name: str) -> int:
    """The seed of one tensor's directions: the user's seed and the tensor's name (crc32, since ``hash()`` is salted)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


@dataclass(eq=False)
class JointEstimate:
    """Directional derivatives of one module along directions that perturb all its tensors at once.

    The fallback first differences the module's input and all its parameters together: direction j
    moves every tensor T along w_T·v_{T,j} at the same time, so k directions cost 4k forwards whatever
    the number of tensors, and the estimate is of Σ_T w_T ⟨∇_T, v_{T,j}⟩. The argument of
    :class:`DirectionalGradient` holds for the concatenated vector: a single wrong entry anywhere in the
    module shifts every direction's value by exactly w_T times its error. Only when this joint check
    fails is each tensor differenced on its own (:attr:`refine`), to say which one is wrong.

    Attributes:
        values: ``[k]`` the estimates of the joint directional derivatives.
        errors: ``[k]`` their error bounds.
        layer: the module call, as the report names it.
        members: how many tensors the directions perturb.
        refine: differences one tensor on its own, by its label (``"3:input"``, ``"3.weight"``).
    """

    values: Tensor
    errors: Tensor
    layer: str
    members: int
    refine: Optional[Callable[[str], Union[SampledGradient, DirectionalGradient]]] = None


@dataclass(frozen=True)
class DirectionalGradient:
    """A gradient known through its directional derivatives ⟨∇, v_j⟩ along random sign vectors v_j.

    Why a few directions suffice: let d = g_autograd − g_true be the error, and v a Rademacher vector
    (independent ±1 entries). The check compares ⟨g_autograd, v⟩ with a numerical estimate of
    ⟨g_true, v⟩, so it sees s = ⟨d, v⟩ = d_i v_i + Σ_{j≠i} d_j v_j. Fix every sign but v_i: the two
    values of v_i give two values of s that are 2|d_i| apart, so at most one of them lies within the
    tolerance t of zero when |d_i| > t. One direction therefore misses an error with an entry above
    t with probability at most 1/2, and k independent directions miss it with probability at most
    2^-k (k = 7: below 0.01). When d has a single wrong entry, s = ±d_i whatever the signs: every
    direction sees it, and it is caught with certainty once |d_i| exceeds the tolerance.

    Attributes:
        shape: the shape of the full gradient.
        seed: regenerates the directions (:func:`rademacher`); entries outside ``mask`` are zero.
        values: ``[k]`` the numerical estimates of ⟨∇, v_j⟩ (Richardson-extrapolated central differences).
        errors: ``[k]`` a bound on each estimate's error (truncation and rounding).
        rtol: the relative rounding error allowed on the autograd side (the module's working precision).
        mask: flat bool tensor of the entries the directions cover, or ``None`` for all.
        excluded: why entries outside ``mask`` were left out (``""`` when none were).
        weight: the tensor moves along ``weight * v_j`` (its step scale, when differenced jointly).
        joint: the joint estimate this tensor is part of (then ``values`` are the joint values).
        label: the tensor's name in the report, for :attr:`JointEstimate.refine`.
    """

    shape: torch.Size
    seed: int
    values: Tensor
    errors: Tensor
    rtol: float = 0.0
    mask: Tensor | None = field(default=None, compare=False)
    excluded: str = ""
    weight: float = 1.0
    joint: JointEstimate | None = field(default=None, compare=False)
    label: str = ""

    complete = False

    @property
    def count(self) -> int:
        """How many directions were compared."""
        return int(self.values.numel())

    def directions(self, device: torch.device) -> Tensor:
        """``[k, numel]`` the directions, float64 on ``device``."""
        v = rademacher(self.shape.numel(), self.count, self.seed, device)
        if self.mask is not None:
            v = v * self.mask.to(device=device, dtype=v.dtype)
        return v

    def project(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """⟨grad, w v_j⟩ for each direction, and ‖w v_j‖₂ (w times the square root of the entries covered)."""
        flat = grad.detach().reshape(-1).to(torch.float64)
        v = self.directions(flat.device)
        return (v @ flat) * self.weight, v.norm(dim=1) * self.weight
