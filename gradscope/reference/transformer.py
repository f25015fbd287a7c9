"""Transformer blocks: ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` and their stacks.

An encoder block is two residual sub-blocks, self-attention and a feed-forward MLP, each wrapped with
a LayerNorm. Pre-norm (``norm_first=True``, the layout of GPT-2 and most modern models):

    h = x + SA(LN₁(x))          y = h + FF(LN₂(h))

Post-norm (the original Transformer):

    h = LN₁(x + SA(x))          y = LN₂(h + FF(h))

with SA(x) = dropout₁(attention(x)) and FF(x) = dropout₂(W₂ dropout(act(W₁ x))). A decoder block adds
a third sub-block between the two, cross-attention CA(h, m) = dropout₂(attention(h, m, m)) from the
target sequence to the encoder's output m (the *memory*):

    h₁ = x + SA(LN₁(x))     h₂ = h₁ + CA(LN₂(h₁), m)     y = h₂ + FF(LN₃(h₂))       (pre-norm)

The references call the references of the submodules (LayerNorm, MultiheadAttention, Linear, Dropout)
through :meth:`~gradscope.reference.ReferenceLayer.child`, so each one's gradients are recorded and
compared under its own path. The residual additions become sums on the way back: in pre-norm, the
identity path carries g straight from y to x, which is why deep pre-norm stacks train without warm-up
tricks. The memory is read by the keys and the values of every decoder block's cross-attention, so
its gradient is the sum over all those reads.

A node receives one input, so the masks (and a decoder's memory) are set on the reference by the
composite that calls the block, with the names of PyTorch's arguments (``src_mask``, ``memory``,
``tgt_key_padding_mask``, ...); a decoder's d loss / d memory is then in ``grad_memory``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.activations import GELUReference, ReLUReference
from gradscope.reference.attention import MultiheadAttentionReference
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.calls import ModuleCall
from gradscope.reference.containers import add_gradients
from gradscope.reference.registry import register_reference

__all__ = [
    "TransformerDecoderLayerReference",
    "TransformerDecoderReference",
    "TransformerEncoderLayerReference",
    "TransformerEncoderReference",
]


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


class _Attention:
    """A MultiheadAttention child called with masks (and key = value = memory for cross-attention).

    Configures the child's reference as PyTorch's call would, then applies the block's dropout; after
    the backward, ``grad_memory`` is the memory's gradient through both the keys and the values.
    """

    def __init__(
        self,
        block: ReferenceLayer,
        name: str,
        dropout: str,
        *,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        memory: Tensor | None = None,
    ) -> None:
        self.attention, self.dropout = block.child(name), block.child(dropout)
        self.where = f"{block.path}.{name}" if block.path else name
        self.configured = any(t is not None for t in (attn_mask, key_padding_mask, memory)) or is_causal
        self.grad_memory: Tensor | None = None
        reference = self.attention.reference
        if isinstance(reference, MultiheadAttentionReference):
            reference.key = reference.value = memory
            reference.attn_mask, reference.key_padding_mask = attn_mask, key_padding_mask
            reference.causal = is_causal
        self._check()

    def _check(self) -> None:
        if self.configured and not isinstance(self.attention.reference, MultiheadAttentionReference):
            # A stand-in (the numerical fallback) calls the module with one input: no masks, no memory.
            raise UnsupportedLayerError(
                f"The attention {self.where!r} is called with masks or a memory, which "
                f"{type(self.attention.reference).__name__} cannot take; only gradscope's MultiheadAttention "
                "reference can, and it does not cover this module's configuration."
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.attention.forward(x)
        self._check()  # the node may have switched to the fallback during its forward
        return self.dropout.forward(y)

    def backward(self, grad: Tensor | None) -> Tensor | None:
        grad_x = self.attention.backward(self.dropout.backward(grad))
        reference = self.attention.reference
        if grad is not None and isinstance(reference, MultiheadAttentionReference) and reference.key is not None:
            # The memory is read twice, as keys and as values: a fork, so its two gradients add up.
            self.grad_memory = add_gradients(reference.grad_key, reference.grad_value)
        return grad_x


def _activation(block: ReferenceLayer, activation: object) -> ModuleCall:
    if isinstance(activation, nn.Module):
        return block.child("activation")
    if activation is F.relu:
        return _Inline(ReLUReference(nn.ReLU(), path=block.path))
    if activation is F.gelu:
        return _Inline(GELUReference(nn.GELU(), path=block.path))
    raise UnsupportedLayerError(
        f"No reference backward for the activation {activation!r} of {type(block.module).__name__} "
        f"{block.path or '(model)'!r}. Use activation='relu' or 'gelu', or pass an nn.Module activation "
        "that has a reference (e.g. nn.GELU(approximate='tanh'))."
    )


def _feed_forward(block: ReferenceLayer, last_dropout: str) -> _Chain:
    return _Chain(
        block.child("linear1"),
        _activation(block, block.module.activation),
        block.child("dropout"),
        block.child("linear2"),
        block.child(last_dropout),
    )


@register_reference(nn.TransformerEncoderLayer)
class TransformerEncoderLayerReference(ReferenceLayer):
    """One encoder block on x ``[N, L, E]`` (``batch_first``) or ``[L, N, E]``.

    A composite may set ``src_mask``, ``src_key_padding_mask`` and ``is_causal`` before the forward,
    as the arguments of ``layer(x, src_mask, src_key_padding_mask, is_causal)``.
    """

    module: nn.TransformerEncoderLayer

    src_mask: Tensor | None = None
    src_key_padding_mask: Tensor | None = None
    is_causal: bool = False

    def forward(self, x: Tensor) -> Tensor:
        """Compute h = x + SA(LN₁(x)), y = h + FF(LN₂(h)) (pre-norm), or the post-norm order."""
        self.attention = _Attention(
            self,
            "self_attn",
            "dropout1",
            attn_mask=self.src_mask,
            key_padding_mask=self.src_key_padding_mask,
            is_causal=self.is_causal,
        )
        self.mlp = _feed_forward(self, "dropout2")
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


@register_reference(nn.TransformerEncoder)
class TransformerEncoderReference(ReferenceLayer):
    """A stack of encoder layers, then the optional final norm; ``mask``, ``src_key_padding_mask``, ``is_causal`` as the module's."""

    module: nn.TransformerEncoder

    mask: Tensor | None = None
    src_key_padding_mask: Tensor | None = None
    is_causal: bool = False

    def forward(self, x: Tensor) -> Tensor:
        """Run ``layers.0`` … ``layers.{n-1}`` and ``norm``, each layer with the stack's masks."""
        nodes = []
        for i in range(len(self.module.layers)):
            node = self.child(f"layers.{i}")
            if isinstance(node.reference, TransformerEncoderLayerReference):
                node.reference.src_mask = self.mask
                node.reference.src_key_padding_mask = self.src_key_padding_mask
                node.reference.is_causal = self.is_causal
            nodes.append(node)
        if self.module.norm is not None:
            nodes.append(self.child("norm"))
        self.stack = _Chain(*nodes)
        return self.stack.forward(x)

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """The backward of a stack is the stack of backwards, last layer first."""
        return self.stack.backward(grad_out), {}


