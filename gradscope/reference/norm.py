"""Normalization: LayerNorm, BatchNorm1d/2d/3d, GroupNorm, InstanceNorm1d/2d/3d and RMSNorm.

All but RMSNorm compute x̂ = (x - μ) / √(σ² + ε) and y = γ x̂ + β; they differ only in the axes the
statistics μ and σ² (biased variance) are taken over: the trailing feature axes for LayerNorm, every
axis but the channel for BatchNorm, the spatial axes of each channel for InstanceNorm, each group of
channels with its spatial axes for GroupNorm. RMSNorm drops the centring: x̂ = x / √(mean(x²) + ε). When μ and σ² come from the batch itself they depend on x, and the backward
gains two correction terms (see :func:`normalize_backward`). That coupling is also why normalization
helps gradient flow: the gradient reaching x is re-centred and rescaled by 1/σ at every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = [
    "BatchNormReference",
    "GroupNormReference",
    "InstanceNormReference",
    "LayerNormReference",
    "RMSNormReference",
    "normalize",
    "normalize_backward",
]


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
@register_reference(nn.BatchNorm3d)
class BatchNormReference(ReferenceLayer):
    """BatchNorm over every axis but the channel axis 1: x ``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]`` or ``[N, C, D, H, W]``.

    Training mode (or no running statistics) normalizes with the batch's own statistics, so gradients
    flow through μ and σ² as in LayerNorm. Eval mode uses the running statistics, which are constants:
    the layer is then affine, dy/dx = γ / √(running_var + ε). The reference does not update the
    running statistics; they do not enter this step's gradients.
    """

    module: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d

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


def _channel_affine_grads(module: nn.Module, grad_out: Tensor, x_hat: Tensor, dims: tuple[int, ...]) -> ParamGrads:
    """dγ = Σ g x̂ and dβ = Σ g per channel (axis 1), for the affine parameters the module has."""
    grads: ParamGrads = {}
    if getattr(module, "weight", None) is not None:
        grads["weight"] = (grad_out * x_hat).sum(dims)
    if getattr(module, "bias", None) is not None:
        grads["bias"] = grad_out.sum(dims)
    return grads


@register_reference(nn.GroupNorm)
class GroupNormReference(ReferenceLayer):
    """GroupNorm of x ``[N, C, *]``: the C channels in G groups, each group of each sample standardized.

    Viewed as ``[N, G, C/G · spatial]``, the statistics are per row: :func:`normalize_backward` over the
    last axis. γ and β are per channel, so their gradients sum over N and the spatial axes.
    """

    module: nn.GroupNorm

    def forward(self, x: Tensor) -> Tensor:
        """Standardize each (sample, group), then scale and shift per channel."""
        m = self.module
        self.shape = x.shape
        grouped = x.reshape(x.shape[0], m.num_groups, -1)
        x_hat, self.inv_std = normalize(grouped, (2,), m.eps)
        self.x_hat = x_hat.reshape(x.shape)
        self.channel = (1, -1) + (1,) * (x.dim() - 2)
        y = self.x_hat * m.weight.reshape(self.channel) if m.weight is not None else self.x_hat
        return y + m.bias.reshape(self.channel) if m.bias is not None else y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Affine gradients per channel; dx through each group's own statistics."""
        m = self.module
        grads = _channel_affine_grads(m, grad_out, self.x_hat, (0, *range(2, grad_out.dim())))
        grad_hat = grad_out * m.weight.reshape(self.channel) if m.weight is not None else grad_out
        n = self.shape[0]
        grad_x = normalize_backward(
            grad_hat.reshape(n, m.num_groups, -1), self.x_hat.reshape(n, m.num_groups, -1), self.inv_std, (2,)
        )
        return grad_x.reshape(self.shape), grads


@register_reference(nn.InstanceNorm1d)
@register_reference(nn.InstanceNorm2d)
@register_reference(nn.InstanceNorm3d)
class InstanceNormReference(ReferenceLayer):
    """InstanceNorm of x ``[N, C, *spatial]`` (or unbatched ``[C, *spatial]``): each channel of each sample on its own.

    With the input's own statistics (training, or ``track_running_stats=False``) the backward is
    :func:`normalize_backward` over the spatial axes. In eval mode with running statistics the layer is
    affine per channel, dy/dx = γ / √(running_var + ε), as BatchNorm in eval mode.
    """

    module: nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d

    def forward(self, x: Tensor) -> Tensor:
        """Standardize each (sample, channel) over space, then the optional per-channel affine map."""
        m = self.module
        spatial = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[type(m)]
        self.unbatched = x.dim() == spatial + 1
        x = x.unsqueeze(0) if self.unbatched else x
        self.dims = tuple(range(2, x.dim()))
        self.channel = (1, -1) + (1,) * spatial
        running_mean, running_var = m.running_mean, m.running_var
        self.uses_input_stats = m.training or not m.track_running_stats or running_mean is None or running_var is None
        if self.uses_input_stats:
            self.x_hat, self.inv_std = normalize(x, self.dims, m.eps)
        else:
            assert running_mean is not None and running_var is not None
            self.inv_std = 1.0 / torch.sqrt(running_var.reshape(self.channel) + m.eps)
            self.x_hat = (x - running_mean.reshape(self.channel)) * self.inv_std
        y = self.x_hat * m.weight.reshape(self.channel) if m.weight is not None else self.x_hat
        y = y + m.bias.reshape(self.channel) if m.bias is not None else y
        return y.squeeze(0) if self.unbatched else y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Affine gradients per channel; dx through the per-instance statistics only when they were used."""
        m = self.module
        g = grad_out.unsqueeze(0) if self.unbatched else grad_out
        grads = _channel_affine_grads(m, g, self.x_hat, (0, *self.dims))
        grad_hat = g * m.weight.reshape(self.channel) if m.weight is not None else g
        if self.uses_input_stats:
            grad_x = normalize_backward(grad_hat, self.x_hat, self.inv_std, self.dims)
        else:
            grad_x = grad_hat * self.inv_std
        return (grad_x.squeeze(0) if self.unbatched else grad_x), grads


@register_reference(nn.RMSNorm)
class RMSNormReference(ReferenceLayer):
    """RMSNorm over the trailing ``normalized_shape`` axes: y = γ x r, r = 1 / √(mean(x²) + ε).

    With x̂ = x r and ĝ = dL/dx̂: dL/dx = r (ĝ - x̂ mean(ĝ x̂)), LayerNorm's backward without the mean
    term (nothing was subtracted). ``eps=None`` means the machine epsilon of the input's dtype, as
    PyTorch uses.
    """

    module: nn.RMSNorm

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = γ x / √(mean(x²) + ε)."""
        m = self.module
        self.dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
        eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
        self.inv_rms = 1.0 / torch.sqrt((x * x).mean(self.dims, keepdim=True) + eps)
        self.x_hat = x * self.inv_rms
        return self.x_hat * m.weight if m.weight is not None else self.x_hat

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """dγ = Σ g x̂ over leading axes; dx = r (ĝ - x̂ mean(ĝ x̂))."""
        m = self.module
        grads: ParamGrads = {}
        if m.weight is not None:
            grads["weight"] = (grad_out * self.x_hat).sum(tuple(range(grad_out.dim() - len(self.dims))))
        grad_hat = grad_out * m.weight if m.weight is not None else grad_out
        mean_gx = (grad_hat * self.x_hat).mean(self.dims, keepdim=True)
        return (grad_hat - self.x_hat * mean_gx) * self.inv_rms, grads
