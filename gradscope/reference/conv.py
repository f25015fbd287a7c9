"""Convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (stride, padding, dilation, groups).

A convolution is a matrix product in disguise. ``unfold`` (im2col) copies each receptive field of the
zero-padded input into a column, so the output of group g is ``W_g @ columns_g``: the local
derivatives are those of :mod:`gradscope.reference.linear`, applied per output position. The way back
uses ``fold`` (col2im), the transpose of ``unfold``: it adds every column's gradient back onto the
pixels the column was copied from, which is the backward of copying (a pixel read by k windows
collects k contributions). Conv1d runs as a Conv2d of height 1.

Padding modes other than zeros (``reflect``, ``replicate``, ``circular``) pad by copying input pixels:
padded position j reads pixel src(j), a gather along each axis, so the padding's backward is the
matching index-add (a border pixel that was copied into the padding collects those gradients too).

``nn.Conv3d`` has no ``unfold``; it is written as a sum over kernel offsets instead: each offset k of
the kernel multiplies a strided slice of the padded input, y = Σₖ Wₖ x[k·d + s·i], and the backward
adds Wₖᵀ g back onto the same slice. A transposed convolution is the input-gradient of a convolution
used as a forward: every input pixel i scatters Wₖᵀ x[i] onto output position s·i + d·k - p, so its
backward gathers from the slices its forward scattered into.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["Conv3dReference", "ConvReference", "ConvTransposeReference", "pad", "pad_backward"]


def _pads(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, spatial: int) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial axis, including ``"same"``'s extra pad at the end."""
    kernel, dilation, padding = module.kernel_size, module.dilation, module.padding
    if not isinstance(padding, str):
        return [(p, p) for p in padding]
    if padding == "valid":
        return [(0, 0)] * spatial
    # "same" (nn.Conv accepts no other string): PyTorch puts the odd leftover of the total padding
    # d (k - 1) after the input.
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return [(t // 2, t - t // 2) for t in totals]


def _source_index(size: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """For each position of an axis padded by (before, after), the input pixel it copies (non-zero modes)."""
    j = torch.arange(-before, size + after, device=device)
    if mode == "reflect":  # mirror without repeating the edge: -1 -> 1, size -> size - 2
        period = 2 * (size - 1)
        j = torch.remainder(j, period) if period > 0 else torch.zeros_like(j)
        return torch.where(j < size, j, period - j)
    if mode == "replicate":
        return torch.clamp(j, 0, size - 1)
    if mode == "circular":
        return torch.remainder(j, size)
    raise ValueError(f"Unknown padding_mode {mode!r}; expected 'zeros', 'reflect', 'replicate' or 'circular'.")


def pad(x: Tensor, pads: list[tuple[int, int]], mode: str) -> Tensor:
    """Pad the last ``len(pads)`` axes of ``x`` by (before, after) each, with zeros or by copying pixels."""
    if mode == "zeros":
        flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad wants the last axis first
        return F.pad(x, flat)
    first = x.dim() - len(pads)
    for axis, (before, after) in enumerate(pads, start=first):
        x = x.index_select(axis, _source_index(x.shape[axis], before, after, mode, x.device))
    return x


def pad_backward(grad: Tensor, pads: list[tuple[int, int]], mode: str, shape: torch.Size) -> Tensor:
    """The transpose of :func:`pad`: crop (zeros), or index-add every padded copy back onto its pixel."""
    first = grad.dim() - len(pads)
    if mode == "zeros":
        crop = tuple(slice(before, grad.shape[a] - after) for a, (before, after) in enumerate(pads, start=first))
        return grad[_at(crop)]
    for axis, (before, after) in reversed(list(enumerate(pads, start=first))):
        index = _source_index(shape[axis], before, after, mode, grad.device)
        sizes = list(grad.shape)
        sizes[axis] = shape[axis]
        grad = torch.zeros(sizes, dtype=grad.dtype, device=grad.device).index_add_(axis, index, grad)
    return grad


@register_reference(nn.Conv1d)
@register_reference(nn.Conv2d)
class ConvReference(ReferenceLayer):
    """Grouped convolution as one matrix product per group over unfolded input columns.

    Shapes (Conv2d; Conv1d drops H): x ``[N, C, H, W]`` (or unbatched ``[C, H, W]``), weight
    ``[O, C/G, kh, kw]``, y ``[N, O, Ho, Wo]``. With columns X_g ``[N, C/G·kh·kw, Ho·Wo]`` and
    W_g ``[O/G, C/G·kh·kw]``: y_g = W_g X_g + b, so dW_g = Σₙ g_g X_gᵀ, dX_g = W_gᵀ g_g, db = Σ g.
    """

    module: nn.Conv1d | nn.Conv2d

    def forward(self, x: Tensor) -> Tensor:
        """Pad, unfold into columns, multiply by the grouped weight matrix, add the bias."""
        m = self.module
        self.is_1d = isinstance(m, nn.Conv1d)
        self.unbatched = x.dim() == (2 if self.is_1d else 3)
        x4 = x.unsqueeze(0) if self.unbatched else x
        if self.is_1d:  # [N, C, L] -> [N, C, 1, L]: a Conv2d with a 1 x k kernel
            x4 = x4.unsqueeze(2)
        self.input_shape = x.shape

        pads = _pads(m, 1 if self.is_1d else 2)
        pad_h, pad_w = ((0, 0), pads[0]) if self.is_1d else (pads[0], pads[1])
        self.pads, self.input4_shape = [pad_h, pad_w], x4.shape
        padded = pad(x4, self.pads, m.padding_mode)
        self.padded_hw = padded.shape[-2:]
        self.kernel, self.stride, self.dilation = (
            (1, *t) if self.is_1d else tuple(t) for t in (m.kernel_size, m.stride, m.dilation)
        )

        groups = m.groups
        n = padded.shape[0]
        cols = F.unfold(padded, self.kernel, dilation=self.dilation, stride=self.stride)  # [N, C·kh·kw, L]
        # unfold orders rows channel-major, so each group's channels are one contiguous block of rows.
        self.cols = cols.reshape(n, groups, -1, cols.shape[-1])  # [N, G, C/G·kh·kw, L]
        self.w = m.weight.reshape(groups, m.out_channels // groups, -1)  # [G, O/G, C/G·kh·kw]
        out = torch.einsum("gok,ngkl->ngol", self.w, self.cols).reshape(n, m.out_channels, -1)
        if m.bias is not None:
            out = out + m.bias[:, None]
        out_h = (self.padded_hw[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        out_w = (self.padded_hw[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        y = out.reshape(n, m.out_channels, out_h, out_w)
        if self.is_1d:
            y = y.squeeze(2)
        return y.squeeze(0) if self.unbatched else y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Grouped matrix-product backward, then fold the column gradients back onto the pixels."""
        m = self.module
        g = grad_out.unsqueeze(0) if self.unbatched else grad_out
        n = g.shape[0]
        g = g.reshape(n, m.groups, m.out_channels // m.groups, -1)  # [N, G, O/G, L]

        grads: ParamGrads = {"weight": torch.einsum("ngol,ngkl->gok", g, self.cols).reshape(m.weight.shape)}
        if m.bias is not None:
            grads["bias"] = g.sum((0, 3)).reshape(-1)
        grad_cols = torch.einsum("gok,ngol->ngkl", self.w, g).reshape(n, -1, g.shape[-1])
        grad_padded = F.fold(
            grad_cols, self.padded_hw, self.kernel, dilation=self.dilation, stride=self.stride
        )  # [N, C, Hp, Wp]
        grad_x = pad_backward(grad_padded, self.pads, m.padding_mode, self.input4_shape)
        if self.is_1d:
            grad_x = grad_x.squeeze(2)
        return grad_x.reshape(self.input_shape), grads


def _at(parts: Any) -> tuple[Any, ...]:
    """An index that applies ``parts`` to the trailing axes: ``x[_at(k)]`` is ``x[..., k₀, k₁, ...]``."""
    return (Ellipsis, *parts)


def _offsets(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every position of a kernel, row-major."""
    return list(itertools.product(*(range(k) for k in kernel)))


def _window(offset: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...], out: tuple[int, ...]) -> tuple:
    """The strided slice that kernel position ``offset`` sees across all output positions: x[k·d + s·i]."""
    return (
        ...,
        *(slice(k * d, k * d + s * (o - 1) + 1, s) for k, d, s, o in zip(offset, dilation, stride, out)),
    )


@register_reference(nn.Conv3d)
class Conv3dReference(ReferenceLayer):
    """3-d grouped convolution as a sum over kernel offsets: y = Σₖ Wₖ x_pad[k·d + s·i] + b.

    Shapes: x ``[N, C, D, H, W]`` (or unbatched ``[C, D, H, W]``), weight ``[O, C/G, kd, kh, kw]``. For
    each kernel offset k and group g, Wₖ,g ``[O/G, C/G]`` multiplies the slice Xₖ,g ``[N, C/G, P]`` of the
    padded input (P output positions): dWₖ,g = Σₙ g_g Xₖ,gᵀ, and Wₖ,gᵀ g_g is added back onto that slice.
    """

    module: nn.Conv3d

    def forward(self, x: Tensor) -> Tensor:
        """Pad, then add up one grouped matrix product per kernel offset."""
        m = self.module
        self.unbatched = x.dim() == 4
        x5 = x.unsqueeze(0) if self.unbatched else x
        self.input5_shape, self.pads = x5.shape, _pads(m, 3)
        self.padded = pad(x5, self.pads, m.padding_mode)
        self.out = tuple(
            (self.padded.shape[2 + a] - m.dilation[a] * (m.kernel_size[a] - 1) - 1) // m.stride[a] + 1 for a in range(3)
        )
        n, groups = x5.shape[0], m.groups
        y = torch.zeros(n, groups, m.out_channels // groups, *self.out, dtype=x.dtype, device=x.device)
        for k in _offsets(m.kernel_size):
            w_k = m.weight[_at(k)].reshape(groups, m.out_channels // groups, -1)  # [G, O/G, C/G]
            x_k = self.padded[_window(k, m.dilation, m.stride, self.out)].reshape(n, groups, -1, *self.out)
            y = y + torch.einsum("goc,ngc...->ngo...", w_k, x_k)
        y = y.reshape(n, m.out_channels, *self.out)
        if m.bias is not None:
            y = y + m.bias.reshape(1, -1, 1, 1, 1)
        return y.squeeze(0) if self.unbatched else y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Per kernel offset: dWₖ from the slice it read, and Wₖᵀ g added back onto that slice."""
        m = self.module
        g = grad_out.unsqueeze(0) if self.unbatched else grad_out
        n, groups = g.shape[0], m.groups
        g_grouped = g.reshape(n, groups, m.out_channels // groups, *self.out)
        grad_padded = torch.zeros_like(self.padded)
        grad_w = torch.zeros_like(m.weight)
        for k in _offsets(m.kernel_size):
            window = _window(k, m.dilation, m.stride, self.out)
            w_k = m.weight[_at(k)].reshape(groups, m.out_channels // groups, -1)
            x_k = self.padded[window].reshape(n, groups, -1, *self.out)
            grad_w[_at(k)] = torch.einsum("ngo...,ngc...->goc", g_grouped, x_k).reshape(m.out_channels, -1)
            grad_padded[window] += torch.einsum("goc,ngo...->ngc...", w_k, g_grouped).reshape(n, -1, *self.out)
        grads: ParamGrads = {"weight": grad_w}
        if m.bias is not None:
            grads["bias"] = g.sum((0, 2, 3, 4))
        grad_x = pad_backward(grad_padded, self.pads, m.padding_mode, self.input5_shape)
        return (grad_x.squeeze(0) if self.unbatched else grad_x), grads


@register_reference(nn.ConvTranspose1d)
@register_reference(nn.ConvTranspose2d)
@register_reference(nn.ConvTranspose3d)
class ConvTransposeReference(ReferenceLayer):
    """Transposed convolution: each input pixel i scatters Wₖᵀ x[i] onto output position s·i + d·k - p.

    Shapes (2-d): x ``[N, C, H, W]``, weight ``[C, O/G, kh, kw]``, y ``[N, O, Ho, Wo]`` with
    Ho = (H - 1) s - 2p + d (kh - 1) + output_padding + 1. The forward accumulates every offset's
    product into a full-size buffer of length (H - 1) s + d (kh - 1) + 1 per axis, then crops p from the
    start (``output_padding`` extends the end, with zeros where the buffer ends). The backward reads each
    offset's strided slice of the (uncropped) output gradient, as a convolution's forward would:
    dx = Σₖ Wₖ g[s·i + d·k], dWₖ = Σ x gₖᵀ.
    """

    module: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d

    def forward(self, x: Tensor) -> Tensor:
        """Scatter-add every kernel offset's product into the full output, then crop the padding."""
        m = self.module
        spatial = len(m.kernel_size)
        # A transposed convolution's padding is always a tuple of ints (no "same"/"valid" strings).
        self.padding = cast("tuple[int, ...]", tuple(m.padding))
        self.unbatched = x.dim() == spatial + 1
        xb = x.unsqueeze(0) if self.unbatched else x
        self.x = xb
        n, groups, size = xb.shape[0], m.groups, tuple(xb.shape[2:])
        self.size = size
        self.full = tuple(
            (L - 1) * s + d * (k - 1) + 1 for L, s, d, k in zip(size, m.stride, m.dilation, m.kernel_size)
        )
        self.out = tuple(f - 2 * p + op for f, p, op in zip(self.full, self.padding, m.output_padding))
        per_group_out = m.out_channels // groups
        buffer = torch.zeros(n, groups, per_group_out, *self.full, dtype=x.dtype, device=x.device)
        x_grouped = xb.reshape(n, groups, -1, *size)
        for k in _offsets(m.kernel_size):
            w_k = m.weight[_at(k)].reshape(groups, -1, per_group_out)  # [G, C/G, O/G]
            buffer[_window(k, m.dilation, m.stride, size)] += torch.einsum("gco,ngc...->ngo...", w_k, x_grouped)
        y = self._crop(buffer.reshape(n, m.out_channels, *self.full))
        if m.bias is not None:
            y = y + m.bias.reshape(1, -1, *(1,) * spatial)
        return y.squeeze(0) if self.unbatched else y

    def _crop(self, full: Tensor) -> Tensor:
        """full[p : p + out] per axis, zero-extended where output_padding reaches past the buffer."""
        extra = [max(0, p + o - f) for p, o, f in zip(self.padding, self.out, self.full)]
        full = F.pad(full, [e for axis in reversed(extra) for e in (0, axis)])
        return full[_at((slice(p, p + o) for p, o in zip(self.padding, self.out)))]

    def _uncrop(self, grad: Tensor) -> Tensor:
        """The transpose of :meth:`_crop`: the gradient placed back into a zero buffer of the full size."""
        buffer = torch.zeros(*grad.shape[:2], *self.full, dtype=grad.dtype, device=grad.device)
        kept = tuple(min(o, f - p) for p, o, f in zip(self.padding, self.out, self.full))
        target = tuple(slice(p, p + k) for p, k in zip(self.padding, kept))
        buffer[_at(target)] = grad[_at(slice(0, k) for k in kept)]
        return buffer

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Gather each offset's slice of the output gradient: a convolution of g with the same weight."""
        m = self.module
        g = grad_out.unsqueeze(0) if self.unbatched else grad_out
        n, groups = g.shape[0], m.groups
        per_group_out = m.out_channels // groups
        g_full = self._uncrop(g).reshape(n, groups, per_group_out, *self.full)
        x_grouped = self.x.reshape(n, groups, -1, *self.size)
        grad_x = torch.zeros_like(x_grouped)
        grad_w = torch.zeros_like(m.weight)
        for k in _offsets(m.kernel_size):
            g_k = g_full[_window(k, m.dilation, m.stride, self.size)]  # [N, G, O/G, *size]
            w_k = m.weight[_at(k)].reshape(groups, -1, per_group_out)
            grad_x = grad_x + torch.einsum("gco,ngo...->ngc...", w_k, g_k)
            grad_w[_at(k)] = torch.einsum("ngc...,ngo...->gco", x_grouped, g_k).reshape(m.in_channels, per_group_out)
        grads: ParamGrads = {"weight": grad_w}
        if m.bias is not None:
            grads["bias"] = g.sum((0, *range(2, g.dim())))
        grad_x = grad_x.reshape(self.x.shape)
        return (grad_x.squeeze(0) if self.unbatched else grad_x), grads
