"""Pooling: max, average, adaptive average and adaptive max pooling in 1, 2 and 3 dimensions.

Max and average pooling lay every window out as a row, as the convolutions do (see
:mod:`gradscope.reference.conv`): ``Tensor.unfold`` along each spatial axis gives the windows
``[N, C, P, K]`` (P output positions, K pixels per window), the forward reduces each row, and the
backward adds each window pixel's gradient back onto the pixel it was read from, one kernel offset at
a time. Max pooling routes each window's gradient to the one pixel that won (the first maximum in
row-major order, as PyTorch does); average pooling spreads it evenly over the window. Adaptive average
pooling is linear and separable: one small averaging matrix per axis, y = Pₕ x P_wᵀ in 2-d. Adaptive
max pooling routes each cell's gradient to its window's first maximum, as max pooling does.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = [
    "AdaptiveAvgPoolReference",
    "AdaptiveMaxPoolReference",
    "AvgPoolReference",
    "MaxPoolReference",
    "pool_output_size",
]

#: How many spatial axes each pooling type pools over.
_SPATIAL: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}  # fmt: skip


def _tuple(value: Any, n: int) -> tuple[Any, ...]:
    """A module's size argument (an int, ``None`` or a tuple) as one entry per spatial axis."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _at(parts: Any) -> tuple[Any, ...]:
    """An index that applies ``parts`` to the trailing axes: ``x[_at(k)]`` is ``x[..., k₀, k₁, ...]``."""
    return (Ellipsis, *parts)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of a pooling window sweep along one axis, with PyTorch's ``ceil_mode`` rule.

    In ceil mode a last, partial window is kept only if it starts inside the input or the left padding.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _no_indices(layer: ReferenceLayer) -> None:
    if getattr(layer.module, "return_indices", False):
        raise UnsupportedLayerError(
            f"No reference backward for {type(layer.module).__name__} {layer.path or '(model)'!r} with "
            "return_indices=True (its output is a tuple). Use return_indices=False inside the model."
        )


class _WindowedPool(ReferenceLayer):
    """Shared plumbing: pad, lay the windows out as rows ``[N, C, P, K]``, and add gradients back."""

    module: nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d | nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d
    fill: float = 0.0

    def _windows(self, x: Tensor, dilation: int | tuple[int, ...]) -> Tensor:
        m = self.module
        n_axes = _SPATIAL[type(m)]
        self.unbatched = x.dim() == n_axes + 1
        xb = x.unsqueeze(0) if self.unbatched else x
        self.input_shape = x.shape
        self.kernel = _tuple(m.kernel_size, n_axes)
        self.stride = _tuple(m.stride or m.kernel_size, n_axes)
        self.padding = _tuple(m.padding, n_axes)
        self.dilation = _tuple(dilation, n_axes)
        size = xb.shape[2:]
        self.out = tuple(
            pool_output_size(size[a], self.kernel[a], self.stride[a], self.padding[a], self.dilation[a], m.ceil_mode)
            for a in range(n_axes)
        )
        # Pad by `padding` on both sides, and further at the end when ceil_mode keeps a partial window.
        span = [self.dilation[a] * (self.kernel[a] - 1) + 1 for a in range(n_axes)]
        extent = [(self.out[a] - 1) * self.stride[a] + span[a] for a in range(n_axes)]
        after = [max(self.padding[a], extent[a] - size[a] - self.padding[a]) for a in range(n_axes)]
        self.crop = list(zip(self.padding, after))
        padded = F.pad(xb, [p for a in reversed(range(n_axes)) for p in (self.padding[a], after[a])], value=self.fill)
        self.padded_shape = padded.shape
        windows = padded
        for a in range(n_axes):  # [N, C, o1, ..., on, span1, ..., spann]
            windows = windows.unfold(2 + a, span[a], self.stride[a])
        windows = windows[_at(slice(None, None, d) for d in self.dilation)]  # every d-th pixel of a span
        # The padding above makes the unfolds produce exactly the windows PyTorch pools over.
        assert tuple(windows.shape[2 : 2 + n_axes]) == self.out, (windows.shape, self.out)
        return windows.reshape(*padded.shape[:2], math.prod(self.out), math.prod(self.kernel))

    def _fold(self, grad_windows: Tensor) -> Tensor:
        """Add each window pixel's gradient back onto the pixel it was read from, one kernel offset at a time."""
        g = grad_windows.reshape(*grad_windows.shape[:2], *self.out, -1)
        grad_padded = torch.zeros(self.padded_shape, dtype=g.dtype, device=g.device)
        for i, offset in enumerate(itertools.product(*(range(k) for k in self.kernel))):
            window = tuple(
                slice(k * d, k * d + s * (o - 1) + 1, s)
                for k, d, s, o in zip(offset, self.dilation, self.stride, self.out)
            )
            grad_padded[_at(window)] += g[..., i]
        crop = tuple(slice(before, grad_padded.shape[2 + a] - after) for a, (before, after) in enumerate(self.crop))
        return grad_padded[_at(crop)].reshape(self.input_shape)

    def _shape_output(self, out: Tensor) -> Tensor:
        y = out.reshape(*out.shape[:2], *self.out)
        return y.squeeze(0) if self.unbatched else y

    def _windows_grad(self, grad_out: Tensor) -> Tensor:
        g = grad_out.unsqueeze(0) if self.unbatched else grad_out
        return g.reshape(*g.shape[:2], -1, 1)  # [N, C, P, 1]: broadcast over each window


