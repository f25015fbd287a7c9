"""Loss references: the loss value and d loss / d output, where backpropagation starts.

Every gradient in the model is a multiple of the loss gradient, so the seed has to be exact. For the
classification losses it is famously simple: with p = softmax(x), d(-log pₜ)/dx = p - onehot(t), the
predicted distribution minus the target one. For BCE with logits it is σ(x) - t, for MSE 2(ŷ - y)/n.

A reference also computes ``reduction="none"`` when used on its own: :meth:`~LossReference.forward`
then returns the unreduced loss and :meth:`~LossReference.backward` the gradient of its sum. Each loss
entry depends on its own output entry (its own row of logits for cross entropy) only, so that gradient
holds every non-zero of the Jacobian. ``gradscope.verify`` needs a scalar, so :func:`resolve_loss`
still refuses ``"none"``.

``loss_fn`` may be a loss module, the matching ``torch.nn.functional`` function, or a
``functools.partial`` of one; :func:`resolve_loss` maps each to its reference. Any other callable gets
no reference (the caller then differentiates the loss alone with autograd).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.errors import ConfigurationError
from gradscope.reference.activations import log_softmax
from gradscope.reference.base import LossReference
from gradscope.reference.registry import REFERENCES, register_reference

__all__ = [
    "BCELossReference",
    "BCEWithLogitsLossReference",
    "CrossEntropyLossReference",
    "HuberLossReference",
    "KLDivLossReference",
    "L1LossReference",
    "MSELossReference",
    "NLLLossReference",
    "SmoothL1LossReference",
    "resolve_loss",
]

#: ``torch.nn.functional`` losses and the modules that compute the same thing.
FUNCTIONAL_LOSSES: dict[Callable[..., Tensor], type[nn.Module]] = {
    F.mse_loss: nn.MSELoss,
    F.cross_entropy: nn.CrossEntropyLoss,
    F.nll_loss: nn.NLLLoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
    F.binary_cross_entropy: nn.BCELoss,
    F.l1_loss: nn.L1Loss,
    F.smooth_l1_loss: nn.SmoothL1Loss,
    F.huber_loss: nn.HuberLoss,
    F.kl_div: nn.KLDivLoss,
}


def resolve_loss(loss_fn: Callable[[Tensor, Any], Tensor]) -> LossReference | None:
    """The reference for ``loss_fn``, or ``None`` when there is none.

    Recognised: an instance of a loss module with a registered :class:`LossReference`, one of the
    functions in :data:`FUNCTIONAL_LOSSES` (``F.mse_loss``, ``F.cross_entropy``, ``F.nll_loss``,
    ``F.binary_cross_entropy(_with_logits)``, ``F.l1_loss``, ``F.smooth_l1_loss``, ``F.huber_loss``,
    ``F.kl_div``), or a ``functools.partial`` of one with keyword arguments only.

    Raises:
        ConfigurationError: for ``reduction="none"``, whose loss is not a scalar.
    """
    module: nn.Module | None = None
    if isinstance(loss_fn, nn.Module):
        module = loss_fn
    elif _is_functional_loss(loss_fn):
        module = FUNCTIONAL_LOSSES[loss_fn]()
    elif isinstance(loss_fn, functools.partial) and loss_fn.func in FUNCTIONAL_LOSSES and not loss_fn.args:
        try:
            module = FUNCTIONAL_LOSSES[loss_fn.func](**loss_fn.keywords)
        except TypeError:
            return None  # keywords the module does not take: leave it to autograd
    if module is None or type(module) not in REFERENCES:
        return None
    cls = REFERENCES.get(type(module))
    if not (isinstance(cls, type) and issubclass(cls, LossReference)):
        return None
    if getattr(module, "reduction", "mean") not in ("mean", "sum", "batchmean"):
        raise ConfigurationError(
            f"Expected the loss {type(module).__name__} to reduce to a scalar, but it has "
            f"reduction={module.reduction!r}. Use reduction='mean' or 'sum'."
        )
    return cls(module)


def _is_functional_loss(fn: object) -> bool:
    try:
        return fn in FUNCTIONAL_LOSSES
    except TypeError:  # an unhashable callable object
        return False


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Undo broadcasting: sum ``grad`` over the axes along which a tensor of ``shape`` was expanded."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(axes, keepdim=True) if axes else grad


def _reduce(per_entry: Tensor, grad: Tensor, reduction: str, output_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Reduce elementwise losses and their gradients the same way: (loss, d loss / d output).

    ``mean`` divides by the number of loss entries (broadcast entries included, as PyTorch counts
    them), ``batchmean`` by the batch size (the first axis), ``sum`` by 1; ``none`` keeps the entries
    and the gradient of their sum.
    """
    if reduction == "none":
        return per_entry, _sum_to(grad, output_shape)
    if reduction == "mean":
        scale = 1.0 / per_entry.numel()
    elif reduction == "batchmean":
        scale = 1.0 / (output_shape[0] if len(output_shape) > 0 else 1)
    else:
        scale = 1.0
    return per_entry.sum() * scale, _sum_to(grad * scale, output_shape)


