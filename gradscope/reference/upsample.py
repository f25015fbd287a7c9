"""Resampling: ``nn.Upsample`` (nearest, nearest-exact, linear, bilinear, trilinear) and its 2-d aliases.

Every mode here is separable and linear in x: along each spatial axis, output position i is a fixed
combination of at most two input positions. So the layer is one small interpolation matrix Mₐ
``[out, in]`` per axis (y = Mₕ x M_wᵀ in 2-d), and its backward applies the transposes: every input
pixel collects the gradients of the outputs it contributed to, weighted as it contributed. The source
positions follow PyTorch's rules (``align_corners``, and the scale used when ``scale_factor`` is given).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["UpsampleReference", "interpolation_matrix"]

_SPATIAL = {"linear": 1, "bilinear": 2, "trilinear": 3}


def interpolation_matrix(
    size: int, out: int, mode: str, align_corners: bool, scale: float | None, dtype: torch.dtype
) -> Tensor:
    """The ``[out, size]`` matrix of one axis: row i holds the weights output i gives the input positions.

    Args:
        size: the input length along the axis.
        out: the output length.
        mode: ``"nearest"``, ``"nearest-exact"``, or a linear mode.
        align_corners: linear modes only: map the corner pixels' centres onto each other.
        scale: the ``scale_factor`` PyTorch uses for this axis, or ``None`` to use size / out.
        dtype: the input's dtype; source positions are computed in it, as PyTorch's CPU kernels do.
    """
    i = torch.arange(out, dtype=dtype)
    if align_corners and mode not in ("nearest", "nearest-exact"):
        ratio = (size - 1) / (out - 1) if out > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale is not None and scale > 0 else size / out
    matrix = torch.zeros(out, size, dtype=dtype)
    rows = torch.arange(out)
    if mode == "nearest":  # src = floor(i · ratio), clipped to the last pixel
        src = torch.clamp(torch.floor(i * ratio).long(), max=size - 1)
        return matrix.index_put_((rows, src), torch.ones(out, dtype=dtype))
    if mode == "nearest-exact":  # src = floor((i + 1/2) · ratio)
        src = torch.clamp(torch.floor((i + 0.5) * ratio).long(), max=size - 1)
        return matrix.index_put_((rows, src), torch.ones(out, dtype=dtype))
    # Linear: src = i · ratio (align_corners) or (i + 1/2) · ratio - 1/2 clamped at 0; then the two neighbours.
    src = i * ratio if align_corners else torch.clamp((i + 0.5) * ratio - 0.5, min=0)
    left = torch.floor(src).long()
    right = torch.clamp(left + 1, max=size - 1)
    weight_right = src - left.to(dtype)
    matrix.index_put_((rows, left), 1 - weight_right, accumulate=True)
    return matrix.index_put_((rows, right), weight_right, accumulate=True)


def _along(x: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """Apply ``matrix`` [out, size] to axis ``axis`` of x."""
    return torch.movedim(torch.movedim(x, axis, -1) @ matrix.T, -1, axis)


@register_reference(nn.Upsample)
@register_reference(nn.UpsamplingNearest2d)
@register_reference(nn.UpsamplingBilinear2d)
class UpsampleReference(ReferenceLayer):
    """y = x resampled along each spatial axis of x ``[N, C, *spatial]`` by a matrix Mₐ; dx applies each Mₐᵀ.

    ``nn.UpsamplingBilinear2d`` is bilinear with ``align_corners=True``; ``nn.UpsamplingNearest2d`` is
    nearest. Bicubic and area modes have no reference.
    """

    module: nn.Upsample

    def forward(self, x: Tensor) -> Tensor:
        """Multiply by one interpolation matrix per spatial axis."""
        m = self.module
        if m.mode not in ("nearest", "nearest-exact", *_SPATIAL):
            raise UnsupportedLayerError(
                f"No reference backward for Upsample {self.path or '(model)'!r} with mode={m.mode!r}; the "
                "reference covers nearest, nearest-exact, linear, bilinear and trilinear. Use "
                "gradscope.verify(..., on_unsupported='finite_difference')."
            )
        spatial = x.dim() - 2
        size = x.shape[2:]
        if m.size is not None:
            out = tuple(m.size) if isinstance(m.size, (tuple, list)) else (m.size,) * spatial
            scales: tuple[float | None, ...] = (None,) * spatial
        else:
            factors: tuple[Any, ...] = (
                tuple(m.scale_factor) if isinstance(m.scale_factor, (tuple, list)) else (m.scale_factor,) * spatial
            )
            out = tuple(math.floor(float(s) * float(f)) for s, f in zip(size, factors))
            # With recompute_scale_factor the kernel sees only the output size, so it uses size / out.
            scales = (None,) * spatial if m.recompute_scale_factor else tuple(float(f) for f in factors)
        align = bool(m.align_corners)
        self.matrices = [
            interpolation_matrix(s, o, m.mode, align, scale, x.dtype).to(x.device)
            for s, o, scale in zip(size, out, scales)
        ]
        for axis, matrix in enumerate(self.matrices, start=2):
            x = _along(x, matrix, axis)
        return x

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Each input pixel collects the output gradients it contributed to: the transposed matrices."""
        for axis, matrix in enumerate(self.matrices, start=2):
            grad_out = _along(grad_out, matrix.T, axis)
        return grad_out, {}