@register_reference(nn.MaxPool1d)
@register_reference(nn.MaxPool2d)
@register_reference(nn.MaxPool3d)
class MaxPoolReference(_WindowedPool):
    """y = max over each window of x ``[N, C, *spatial]``; dy/dx = 1 at the window's (first) argmax, 0 elsewhere."""

    module: nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d
    fill = -math.inf  # padding must never win a max

    def forward(self, x: Tensor) -> Tensor:
        """Take the maximum of each window and remember where it was."""
        _no_indices(self)
        windows = self._windows(x, self.module.dilation)
        values, self.argmax = windows.max(dim=3, keepdim=True)  # ties: first index, as PyTorch's kernel
        self.window_size = windows.shape[3]
        return self._shape_output(values)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Route each window's gradient to its winner; a pixel that wins k windows collects k gradients."""
        g = self._windows_grad(grad_out)
        shape = (*g.shape[:3], self.window_size)
        grad_windows = torch.zeros(shape, dtype=g.dtype, device=g.device).scatter_(3, self.argmax, g)
        return self._fold(grad_windows), {}


@register_reference(nn.AvgPool1d)
@register_reference(nn.AvgPool2d)
@register_reference(nn.AvgPool3d)
class AvgPoolReference(_WindowedPool):
    """y = (sum over each window of x) / divisor; dy/dx = 1/divisor for every pixel in the window.

    The divisor follows PyTorch: the window size clipped to the padded input when
    ``count_include_pad`` is set, the number of real pixels otherwise, or ``divisor_override``
    (2-d and 3-d only).
    """

    module: nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d

    def forward(self, x: Tensor) -> Tensor:
        """Average each window, zero padding included in the sum."""
        windows = self._windows(x, 1)
        size = (x.unsqueeze(0) if self.unbatched else x).shape[2:]
        self.divisor = self._divisor(size).to(device=x.device, dtype=x.dtype).reshape(1, 1, -1, 1)
        self.window_size = windows.shape[3]
        return self._shape_output(windows.sum(dim=3, keepdim=True) / self.divisor)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Every pixel of a window receives the window's gradient / divisor."""
        g = self._windows_grad(grad_out) / self.divisor
        return self._fold(g.expand(*g.shape[:3], self.window_size)), {}

    def _divisor(self, size: torch.Size) -> Tensor:
        m = self.module
        override = getattr(m, "divisor_override", None)  # AvgPool1d has none
        if override:
            return torch.full((math.prod(self.out),), float(override))
        per_axis = []
        for a in range(len(self.out)):
            start = torch.arange(self.out[a]) * self.stride[a] - self.padding[a]
            end = torch.clamp(start + self.kernel[a], max=size[a] + self.padding[a])
            if m.count_include_pad:
                per_axis.append(end - start)
            else:
                per_axis.append(torch.clamp(end, max=size[a]) - torch.clamp(start, min=0))
        divisor = per_axis[0].double()
        for counts in per_axis[1:]:
            divisor = torch.outer(divisor, counts.double()).reshape(-1)
        return divisor


def _adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    """Cell i pools x[floor(i·size/out) : ceil((i+1)·size/out)], PyTorch's adaptive windows."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _adaptive_matrix(size: int, out: int) -> Tensor:
    """[out, size] averaging matrix: row i averages cell i's window."""
    matrix = torch.zeros(out, size, dtype=torch.float64)
    for i, (start, end) in enumerate(_adaptive_bounds(size, out)):
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _adaptive_sizes(module: nn.Module, size: torch.Size) -> tuple[int, ...]:
    """The output size per spatial axis; ``None`` keeps the input's size."""
    wanted = _tuple(module.output_size, len(size))
    return tuple(s if s is not None else full for s, full in zip(wanted, size))


