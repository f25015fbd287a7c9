"""Containers: ``nn.Sequential`` and :class:`Residual`, whose references only route gradients.

A container's forward feeds each child's output to the next; its backward runs the children's
backwards in the opposite order, each turning d loss / d output into d loss / d input (the chain rule,
one link per layer). A residual block forks its input into two branches; on the way back the fork
becomes a sum, because x influences the loss through both branches.
"""

from __future__ import annotations

from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["Residual", "ResidualReference", "SequentialReference"]


class Residual(nn.Module):
    """A residual block: y = body(x) + shortcut(x), with the identity as the default shortcut.

    Use it as a building block (``Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()))``)
    so that ``gradscope.verify`` can follow gradients through the skip connection.

    Args:
        body: the residual branch; its output has the shape of ``shortcut(x)``.
        shortcut: the skip branch (a projection such as ``nn.Linear`` or a 1x1 ``nn.Conv2d`` when the
            shapes change); ``None`` for the identity.

    Shape:
        x: whatever ``body`` accepts; y: the shape of ``body(x)``.
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = body(x) + shortcut(x)."""
        return self.body(x) + (self.shortcut(x) if self.shortcut is not None else x)


def child_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s direct children in call order, repeats included (a layer used twice)."""
    return [name for name, _ in module.named_modules(remove_duplicate=False) if name and "." not in name]


def add_gradients(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Sum of two gradient contributions to the same tensor, where ``None`` means "no contribution"."""
    if a is None:
        return b
    return a if b is None else a + b


@register_reference(nn.Sequential)
class SequentialReference(ReferenceLayer):
    """y = fₙ(…f₂(f₁(x))); backward: gₖ₋₁ = backwardₖ(gₖ) from the last child to the first."""

    def forward(self, x: Tensor) -> Tensor:
        """Run the children's references in order."""
        self.nodes = [self.child(name) for name in child_names(self.module)]
        for node in self.nodes:
            x = node.forward(x)
        return x

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """Run the children's backwards in reverse order; each records its own parameter gradients."""
        grad: Tensor | None = grad_out
        for node in reversed(self.nodes):
            grad = node.backward(grad)
        return grad, {}


@register_reference(Residual)
class ResidualReference(ReferenceLayer):
    """y = body(x) + shortcut(x); dL/dx = body's backward(g) + shortcut's backward(g)."""

    module: Residual

    def forward(self, x: Tensor) -> Tensor:
        """Run both branches on the same input and add them."""
        self.body = self.child("body")
        self.shortcut = self.child("shortcut") if self.module.shortcut is not None else None
        y = self.body.forward(x)
        return y + (self.shortcut.forward(x) if self.shortcut is not None else x)

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """A fork in the forward is a sum in the backward; the identity shortcut passes g unchanged."""
        through_body = self.body.backward(grad_out)
        through_shortcut = self.shortcut.backward(grad_out) if self.shortcut is not None else grad_out
        return add_gradients(through_body, through_shortcut), {}