@register_reference(nn.MSELoss)
class MSELossReference(LossReference):
    """Mean squared error: L = Σ (ŷ - y)² / n (``mean``, n entries) or Σ (ŷ - y)² (``sum``); dL/dŷ = 2 (ŷ - y) / n."""

    loss: nn.MSELoss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean or summed squared error; a broadcast target counts every broadcast entry, as PyTorch does."""
        diff = output - target
        loss, self.grad = _reduce(diff * diff, 2 * diff, self.loss.reduction, output.shape)
        return loss

    def backward(self) -> Tensor:
        """dL/dŷ = 2 (ŷ - y) / n, summed back over broadcast axes."""
        return self.grad


def _classes_last(x: Tensor) -> Tensor:
    """[C] -> [1, C]; [N, C, d1, ...] -> [N·d1·..., C]: one row per prediction."""
    return x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1).reshape(-1, x.shape[1])


def _classes_back(rows: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_classes_last` for a tensor shaped like ``like``."""
    if like.dim() == 1:
        return rows[0]
    return rows.reshape(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)


def _per_prediction(per_row: Tensor, like: Tensor) -> Tensor:
    """Per-row losses back in the target's shape: ``[]`` for ``[C]`` logits, ``[N, d1, ...]`` otherwise."""
    if like.dim() == 1:
        return per_row[0]
    return per_row.reshape(like.shape[0], *like.shape[2:])


class _IndexedTargets:
    """Class-index targets flattened to rows, with the ignore mask and the per-row class weight."""

    def __init__(self, target: Tensor, weight: Tensor | None, ignore_index: int, rows: Tensor) -> None:
        self.index = target.reshape(-1)
        keep = self.index != ignore_index
        self.safe = torch.where(keep, self.index, torch.zeros_like(self.index))
        # As a float of the logits' dtype: `python_float * bool_tensor` would round to float32.
        self.valid = keep.to(rows.dtype)
        self.onehot = torch.zeros_like(rows).scatter_(1, self.safe[:, None], 1.0)
        per_row = weight.to(rows.dtype)[self.safe] if weight is not None else torch.ones_like(rows[:, 0])
        self.weight = per_row * self.valid  # ignored rows weigh nothing
        self.weight_sum = self.weight.sum()