def _along(x: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """Apply ``matrix`` [out, size] to axis ``axis`` of x."""
    return torch.movedim(torch.movedim(x, axis, -1) @ matrix.T, -1, axis)


@register_reference(nn.AdaptiveAvgPool1d)
@register_reference(nn.AdaptiveAvgPool2d)
@register_reference(nn.AdaptiveAvgPool3d)
class AdaptiveAvgPoolReference(ReferenceLayer):
    """y = x averaged by one matrix Pₐ per spatial axis (2-d: y = Pₕ x P_wᵀ); the backward applies each Pₐᵀ."""

    module: nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d

    def forward(self, x: Tensor) -> Tensor:
        """Average over the windows PyTorch picks for each output cell."""
        n_axes = _SPATIAL[type(self.module)]
        size = x.shape[-n_axes:]
        self.axes = range(x.dim() - n_axes, x.dim())
        self.matrices = [_adaptive_matrix(s, o).to(x) for s, o in zip(size, _adaptive_sizes(self.module, size))]
        for axis, matrix in zip(self.axes, self.matrices):
            x = _along(x, matrix, axis)
        return x

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """A linear map's backward is its transpose."""
        for axis, matrix in zip(self.axes, self.matrices):
            grad_out = _along(grad_out, matrix.T, axis)
        return grad_out, {}


@register_reference(nn.AdaptiveMaxPool1d)
@register_reference(nn.AdaptiveMaxPool2d)
@register_reference(nn.AdaptiveMaxPool3d)
class AdaptiveMaxPoolReference(ReferenceLayer):
    """y = max over each adaptive window; dy/dx = 1 at the window's first maximum (row-major), 0 elsewhere.

    Windows differ in size, so each axis's windows are padded to the longest with a sentinel that never
    wins; every window entry carries the flat index of the input pixel it was read from, and the
    backward scatter-adds each cell's gradient onto its winner's pixel.
    """

    module: nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d | nn.AdaptiveMaxPool3d

    def forward(self, x: Tensor) -> Tensor:
        """Gather every window (padded to equal length), take the first maximum."""
        _no_indices(self)
        n_axes = _SPATIAL[type(self.module)]
        self.input_shape = x.shape
        size = x.shape[-n_axes:]
        out = _adaptive_sizes(self.module, size)
        lead = x.shape[:-n_axes]
        values = x.reshape(*lead, -1)
        # Flat source index of every (cell, window entry), one axis at a time: [o₀, k₀, o₁, k₁, ...].
        source = torch.zeros([1] * (2 * n_axes), dtype=torch.long, device=x.device)
        valid = torch.ones([1] * (2 * n_axes), dtype=torch.bool, device=x.device)
        for a in range(n_axes):
            bounds = _adaptive_bounds(size[a], out[a])
            starts = torch.tensor([start for start, _ in bounds], device=x.device)
            lengths = torch.tensor([end - start for start, end in bounds], device=x.device)
            offset = torch.arange(int(lengths.max()), device=x.device)
            shape = [1] * (2 * n_axes)
            shape[2 * a], shape[2 * a + 1] = out[a], offset.numel()
            pixel = torch.clamp(starts[:, None] + offset, max=size[a] - 1) * math.prod(size[a + 1 :])
            source = source + pixel.reshape(shape)
            valid = valid & (offset < lengths[:, None]).reshape(shape)
        self.out = out
        # [*out, *longest] -> [P, K], with the window entries in row-major order.
        perm = [2 * a for a in range(n_axes)] + [2 * a + 1 for a in range(n_axes)]
        self.source = source.permute(perm).reshape(math.prod(out), -1)
        valid = valid.permute(perm).reshape(math.prod(out), -1)
        windows = values[..., self.source]  # [*lead, P, K]
        windows = torch.where(valid, windows, torch.full_like(windows, -math.inf))
        best, self.argmax = windows.max(dim=-1)
        return best.reshape(*lead, *out)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Scatter-add each cell's gradient onto the pixel that won its window."""
        n_axes = len(self.out)
        lead = grad_out.shape[:-n_axes]
        g = grad_out.reshape(*lead, -1)
        winner = self.source.expand(*lead, *self.source.shape).gather(-1, self.argmax[..., None]).squeeze(-1)
        grad = torch.zeros(*lead, math.prod(self.input_shape[-n_axes:]), dtype=g.dtype, device=g.device)
        return grad.scatter_add_(-1, winner, g).reshape(self.input_shape), {}
