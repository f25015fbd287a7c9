"""``nn.Dropout``: zero each entry with probability p and scale the survivors by 1/(1-p).

The randomness is the only thing the reference cannot recompute, so the mask is given: in eval mode
(or with p = 0) dropout is the identity; in training mode the reference pass reads the keep mask of
this call from ``masks`` (``gradscope.verify`` records the mask PyTorch drew, by replaying the random
state of the autograd run).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradscope.errors import ConfigurationError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["DropoutReference"]


@register_reference(nn.Dropout)
class DropoutReference(ReferenceLayer):
    """y = x ⊙ m / (1 - p) for a keep mask m; dy/dx = m / (1 - p), the same mask on the way back."""

    module: nn.Dropout

    def forward(self, x: Tensor) -> Tensor:
        """Apply the recorded keep mask (training) or nothing (eval, p = 0)."""
        p = float(self.module.p)
        if not self.module.training or p == 0.0:
            self.scale = None
            return x
        if p == 1.0:
            self.scale = torch.zeros_like(x)
        else:
            mask = self._tape.mask(self.path, self.call, x) if self._tape is not None else None
            if mask is None:
                raise ConfigurationError(
                    f"Dropout at {self.path or '(model)'!r} is in training mode, so its output depends on a "
                    f"random mask. Pass the keep mask as masks={{{self.path!r}: mask}} (a bool tensor of shape "
                    f"{list(x.shape)}), or call model.eval() before the reference pass."
                )
            # Divide the same way PyTorch does (mask, then / (1 - p)) so the values agree bit for bit.
            self.scale = mask.to(x.dtype) / (1.0 - p)
        return x * self.scale

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Dropped entries get no gradient; kept ones get it scaled by 1/(1-p)."""
        return (grad_out if self.scale is None else grad_out * self.scale), {}
