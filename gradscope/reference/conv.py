"""``nn.Conv1d`` and ``nn.Conv2d`` (stride, zero padding including ``"same"``, dilation, groups).

A convolution is a matrix product in disguise. ``unfold`` (im2col) copies each receptive field of the
zero-padded input into a column, so the output of group g is ``W_g @ columns_g``: the local
derivatives are those of :mod:`gradscope.reference.linear`, applied per output position. The way back
uses ``fold`` (col2im), the transpose of ``unfold``: it adds every column's gradient back onto the
pixels the column was copied from, which is the backward of copying (a pixel read by k windows
collects k contributions). Conv1d runs as a Conv2d of height 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["ConvReference"]


def _pads(module: nn.Conv1d | nn.Conv2d, spatial: int) -> list[tuple[int, int]]:
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
        """Zero-pad, unfold into columns, multiply by the grouped weight matrix, add the bias."""
        m = self.module
        if m.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"No reference backward for {type(m).__name__} {self.path or '(model)'!r} with "
                f"padding_mode={m.padding_mode!r}; the reference supports padding_mode='zeros'. Use "
                f"gradscope.verify(..., on_unsupported='finite_difference') to check it numerically."
            )
        self.is_1d = isinstance(m, nn.Conv1d)
        self.unbatched = x.dim() == (2 if self.is_1d else 3)
        x4 = x.unsqueeze(0) if self.unbatched else x
        if self.is_1d:  # [N, C, L] -> [N, C, 1, L]: a Conv2d with a 1 x k kernel
            x4 = x4.unsqueeze(2)
        self.input_shape = x.shape

        pads = _pads(m, 1 if self.is_1d else 2)
        pad_h, pad_w = ((0, 0), pads[0]) if self.is_1d else (pads[0], pads[1])
        self.crop = (pad_h, pad_w)
        padded = F.pad(x4, (pad_w[0], pad_w[1], pad_h[0], pad_h[1]))
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
        (top, bottom), (left, right) = self.crop
        grad_x = grad_padded[..., top : grad_padded.shape[-2] - bottom, left : grad_padded.shape[-1] - right]
        if self.is_1d:
            grad_x = grad_x.squeeze(2)
        return grad_x.reshape(self.input_shape), grads
