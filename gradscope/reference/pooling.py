"""Pooling: ``nn.MaxPool2d``, ``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d``.

Max and average pooling use the convolution trick (see :mod:`gradscope.reference.conv`): ``unfold``
lays every window out as a column, the forward reduces each column, and ``fold`` adds the column
gradients back onto the pixels. Max pooling routes each window's gradient to the one pixel that won
(the first maximum, as PyTorch does); average pooling spreads it evenly over the window. Adaptive
average pooling is linear and separable, so it is two small averaging matrices: y = Pₕ x P_wᵀ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["AdaptiveAvgPoolReference", "AvgPoolReference", "MaxPoolReference", "pool_output_size"]


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of a pooling window sweep along one axis, with PyTorch's ``ceil_mode`` rule.

    In ceil mode a last, partial window is kept only if it starts inside the input or the left padding.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


class _WindowedPool(ReferenceLayer):
    """Shared plumbing: pad, unfold into windows ``[N, C, kh·kw, Ho·Wo]``, and fold gradients back."""

    module: nn.MaxPool2d | nn.AvgPool2d
    fill: float = 0.0

    def _windows(self, x: Tensor, dilation: tuple[int, int]) -> Tensor:
        m = self.module
        self.unbatched = x.dim() == 3
        x4 = x.unsqueeze(0) if self.unbatched else x
        self.input_shape = x.shape
        self.kernel, self.stride, self.padding = (
            _pair(m.kernel_size),
            _pair(m.stride or m.kernel_size),
            _pair(m.padding),
        )
        self.dilation = dilation
        size = x4.shape[-2:]
        self.out_hw = tuple(
            pool_output_size(size[a], self.kernel[a], self.stride[a], self.padding[a], dilation[a], m.ceil_mode)
            for a in range(2)
        )
        # Pad by `padding` on both sides, and further at the end when ceil_mode keeps a partial window.
        extent = [(self.out_hw[a] - 1) * self.stride[a] + dilation[a] * (self.kernel[a] - 1) + 1 for a in range(2)]
        after = [max(self.padding[a], extent[a] - size[a] - self.padding[a]) for a in range(2)]
        self.crop = ((self.padding[0], after[0]), (self.padding[1], after[1]))
        padded = F.pad(x4, (self.padding[1], after[1], self.padding[0], after[0]), value=self.fill)
        self.padded_hw = padded.shape[-2:]
        n, c = padded.shape[:2]
        cols = F.unfold(padded, self.kernel, dilation=dilation, stride=self.stride)
        # The padding above makes unfold produce exactly the windows PyTorch pools over.
        assert cols.shape[-1] == self.out_hw[0] * self.out_hw[1], (cols.shape, self.out_hw)
        return cols.reshape(n, c, self.kernel[0] * self.kernel[1], -1)

    def _fold(self, grad_windows: Tensor) -> Tensor:
        n = grad_windows.shape[0]
        grad_padded = F.fold(
            grad_windows.reshape(n, -1, grad_windows.shape[-1]),
            self.padded_hw,
            self.kernel,
            dilation=self.dilation,
            stride=self.stride,
        )
        (top, bottom), (left, right) = self.crop
        grad_x = grad_padded[..., top : grad_padded.shape[-2] - bottom, left : grad_padded.shape[-1] - right]
        return grad_x.reshape(self.input_shape)

    def _shape_output(self, out: Tensor) -> Tensor:
        y = out.reshape(*out.shape[:2], *self.out_hw)
        return y.squeeze(0) if self.unbatched else y

    def _windows_grad(self, grad_out: Tensor) -> Tensor:
        g = grad_out.unsqueeze(0) if self.unbatched else grad_out
        return g.reshape(*g.shape[:2], 1, -1)  # [N, C, 1, Ho·Wo]: broadcast over each window


@register_reference(nn.MaxPool2d)
class MaxPoolReference(_WindowedPool):
    """y = max over each window of x ``[N, C, H, W]``; dy/dx = 1 at the window's (first) argmax, 0 elsewhere."""

    module: nn.MaxPool2d
    fill = -math.inf  # padding must never win a max

    def forward(self, x: Tensor) -> Tensor:
        """Take the maximum of each window and remember where it was."""
        if self.module.return_indices:
            raise UnsupportedLayerError(
                f"No reference backward for MaxPool2d {self.path or '(model)'!r} with return_indices=True "
                "(its output is a tuple). Use return_indices=False inside the model."
            )
        windows = self._windows(x, _pair(self.module.dilation))
        values, self.argmax = windows.max(dim=2, keepdim=True)  # ties: first index, as PyTorch's kernel
        self.window_size = windows.shape[2]
        return self._shape_output(values)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Route each window's gradient to its winner; a pixel that wins k windows collects k gradients."""
        g = self._windows_grad(grad_out)
        shape = (*g.shape[:2], self.window_size, g.shape[-1])
        grad_windows = torch.zeros(shape, dtype=g.dtype, device=g.device).scatter_(2, self.argmax, g)
        return self._fold(grad_windows), {}


