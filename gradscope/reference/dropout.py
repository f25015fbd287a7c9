"""Dropout: ``nn.Dropout`` zeroes entries, ``nn.Dropout1d/2d/3d`` zero whole channels.

Each zeroes with probability p and scales the survivors by 1/(1-p). The randomness is the only thing
the reference cannot recompute, so the mask is given: in eval mode (or with p = 0) dropout is the
identity; in training mode the reference pass reads the keep mask of this call from ``masks``
(``gradscope.verify`` records the mask PyTorch drew, by replaying the random state of the autograd
run through :func:`draw_keep_mask`). The channel variants keep or drop a channel as a whole, but the
mask the reference reads has the input's shape either way: it says, entry by entry, what survived.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.errors import ConfigurationError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["DROPOUT_FUNCTIONS", "DropoutReference", "draw_keep_mask"]

#: The dropout modules with a reference, and the function their forward draws the mask with.
DROPOUT_FUNCTIONS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Dropout: F.dropout,
    nn.Dropout1d: F.dropout1d,
    nn.Dropout2d: F.dropout2d,
    nn.Dropout3d: F.dropout3d,
}


def draw_keep_mask(module: nn.Module, x: Tensor) -> Tensor | None:
    """The keep mask ``module(x)`` draws from the current random state, or ``None`` if it draws none.

    Run it from the random state the module's own forward started from (see
    :func:`gradscope.reference.rng.replay_rng`): the same function on an input of the same shape makes
    the same draws, so the mask is the one the forward applied. ``None`` for a module that is not a
    dropout with a reference, in eval mode, or with p of 0 or 1 (nothing random happens).
    """
    draw = DROPOUT_FUNCTIONS.get(type(module))
    p = float(getattr(module, "p", 0.0))
    if draw is None or not module.training or not 0.0 < p < 1.0:
        return None
    return draw(torch.ones_like(x), p, training=True) != 0


@register_reference(nn.Dropout)
@register_reference(nn.Dropout1d)
@register_reference(nn.Dropout2d)
@register_reference(nn.Dropout3d)
class DropoutReference(ReferenceLayer):
    """y = x ⊙ m / (1 - p) for a keep mask m; dy/dx = m / (1 - p), the same mask on the way back."""

    module: nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d

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
                    f"{type(self.module).__name__} at {self.path or '(model)'!r} is in training mode, so its "
                    f"output depends on a random mask. Pass the keep mask as masks={{{self.path!r}: mask}} (a bool "
                    f"tensor of shape {list(x.shape)}), or call model.eval() before the reference pass."
                )
            # Divide the same way PyTorch does (mask, then / (1 - p)) so the values agree bit for bit.
            self.scale = mask.to(x.dtype) / (1.0 - p)
        return x * self.scale

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Dropped entries get no gradient; kept ones get it scaled by 1/(1-p)."""
        return (grad_out if self.scale is None else grad_out * self.scale), {}