class _DecoderInputs:
    """The inputs a composite sets on a decoder reference before its forward, and its memory gradient.

    Names follow PyTorch's arguments; ``grad_memory`` is read back after the backward.
    """

    memory: Tensor | None = None
    tgt_mask: Tensor | None = None
    memory_mask: Tensor | None = None
    tgt_key_padding_mask: Tensor | None = None
    memory_key_padding_mask: Tensor | None = None
    tgt_is_causal: bool = False
    memory_is_causal: bool = False
    grad_memory: Tensor | None = None


@register_reference(nn.TransformerDecoderLayer)
class TransformerDecoderLayerReference(_DecoderInputs, ReferenceLayer):
    """One decoder block: self-attention on the target x, cross-attention to ``memory``, feed-forward.

    x is the target ``[N, T, E]`` (``batch_first``), ``[T, N, E]`` or ``[T, E]``. The composite that
    calls ``layer(x, memory, ...)`` sets ``memory`` (and any of ``tgt_mask``, ``memory_mask``,
    ``tgt_key_padding_mask``, ``memory_key_padding_mask``, ``tgt_is_causal``, ``memory_is_causal``)
    on this reference before the forward, and reads d loss / d memory from ``grad_memory`` after the
    backward.
    """

    module: nn.TransformerDecoderLayer

    def forward(self, x: Tensor) -> Tensor:
        """Compute the three residual sub-blocks, pre-norm or post-norm."""
        if self.memory is None:
            raise UnsupportedLayerError(
                f"TransformerDecoderLayer {self.path or '(model)'!r} needs its memory input: it is called as "
                "layer(tgt, memory), and the reference pass hands a module one input. Call it from a composite "
                "reference that sets `memory` on the layer's reference (as TransformerDecoder's does)."
            )
        self.self_attention = _Attention(
            self,
            "self_attn",
            "dropout1",
            attn_mask=self.tgt_mask,
            key_padding_mask=self.tgt_key_padding_mask,
            is_causal=self.tgt_is_causal,
        )
        self.cross_attention = _Attention(
            self,
            "multihead_attn",
            "dropout2",
            memory=self.memory,
            attn_mask=self.memory_mask,
            key_padding_mask=self.memory_key_padding_mask,
            is_causal=self.memory_is_causal,
        )
        self.mlp = _feed_forward(self, "dropout3")
        self.norm1, self.norm2, self.norm3 = self.child("norm1"), self.child("norm2"), self.child("norm3")
        if self.module.norm_first:
            h1 = x + self.self_attention.forward(self.norm1.forward(x))
            h2 = h1 + self.cross_attention.forward(self.norm2.forward(h1))
            return h2 + self.mlp.forward(self.norm3.forward(h2))
        h1 = self.norm1.forward(x + self.self_attention.forward(x))
        h2 = self.norm2.forward(h1 + self.cross_attention.forward(h1))
        return self.norm3.forward(h2 + self.mlp.forward(h2))

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """Three residual sums on the way back; the cross-attention also sends a gradient to the memory."""
        if self.module.norm_first:
            grad_h2 = add_gradients(grad_out, self.norm3.backward(self.mlp.backward(grad_out)))
            grad_h1 = add_gradients(grad_h2, self.norm2.backward(self.cross_attention.backward(grad_h2)))
            grad_x = add_gradients(grad_h1, self.norm1.backward(self.self_attention.backward(grad_h1)))
        else:
            grad_h2_sum = self.norm3.backward(grad_out)  # gradient of h₂ + FF(h₂), before LN₃
            grad_h2 = add_gradients(grad_h2_sum, self.mlp.backward(grad_h2_sum))
            grad_h1_sum = self.norm2.backward(grad_h2)
            grad_h1 = add_gradients(grad_h1_sum, self.cross_attention.backward(grad_h1_sum))
            grad_x_sum = self.norm1.backward(grad_h1)
            grad_x = add_gradients(grad_x_sum, self.self_attention.backward(grad_x_sum))
        self.grad_memory = self.cross_attention.grad_memory
        return grad_x, {}