@register_reference(nn.CrossEntropyLoss)
class CrossEntropyLossReference(LossReference):
    """Cross entropy of logits x ``[N, C]`` / ``[N, C, d1, ...]`` / ``[C]``, with PyTorch's options.

    Class-index targets t: with p = softmax(x), per row ℓ = (1 - ε) wₜ (-log pₜ) + (ε/C) Σ_c w_c (-log p_c)
    and dℓ/dx = (1 - ε) wₜ (p - onehotₜ) + (ε/C) ((Σ_c w_c) p - w). ``mean`` divides by Σ wₜ over the rows
    not equal to ``ignore_index`` (the number of such rows without weights); ignored rows contribute 0.
    Probability targets q: q ← (1 - ε) q + ε/C, ℓ = -Σ_c w_c q_c log p_c, dℓ/dx = (Σ_c w_c q_c) p - w q, and
    ``mean`` divides by the number of rows.
    """

    loss: nn.CrossEntropyLoss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Log-softmax, then the weighted, smoothed negative log-likelihood."""
        m = self.loss
        self.output = output
        rows = _classes_last(output)
        classes = rows.shape[1]
        logp = log_softmax(rows, 1)
        self.p = torch.exp(logp)
        weight = m.weight.to(rows.dtype) if m.weight is not None else torch.ones(classes, dtype=rows.dtype)
        weight = weight.to(rows.device)
        eps = m.label_smoothing
        if target.is_floating_point():  # class probabilities
            q = _classes_last(target) * (1 - eps) + eps / classes
            self.wq = weight * q
            self.denominator: Tensor | int = rows.shape[0] if m.reduction == "mean" else 1
            self.grad_rows = self.wq.sum(1, keepdim=True) * self.p - self.wq
            if m.reduction == "none":
                return _per_prediction(-(self.wq * logp).sum(1), output)
            return -(self.wq * logp).sum() / self.denominator
        t = _IndexedTargets(target, m.weight, m.ignore_index, rows)
        self.denominator = t.weight_sum if m.reduction == "mean" else 1
        nll = -(t.weight * (logp * t.onehot).sum(1))
        smooth = -((logp * weight).sum(1) * t.valid)
        self.grad_rows = (1 - eps) * t.weight[:, None] * (self.p - t.onehot) + (eps / classes) * t.valid[:, None] * (
            weight.sum() * self.p - weight
        )
        per_row = (1 - eps) * nll + (eps / classes) * smooth
        if m.reduction == "none":
            return _per_prediction(per_row, output)
        return per_row.sum() / self.denominator

    def backward(self) -> Tensor:
        """Predicted minus target distribution, weighted, divided as the reduction divided."""
        return _classes_back(self.grad_rows / self.denominator, self.output)


@register_reference(nn.NLLLoss)
class NLLLossReference(LossReference):
    """Negative log-likelihood of log-probabilities x: ℓ = -wₜ xₜ per row; dℓ/dx = -wₜ at t, 0 elsewhere.

    ``mean`` divides by Σ wₜ over the rows not equal to ``ignore_index``.
    """

    loss: nn.NLLLoss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Pick each row's target entry, weight it, negate, reduce."""
        m = self.loss
        self.output = output
        rows = _classes_last(output)
        t = _IndexedTargets(target, m.weight, m.ignore_index, rows)
        self.denominator = t.weight_sum if m.reduction == "mean" else 1
        self.grad_rows = -t.weight[:, None] * t.onehot
        per_row = -(t.weight * (rows * t.onehot).sum(1))
        if m.reduction == "none":
            return _per_prediction(per_row, output)
        return per_row.sum() / self.denominator

    def backward(self) -> Tensor:
        """-wₜ / denominator at each row's target, 0 elsewhere."""
        return _classes_back(self.grad_rows / self.denominator, self.output)


@register_reference(nn.BCEWithLogitsLoss)
class BCEWithLogitsLossReference(LossReference):
    """Binary cross entropy on logits x with targets t (same shape), per-entry ``weight`` and ``pos_weight``.

    With l = 1 + (pos_weight - 1) t: ℓ = (1 - t) x + l · softplus(-x), softplus(-x) = log(1 + e⁻ˣ) computed
    stably, and dℓ/dx = (1 - t) - l σ(-x), which is σ(x) - t without ``pos_weight``.
    """

    loss: nn.BCEWithLogitsLoss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Weighted mean or sum of the per-entry losses."""
        m = self.loss
        log_weight = (m.pos_weight.to(output.dtype) - 1) * target + 1 if m.pos_weight is not None else 1.0
        softplus_neg = torch.log1p(torch.exp(-output.abs())) + torch.clamp(-output, min=0)
        per_entry = (1 - target) * output + log_weight * softplus_neg
        grad = (1 - target) - log_weight * torch.sigmoid(-output)
        if m.weight is not None:
            per_entry, grad = per_entry * m.weight.to(output.dtype), grad * m.weight.to(output.dtype)
        loss, self.grad = _reduce(per_entry, grad, m.reduction, output.shape)
        return loss

    def backward(self) -> Tensor:
        """dL/dx = ((1 - t) - l σ(-x)) · weight / n."""
        return self.grad


#: The floor of p (1 - p) in PyTorch's BCE backward: 1e-12 as a float32 constant, whatever the dtype.
_BCE_EPS = float(torch.tensor(1e-12, dtype=torch.float32))


@register_reference(nn.BCELoss)
class BCELossReference(LossReference):
    """Binary cross entropy of probabilities p with targets t: ℓ = -w (t log p + (1 - t) log(1 - p)).

    dℓ/dp = w (p - t) / (p (1 - p)), with PyTorch's guards: each log is clamped at -100, and the
    denominator p (1 - p) at 1e-12, so a saturated sigmoid gives a large but finite gradient.
    """

    loss: nn.BCELoss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Weighted mean or sum of the per-entry losses."""
        m = self.loss
        log_p = torch.clamp(torch.log(output), min=-100)
        log_not_p = torch.clamp(torch.log1p(-output), min=-100)
        per_entry = -(target * log_p + (1 - target) * log_not_p)
        grad = (output - target) / torch.clamp(output * (1 - output), min=_BCE_EPS)
        if m.weight is not None:
            weight = m.weight.to(output.dtype)
            per_entry, grad = per_entry * weight, grad * weight
        loss, self.grad = _reduce(per_entry, grad, m.reduction, output.shape)
        return loss

    def backward(self) -> Tensor:
        """dL/dp = w (p - t) / (p (1 - p)) / n."""
        return self.grad


