"""A gradient known on a sample of its coordinates: what the finite-difference fallback returns.

It lives on its own, below :mod:`gradscope.reference.base`, because a reference layer's backward may
return one (the type :data:`~gradscope.reference.base.GradientOrSample` names it) while the fallback
that produces it is itself a reference layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SampledGradient"]


@dataclass(frozen=True)
class SampledGradient:
    """A gradient known on some of its coordinates, estimated by central differences.

    Attributes:
        shape: the shape of the full gradient.
        indices: ``[k]`` flat (row-major) indices of the coordinates estimated, ascending.
        values: ``[k]`` the estimates at those coordinates.
    """

    shape: torch.Size
    indices: Tensor
    values: Tensor

    @property
    def complete(self) -> bool:
        """True when every coordinate was estimated."""
        return self.indices.numel() == self.shape.numel()

    def full(self) -> Tensor:
        """The gradient as a dense tensor (only meaningful when :attr:`complete`)."""
        dense = torch.zeros(self.shape.numel(), dtype=self.values.dtype, device=self.values.device)
        return dense.index_copy_(0, self.indices, self.values).reshape(self.shape)
