"""Elementwise activations and the softmax family: each local derivative sits beside its forward.

An elementwise activation y = f(x) has a diagonal Jacobian, so its backward is one product,
``grad_in = grad_out * f'(x)``. Where f' is cheaper to write from the output (sigmoid, tanh), the
forward keeps the output instead of the input. ``inplace=True`` changes nothing here: a reference never
writes into its input, and keeps what its backward needs (x, a mask, or y) as tensors of its own. Softmax is not elementwise: each output depends on
every input along ``dim``, and the backward is a vector-Jacobian product along that axis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = [
    "ELUReference",
    "GELUReference",
    "HardswishReference",
    "HardtanhReference",
    "LeakyReLUReference",
    "LogSoftmaxReference",
    "MishReference",
    "ReLUReference",
    "SiLUReference",
    "SigmoidReference",
    "SoftmaxReference",
    "SoftplusReference",
    "TanhReference",
]


@register_reference(nn.ReLU)
class ReLUReference(ReferenceLayer):
    """y = max(x, 0); dy/dx = 1 where x > 0, else 0 (PyTorch also takes 0 at x = 0)."""

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = max(x, 0)."""
        self.active = x > 0
        return torch.where(self.active, x, torch.zeros_like(x))

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """The gradient passes where the unit was active and stops where it was not."""
        return torch.where(self.active, grad_out, torch.zeros_like(grad_out)), {}


@register_reference(nn.LeakyReLU)
class LeakyReLUReference(ReferenceLayer):
    """y = x if x > 0 else slope·x; dy/dx = 1 or slope."""

    module: nn.LeakyReLU

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = x where x > 0, slope·x elsewhere."""
        self.active = x > 0
        return torch.where(self.active, x, x * self.module.negative_slope)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Negative inputs still pass ``slope`` of their gradient: no unit dies completely."""
        return torch.where(self.active, grad_out, grad_out * self.module.negative_slope), {}


@register_reference(nn.Sigmoid)
class SigmoidReference(ReferenceLayer):
    """y = 1 / (1 + e⁻ˣ); dy/dx = y (1 - y) ≤ 1/4: n sigmoids in a chain scale the gradient by at most 4⁻ⁿ (weights aside)."""

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = σ(x)."""
        self.y = torch.sigmoid(x)
        return self.y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Return dx = g · y (1 - y)."""
        return grad_out * self.y * (1 - self.y), {}


@register_reference(nn.Tanh)
class TanhReference(ReferenceLayer):
    """y = tanh(x); dy/dx = 1 - y², which is 1 at 0 and vanishes as |x| grows (saturation)."""

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = tanh(x)."""
        self.y = torch.tanh(x)
        return self.y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Return dx = g · (1 - y²)."""
        return grad_out * (1 - self.y * self.y), {}


@register_reference(nn.SiLU)
class SiLUReference(ReferenceLayer):
    """y = x σ(x) (swish); dy/dx = σ(x) (1 + x (1 - σ(x)))."""

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = x σ(x)."""
        self.x, self.s = x, torch.sigmoid(x)
        return x * self.s

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Product rule: d(x σ)/dx = σ + x σ (1 - σ)."""
        return grad_out * self.s * (1 + self.x * (1 - self.s)), {}


@register_reference(nn.ELU)
class ELUReference(ReferenceLayer):
    """y = x if x > 0 else α (eˣ - 1); dy/dx = 1 or α eˣ (= y + α, which is how PyTorch's in-place backward reads it)."""

    module: nn.ELU

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = ELU(x)."""
        alpha = self.module.alpha
        self.active = x > 0
        self.negative_slope = alpha * torch.exp(torch.clamp(x, max=0))  # α eˣ, capped where it is not used
        return torch.where(self.active, x, alpha * torch.expm1(torch.clamp(x, max=0)))

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Return dx = g where x > 0, g α eˣ elsewhere."""
        return torch.where(self.active, grad_out, grad_out * self.negative_slope), {}


@register_reference(nn.Hardtanh)
@register_reference(nn.ReLU6)
class HardtanhReference(ReferenceLayer):
    """y = clamp(x, min_val, max_val) (ReLU6: min 0, max 6); dy/dx = 1 strictly inside, 0 at and beyond the ends."""

    module: nn.Hardtanh

    def forward(self, x: Tensor) -> Tensor:
        """Clip x to [min_val, max_val]."""
        low, high = self.module.min_val, self.module.max_val
        self.inside = (x > low) & (x < high)  # PyTorch passes no gradient at x == min_val or max_val
        return torch.clamp(x, low, high)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """The gradient passes where x was not clipped."""
        return torch.where(self.inside, grad_out, torch.zeros_like(grad_out)), {}


@register_reference(nn.Hardswish)
class HardswishReference(ReferenceLayer):
    """y = x · ReLU6(x + 3) / 6; dy/dx = 0 below -3, x/3 + 1/2 on [-3, 3], 1 above 3 (PyTorch's boundaries)."""

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = x · clamp(x + 3, 0, 6) / 6."""
        self.slope = torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))
        return x * torch.clamp(x + 3, 0, 6) / 6

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Return dx = g · slope."""
        return grad_out * self.slope, {}


