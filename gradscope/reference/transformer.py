"""``nn.TransformerEncoderLayer`` (pre-norm and post-norm) and ``nn.TransformerEncoder``.

A transformer block is two residual sub-blocks, self-attention and a feed-forward MLP, each wrapped
with a LayerNorm. Pre-norm (``norm_first=True``, the layout of GPT-2 and most modern models):

    h = x + SA(LN₁(x))          y = h + FF(LN₂(h))

Post-norm (the original Transformer):

    h = LN₁(x + SA(x))          y = LN₂(h + FF(h))

with SA(x) = dropout₁(attention(x)) and FF(x) = dropout₂(W₂ dropout(act(W₁ x))). The reference calls
the references of the submodules (LayerNorm, MultiheadAttention, Linear, Dropout) through
:meth:`~gradscope.reference.ReferenceLayer.child`, so each one's gradients are recorded and compared
under its own path. The residual additions become sums on the way back: in pre-norm, the identity
path carries g straight from y to x, which is why deep pre-norm stacks train without warm-up tricks.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.activations import GELUReference, ReLUReference
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.calls import ModuleCall
from gradscope.reference.containers import add_gradients
from gradscope.reference.registry import register_reference

__all__ = ["TransformerEncoderLayerReference", "TransformerEncoderReference"]


class _Chain:
    """Nodes applied one after another, with the backward in reverse (a Sequential without a module)."""

    def __init__(self, *nodes: ModuleCall) -> None:
        self.nodes = nodes

    def forward(self, x: Tensor) -> Tensor:
        for node in self.nodes:
            x = node.forward(x)
        return x

    def backward(self, grad: Tensor | None) -> Tensor | None:
        for node in reversed(self.nodes):
            grad = node.backward(grad)
        return grad


class _Inline:
    """A functional activation (``F.relu``, ``F.gelu``) computed by a reference, recorded nowhere."""

    def __init__(self, reference: ReLUReference | GELUReference) -> None:
        self.reference = reference

    def forward(self, x: Tensor) -> Tensor:
        return self.reference.forward(x)

    def backward(self, grad: Tensor | None) -> Tensor | None:
        return None if grad is None else self.reference.backward(grad)[0]


@register_reference(nn.TransformerEncoderLayer)
class TransformerEncoderLayerReference(ReferenceLayer):
    """One encoder block on x ``[N, L, E]`` (``batch_first``) or ``[L, N, E]``, called without masks."""

    module: nn.TransformerEncoderLayer

    def forward(self, x: Tensor) -> Tensor:
        """Compute h = x + SA(LN₁(x)), y = h + FF(LN₂(h)) (pre-norm), or the post-norm order."""
        self.attention = _Chain(self.child("self_attn"), self.child("dropout1"))
        self.mlp = _Chain(
            self.child("linear1"),
            self._activation(),
            self.child("dropout"),
            self.child("linear2"),
            self.child("dropout2"),
        )
        self.norm1, self.norm2 = self.child("norm1"), self.child("norm2")
        if self.module.norm_first:
            h = x + self.attention.forward(self.norm1.forward(x))
            return h + self.mlp.forward(self.norm2.forward(h))
        h = self.norm1.forward(x + self.attention.forward(x))
        return self.norm2.forward(h + self.mlp.forward(h))

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """Each residual addition forwards g to both of its inputs, which then add up again."""
        if self.module.norm_first:
            grad_h = add_gradients(grad_out, self.norm2.backward(self.mlp.backward(grad_out)))
            return add_gradients(grad_h, self.norm1.backward(self.attention.backward(grad_h))), {}
        grad_h_sum = self.norm2.backward(grad_out)  # gradient of h + FF(h), before LN₂
        grad_h = add_gradients(grad_h_sum, self.mlp.backward(grad_h_sum))
        grad_x_sum = self.norm1.backward(grad_h)
        return add_gradients(grad_x_sum, self.attention.backward(grad_x_sum)), {}

    def _activation(self) -> ModuleCall:
        activation = self.module.activation
        if isinstance(activation, nn.Module):
            return self.child("activation")
        if activation is F.relu:
            return _Inline(ReLUReference(nn.ReLU(), path=self.path))
        if activation is F.gelu:
            return _Inline(GELUReference(nn.GELU(), path=self.path))
        raise UnsupportedLayerError(
            f"No reference backward for the activation {activation!r} of TransformerEncoderLayer "
            f"{self.path or '(model)'!r}. Use activation='relu' or 'gelu', or pass an nn.Module activation "
            "that has a reference (e.g. nn.GELU(approximate='tanh'))."
        )


@register_reference(nn.TransformerEncoder)
class TransformerEncoderReference(ReferenceLayer):
    """A stack of encoder layers, then the optional final norm; called without masks."""

    module: nn.TransformerEncoder

    def forward(self, x: Tensor) -> Tensor:
        """Run ``layers.0`` … ``layers.{n-1}`` and ``norm``."""
        names = [f"layers.{i}" for i in range(len(self.module.layers))]
        if self.module.norm is not None:
            names.append("norm")
        self.stack = _Chain(*(self.child(name) for name in names))
        return self.stack.forward(x)

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """The backward of a stack is the stack of backwards, last layer first."""
        return self.stack.backward(grad_out), {}