@register_reference(nn.AvgPool2d)
class AvgPoolReference(_WindowedPool):
    """y = (sum over each window of x) / divisor; dy/dx = 1/divisor for every pixel in the window.

    The divisor follows PyTorch: the window size clipped to the padded input when
    ``count_include_pad`` is set, the number of real pixels otherwise, or ``divisor_override``.
    """

    module: nn.AvgPool2d

    def forward(self, x: Tensor) -> Tensor:
        """Average each window, zero padding included in the sum."""
        windows = self._windows(x, (1, 1))
        self.divisor = self._divisor(x.shape[-2:]).to(device=x.device, dtype=x.dtype).reshape(1, 1, 1, -1)
        self.window_size = windows.shape[2]
        return self._shape_output(windows.sum(dim=2, keepdim=True) / self.divisor)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Every pixel of a window receives the window's gradient / divisor."""
        g = self._windows_grad(grad_out) / self.divisor
        return self._fold(g.expand(*g.shape[:2], self.window_size, g.shape[-1])), {}

    def _divisor(self, size: torch.Size) -> Tensor:
        m = self.module
        if m.divisor_override:
            return torch.full((self.out_hw[0] * self.out_hw[1],), float(m.divisor_override))
        per_axis = []
        for a in range(2):
            start = torch.arange(self.out_hw[a]) * self.stride[a] - self.padding[a]
            end = torch.clamp(start + self.kernel[a], max=size[a] + self.padding[a])
            if m.count_include_pad:
                per_axis.append(end - start)
            else:
                per_axis.append(torch.clamp(end, max=size[a]) - torch.clamp(start, min=0))
        return torch.outer(per_axis[0], per_axis[1]).reshape(-1).double()


def _adaptive_matrix(size: int, out: int) -> Tensor:
    """[out, size] averaging matrix: row i averages x[floor(i·size/out) : ceil((i+1)·size/out)]."""
    matrix = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@register_reference(nn.AdaptiveAvgPool2d)
class AdaptiveAvgPoolReference(ReferenceLayer):
    """y = Pₕ x P_wᵀ over the last two axes of x ``[*, H, W]``; the backward is dx = Pₕᵀ g P_w."""

    module: nn.AdaptiveAvgPool2d

    def forward(self, x: Tensor) -> Tensor:
        """Average over the windows PyTorch picks for each output cell."""
        h, w = x.shape[-2:]
        out_h, out_w = (s if s is not None else full for s, full in zip(_pair(self.module.output_size), (h, w)))
        self.p_h = _adaptive_matrix(h, out_h).to(x)
        self.p_w = _adaptive_matrix(w, out_w).to(x)
        return self.p_h @ x @ self.p_w.T

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """A linear map's backward is its transpose."""
        return self.p_h.T @ grad_out @ self.p_w, {}
