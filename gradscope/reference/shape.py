"""Layers that only move numbers around: ``nn.Flatten`` and ``nn.Identity``.

Reshaping changes no value, so its Jacobian is a permutation-free identity: the backward reshapes
the gradient back to the input's shape.
"""

from __future__ import annotations

from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["FlattenReference", "IdentityReference"]


@register_reference(nn.Flatten)
class FlattenReference(ReferenceLayer):
    """Merge dimensions ``start_dim..end_dim``; the backward restores the input shape."""

    module: nn.Flatten

    def forward(self, x: Tensor) -> Tensor:
        """``x.flatten(start_dim, end_dim)``."""
        self.shape = x.shape
        return x.flatten(self.module.start_dim, self.module.end_dim)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Reshape the gradient back: each input entry received exactly its output entry's gradient."""
        return grad_out.reshape(self.shape), {}


@register_reference(nn.Identity)
class IdentityReference(ReferenceLayer):
    """y = x; dy/dx = I."""

    def forward(self, x: Tensor) -> Tensor:
        """Return the input."""
        return x

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Pass the gradient through unchanged."""
        return grad_out, {}