@register_reference(nn.L1Loss)
class L1LossReference(LossReference):
    """Mean absolute error: ℓ = |ŷ - y|; dℓ/dŷ = sign(ŷ - y) (0 where they are equal, as PyTorch takes it)."""

    loss: nn.L1Loss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean or summed absolute error."""
        diff = output - target
        loss, self.grad = _reduce(diff.abs(), torch.sign(diff), self.loss.reduction, output.shape)
        return loss

    def backward(self) -> Tensor:
        """dL/dŷ = sign(ŷ - y) / n."""
        return self.grad


@register_reference(nn.SmoothL1Loss)
class SmoothL1LossReference(LossReference):
    """ℓ = d² / (2β) where |d| < β, else |d| - β/2 (d = ŷ - y); dℓ/dŷ = d / β or sign(d). β = 0 is L1."""

    loss: nn.SmoothL1Loss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Quadratic near zero, linear beyond β."""
        beta = self.loss.beta
        d = output - target
        if beta == 0:
            per_entry, grad = d.abs(), torch.sign(d)
        else:
            quadratic = d.abs() < beta
            per_entry = torch.where(quadratic, 0.5 * d * d / beta, d.abs() - 0.5 * beta)
            grad = torch.where(quadratic, d / beta, torch.sign(d))
        loss, self.grad = _reduce(per_entry, grad, self.loss.reduction, output.shape)
        return loss

    def backward(self) -> Tensor:
        """dL/dŷ = (d / β inside, sign(d) outside) / n."""
        return self.grad


@register_reference(nn.HuberLoss)
class HuberLossReference(LossReference):
    """ℓ = d² / 2 where |d| < δ, else δ (|d| - δ/2); dℓ/dŷ = d or δ sign(d). It is δ times SmoothL1 with β = δ."""

    loss: nn.HuberLoss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Quadratic near zero, linear with slope δ beyond δ."""
        delta = self.loss.delta
        d = output - target
        quadratic = d.abs() < delta
        per_entry = torch.where(quadratic, 0.5 * d * d, delta * (d.abs() - 0.5 * delta))
        grad = torch.where(quadratic, d, delta * torch.sign(d))
        loss, self.grad = _reduce(per_entry, grad, self.loss.reduction, output.shape)
        return loss

    def backward(self) -> Tensor:
        """dL/dŷ = (d inside, δ sign(d) outside) / n."""
        return self.grad


@register_reference(nn.KLDivLoss)
class KLDivLossReference(LossReference):
    """KL divergence of log-probabilities x from targets q: ℓ = q (log q - x), 0 where q = 0.

    With ``log_target`` the target is log q, and ℓ = eˢ (s - x) for s = log q. Either way dℓ/dx = -q.
    ``batchmean`` divides the sum by the batch size, the true KL divergence per sample; ``mean`` divides
    by the number of entries.
    """

    loss: nn.KLDivLoss

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Sum the pointwise terms, then reduce."""
        if self.loss.log_target:
            q = torch.exp(target)
            per_entry = q * (target - output)
        else:
            q = target
            # q log q is 0 at q = 0 (the limit), which torch.xlogy computes without a 0 · -inf.
            per_entry = torch.xlogy(q, q) - q * output
        loss, self.grad = _reduce(per_entry, -q, self.loss.reduction, output.shape)
        return loss

    def backward(self) -> Tensor:
        """dL/dx = -q / n."""
        return self.grad
