"""Layers that only move numbers around: ``nn.Flatten``, ``nn.Identity``, ``nn.PixelShuffle`` and ``nn.PixelUnshuffle``.

Reshaping changes no value, so its Jacobian is a permutation-free identity: the backward reshapes
the gradient back to the input's shape. A pixel shuffle permutes entries; the Jacobian of a
permutation is a permutation matrix, whose transpose is the inverse permutation, so the backward of
PixelShuffle is PixelUnshuffle applied to the gradient, and the other way round.
"""

from __future__ import annotations

from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["FlattenReference", "IdentityReference", "PixelShuffleReference", "PixelUnshuffleReference"]


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


def pixel_shuffle(x: Tensor, r: int) -> Tensor:
    """[*, C·r², H, W] -> [*, C, H·r, W·r]: channel c·r² + i·r + j moves to pixel (h·r + i, w·r + j)."""
    *lead, channels, h, w = x.shape
    y = x.reshape(*lead, channels // (r * r), r, r, h, w)
    n = len(lead)
    y = y.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)  # [*, C, H, r, W, r]
    return y.reshape(*lead, channels // (r * r), h * r, w * r)


def pixel_unshuffle(x: Tensor, r: int) -> Tensor:
    """The inverse permutation of :func:`pixel_shuffle`: [*, C, H·r, W·r] -> [*, C·r², H, W]."""
    *lead, channels, hr, wr = x.shape
    y = x.reshape(*lead, channels, hr // r, r, wr // r, r)
    n = len(lead)
    y = y.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)  # [*, C, r, r, H, W]
    return y.reshape(*lead, channels * r * r, hr // r, wr // r)


@register_reference(nn.PixelShuffle)
class PixelShuffleReference(ReferenceLayer):
    """Move blocks of r² channels into r x r pixel blocks; the backward moves the gradient back (unshuffle)."""

    module: nn.PixelShuffle

    def forward(self, x: Tensor) -> Tensor:
        """Rearrange [*, C·r², H, W] into [*, C, H·r, W·r]."""
        return pixel_shuffle(x, self.module.upscale_factor)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """A permutation's backward is its inverse permutation."""
        return pixel_unshuffle(grad_out, self.module.upscale_factor), {}


@register_reference(nn.PixelUnshuffle)
class PixelUnshuffleReference(ReferenceLayer):
    """Move r x r pixel blocks into r² channels; the backward shuffles the gradient back."""

    module: nn.PixelUnshuffle

    def forward(self, x: Tensor) -> Tensor:
        """Rearrange [*, C, H·r, W·r] into [*, C·r², H, W]."""
        return pixel_unshuffle(x, self.module.downscale_factor)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """A permutation's backward is its inverse permutation."""
        return pixel_shuffle(grad_out, self.module.downscale_factor), {}
