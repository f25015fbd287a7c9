"""Normalization: ``nn.LayerNorm`` and ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``.

Both compute x̂ = (x - μ) / √(σ² + ε) and y = γ x̂ + β; they differ only in the axes the statistics μ
and σ² (biased variance) are taken over: the trailing feature axes for LayerNorm, every axis but the
channel for BatchNorm. When μ and σ² come from the batch itself they depend on x, and the backward
gains two correction terms (see :func:`normalize_backward`). That coupling is also why normalization
helps gradient flow: the gradient reaching x is re-centred and rescaled by 1/σ at every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["BatchNormReference", "LayerNormReference", "normalize", "normalize_backward"]


def normalize(x: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor]:
    """Standardize ``x`` over ``dims`` with the biased variance.

    Returns:
        ``(x_hat, inv_std)``: x̂ with the shape of ``x`` and 1/√(σ² + ε) with ``dims`` kept as size 1.
    """
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    inv_std = 1.0 / torch.sqrt((centred * centred).mean(dims, keepdim=True) + eps)
    return centred * inv_std, inv_std


def normalize_backward(grad_hat: Tensor, x_hat: Tensor, inv_std: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Backward of x̂ = (x - μ(x)) / σ(x) when μ and σ are statistics of x itself over ``dims``.

    With ĝ = dL/dx̂ and means taken over ``dims``: dL/dx = (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)) / σ. The first
    term is the direct path; the second comes through μ (every x shifts the mean); the third through σ.
    """
    mean_g = grad_hat.mean(dims, keepdim=True)
    mean_gx = (grad_hat * x_hat).mean(dims, keepdim=True)
    return (grad_hat - mean_g - x_hat * mean_gx) * inv_std


@register_reference(nn.LayerNorm)
class LayerNormReference(ReferenceLayer):
    """LayerNorm over the trailing ``normalized_shape`` axes of x ``[*, *normalized_shape]``.

    Statistics are per sample, so the backward is :func:`normalize_backward` over the same axes; γ and β
    have ``normalized_shape`` and collect their gradients over the leading axes.
    """

    module: nn.LayerNorm

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = γ (x - μ) / √(σ² + ε) + β."""
        m = self.module
        self.dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
        self.x_hat, self.inv_std = normalize(x, self.dims, m.eps)
        y = self.x_hat
        if m.weight is not None:
            y = y * m.weight
        return y + m.bias if m.bias is not None else y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """dγ = Σ g x̂, dβ = Σ g over leading axes; dx through the per-sample statistics."""
        m = self.module
        leading = tuple(range(grad_out.dim() - len(self.dims)))
        grads: ParamGrads = {}
        if m.weight is not None:
            grads["weight"] = (grad_out * self.x_hat).sum(leading)
        if m.bias is not None:
            grads["bias"] = grad_out.sum(leading)
        grad_hat = grad_out * m.weight if m.weight is not None else grad_out
        return normalize_backward(grad_hat, self.x_hat, self.inv_std, self.dims), grads


@register_reference(nn.BatchNorm1d)
@register_reference(nn.BatchNorm2d)
class BatchNormReference(ReferenceLayer):
    """BatchNorm over every axis but the channel axis 1: x ``[N, C]``, ``[N, C, L]`` or ``[N, C, H, W]``.

    Training mode (or no running statistics) normalizes with the batch's own statistics, so gradients
    flow through μ and σ² as in LayerNorm. Eval mode uses the running statistics, which are constants:
    the layer is then affine, dy/dx = γ / √(running_var + ε). The reference does not update the
    running statistics; they do not enter this step's gradients.
    """

    module: nn.BatchNorm1d | nn.BatchNorm2d

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = γ x̂ + β with batch statistics (training) or running statistics (eval)."""
        m = self.module
        self.dims = (0, *range(2, x.dim()))
        channel = (1, -1) + (1,) * (x.dim() - 2)  # broadcast per-channel vectors over N and space
        running_mean, running_var = m.running_mean, m.running_var  # both None when track_running_stats=False
        if m.training or running_mean is None or running_var is None:
            self.uses_batch_stats = True
            self.x_hat, self.inv_std = normalize(x, self.dims, m.eps)
        else:
            self.uses_batch_stats = False
            self.inv_std = 1.0 / torch.sqrt(running_var.reshape(channel) + m.eps)
            self.x_hat = (x - running_mean.reshape(channel)) * self.inv_std
        self.weight = m.weight.reshape(channel) if m.weight is not None else None
        y = self.x_hat if self.weight is None else self.x_hat * self.weight
        return y + m.bias.reshape(channel) if m.bias is not None else y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """dγ = Σ g x̂, dβ = Σ g per channel; dx through the batch statistics only in training mode."""
        m = self.module
        grads: ParamGrads = {}
        if m.weight is not None:
            grads["weight"] = (grad_out * self.x_hat).sum(self.dims)
        if m.bias is not None:
            grads["bias"] = grad_out.sum(self.dims)
        grad_hat = grad_out if self.weight is None else grad_out * self.weight
        if self.uses_batch_stats:
            return normalize_backward(grad_hat, self.x_hat, self.inv_std, self.dims), grads
        return grad_hat * self.inv_std, grads