@register_reference(nn.TransformerDecoder)
class TransformerDecoderReference(_DecoderInputs, ReferenceLayer):
    """A stack of decoder layers reading one memory, then the optional final norm.

    Configured like :class:`TransformerDecoderLayerReference` (``memory``, the masks, ``grad_memory``);
    every layer reads the same memory, so ``grad_memory`` is the sum of the layers' memory gradients.
    """

    module: nn.TransformerDecoder

    _settings = (
        "memory",
        "tgt_mask",
        "memory_mask",
        "tgt_key_padding_mask",
        "memory_key_padding_mask",
        "tgt_is_causal",
        "memory_is_causal",
    )

    def forward(self, x: Tensor) -> Tensor:
        """Run every layer on the running target with the same memory and masks, then ``norm``."""
        self.layers = [self.child(f"layers.{i}") for i in range(len(self.module.layers))]
        for node in self.layers:
            if isinstance(node.reference, TransformerDecoderLayerReference):
                for name in self._settings:
                    setattr(node.reference, name, getattr(self, name))
        nodes = list(self.layers) + ([self.child("norm")] if self.module.norm is not None else [])
        self.stack = _Chain(*nodes)
        return self.stack.forward(x)

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """Last layer first; the memory's gradient sums over the layers that read it."""
        grad_x = self.stack.backward(grad_out)
        grad_memory: Tensor | None = None
        for node in self.layers:
            if isinstance(node.reference, TransformerDecoderLayerReference):
                grad_memory = add_gradients(grad_memory, node.reference.grad_memory)
        self.grad_memory = grad_memory
        return grad_x, {}