def softplus(x: Tensor, beta: float = 1.0) -> Tensor:
    """log(1 + e^(βx)) / β, computed without overflow: max(βx, 0) + log1p(e^-|βx|)."""
    bx = beta * x
    return (torch.clamp(bx, min=0) + torch.log1p(torch.exp(-bx.abs()))) / beta


@register_reference(nn.Softplus)
class SoftplusReference(ReferenceLayer):
    """y = log(1 + e^(βx)) / β, or x where βx > threshold; dy/dx = σ(βx), or 1 past the threshold."""

    module: nn.Softplus

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = softplus(x), linear past the threshold as PyTorch does."""
        beta, threshold = self.module.beta, self.module.threshold
        self.linear = x * beta > threshold
        self.slope = torch.sigmoid(x * beta)
        return torch.where(self.linear, x, softplus(x, beta))

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Return dx = g σ(βx) (g past the threshold)."""
        return torch.where(self.linear, grad_out, grad_out * self.slope), {}


@register_reference(nn.Mish)
class MishReference(ReferenceLayer):
    """y = x tanh(softplus(x)); dy/dx = t + x σ(x) (1 - t²), t = tanh(softplus(x)), since softplus' = σ."""

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = x tanh(softplus(x))."""
        self.x = x
        self.t = torch.tanh(softplus(x))
        return x * self.t

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Product rule, then the chain rule through tanh and softplus."""
        return grad_out * (self.t + self.x * torch.sigmoid(self.x) * (1 - self.t * self.t)), {}


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


@register_reference(nn.GELU)
class GELUReference(ReferenceLayer):
    """y = x Φ(x) (``approximate="none"``) or its tanh approximation (``approximate="tanh"``).

    Exact: dy/dx = Φ(x) + x φ(x), with Φ the standard normal CDF and φ its density.
    Tanh: y = x/2 (1 + t), t = tanh(u), u = √(2/π) (x + 0.044715 x³), so
    dy/dx = (1 + t)/2 + x/2 (1 - t²) du/dx.
    """

    module: nn.GELU

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = GELU(x)."""
        self.x = x
        if self.module.approximate == "tanh":
            self.t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3))
            return 0.5 * x * (1 + self.t)
        self.cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
        return x * self.cdf

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Chain rule through the CDF (exact) or through tanh(u(x)) (approximate)."""
        x = self.x
        if self.module.approximate == "tanh":
            du_dx = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x**2)
            return grad_out * (0.5 * (1 + self.t) + 0.5 * x * (1 - self.t**2) * du_dx), {}
        pdf = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
        return grad_out * (self.cdf + x * pdf), {}


def softmax_dim(dim: int | None, ndim: int) -> int:
    """The axis ``nn.Softmax(dim=None)`` uses: PyTorch's legacy rule (0 for 0-, 1- and 3-d inputs, else 1)."""
    if dim is not None:
        return dim
    return 0 if ndim in (0, 1, 3) else 1


def softmax_backward(y: Tensor, grad_out: Tensor, dim: int) -> Tensor:
    """Vector-Jacobian product of softmax: with J = diag(y) - y yᵀ, gᵀJ = y ⊙ (g - ⟨g, y⟩)."""
    return y * (grad_out - (grad_out * y).sum(dim, keepdim=True))


@register_reference(nn.Softmax)
class SoftmaxReference(ReferenceLayer):
    """yᵢ = exp(xᵢ) / Σⱼ exp(xⱼ) along ``dim``; ∂yᵢ/∂xⱼ = yᵢ (δᵢⱼ - yⱼ)."""

    module: nn.Softmax

    def forward(self, x: Tensor) -> Tensor:
        """Softmax along ``dim``, shifted by the maximum so exp cannot overflow (the shift cancels)."""
        self.dim = softmax_dim(self.module.dim, x.dim())
        e = torch.exp(x - x.amax(self.dim, keepdim=True))
        self.y = e / e.sum(self.dim, keepdim=True)
        return self.y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Return dx = y ⊙ (g - Σ g y)."""
        return softmax_backward(self.y, grad_out, self.dim), {}


def log_softmax(x: Tensor, dim: int) -> Tensor:
    """Log softmax(x) = x - logsumexp(x), computed stably by shifting with the maximum."""
    shifted = x - x.amax(dim, keepdim=True)
    return shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))


@register_reference(nn.LogSoftmax)
class LogSoftmaxReference(ReferenceLayer):
    """yᵢ = xᵢ - log Σⱼ exp(xⱼ) along ``dim``; ∂yᵢ/∂xⱼ = δᵢⱼ - softmax(x)ⱼ."""

    module: nn.LogSoftmax

    def forward(self, x: Tensor) -> Tensor:
        """Log-softmax along ``dim``."""
        self.dim = softmax_dim(self.module.dim, x.dim())
        self.y = log_softmax(x, self.dim)
        return self.y

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Return dx = g - softmax(x) Σ g, with softmax(x) = exp(y)."""
        return grad_out - torch.exp(self.y) * grad_out.sum(self.dim, keepdim=True), {}
