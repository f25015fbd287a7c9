"""``nn.Linear``: y = x Wᵀ + b, the layer every other layer's backward resembles."""

from __future__ import annotations

from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["LinearReference"]


@register_reference(nn.Linear)
class LinearReference(ReferenceLayer):
    """y = x Wᵀ + b over the last dimension; x: ``[*, in_features]``, y: ``[*, out_features]``.

    Local derivatives: dy/dx = W, dy/dW = x, dy/db = 1. Each output row depends on its own input row
    only, so the weight gradient sums the outer products ``grad_out[n] ⊗ x[n]`` over every leading
    position n: one matrix product.
    """

    module: nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = x Wᵀ + b."""
        self.x = x
        y = x @ self.module.weight.T
        return y + self.module.bias if self.module.bias is not None else y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Return dx = g W, dW = Σₙ gₙᵀ xₙ, db = Σₙ gₙ."""
        g = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]: every leading position is a sample
        x = self.x.reshape(-1, self.x.shape[-1])  # [N, in]
        grads: ParamGrads = {"weight": g.T @ x}
        if self.module.bias is not None:
            grads["bias"] = g.sum(0)
        return grad_out @ self.module.weight, grads
