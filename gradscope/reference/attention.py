"""Attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``, masked, causal or cross.

Scaled dot-product attention of queries q ``[…, L, d]`` over keys k and values v ``[…, S, d]``:

    s = q kᵀ · scale + bias     [L, S] scores; bias is 0, -∞ where masked, or a float mask
    a = softmax(s)              along the key axis (a row with every key masked gets a = 0)
    o = a v                     [L, d]

and its backward: ``o = a v`` is a matrix product (da = g vᵀ, dv = aᵀ g), the softmax backward is
a ⊙ (da - Σ da ⊙ a) per row, and s = q kᵀ · scale gives dq = ds k · scale and dk = dsᵀ q · scale. A
masked score gets a = 0 and so no gradient: a mask changes which paths exist, never the rules.

``nn.MultiheadAttention`` wraps this in projections. With E = embed_dim and H heads of size d = E/H:

    q, k, v = query W_qᵀ + b_q, key W_kᵀ + b_k, value W_vᵀ + b_v   (packed in in_proj_weight, or
                                                                   q/k/v_proj_weight with kdim, vdim)
    o = attention(q, k, v) per head, heads concatenated back to E
    y = o W_oᵀ + b_o                                               out_proj

In self-attention query, key and value are one tensor x, so x reaches the loss along three paths and
its gradient is the sum of the three. In cross-attention (a decoder reading the encoder's memory),
key and value come from elsewhere, and their gradients go back to where they came from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.activations import softmax_backward
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = [
    "MultiheadAttentionReference",
    "ScaledDotProductAttentionReference",
    "SelfAttention",
    "SelfAttentionReference",
]


def _seq_len(x: Tensor, batch_first: bool) -> int:
    return x.shape[0] if x.dim() == 2 or not batch_first else x.shape[1]


class ScaledDotProductAttentionReference:
    """``F.scaled_dot_product_attention`` by hand: :meth:`forward` with its arguments, then :meth:`backward`.

    A function has no module, so this is not a registered layer: composite references (multi-head
    attention here, or a model's own attention block) compute their q, k and v and call it.
    Supported: ``attn_mask`` (bool, True = may attend, or float, added to the scores; broadcast over
    the leading dimensions), ``is_causal`` (top-left aligned, as PyTorch), ``scale`` and ``enable_gqa``;
    ``dropout_p`` must be 0 (its mask is drawn inside the function and cannot be recorded).
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        """Compute ``F.scaled_dot_product_attention(query, key, value, ...)``, keeping q, k, v and a."""
        if dropout_p > 0:
            raise UnsupportedLayerError(
                f"No reference for scaled_dot_product_attention with dropout_p={dropout_p}: its random mask "
                "is drawn inside the function and cannot be recorded. Pass dropout_p=0 (the model in eval mode)."
            )
        if is_causal and attn_mask is not None:
            raise ValueError("scaled_dot_product_attention takes attn_mask or is_causal=True, not both (as PyTorch).")
        length, keys = query.shape[-2], key.shape[-2]
        self.scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        self.groups = query.shape[-3] // key.shape[-3] if enable_gqa else 1
        # Grouped-query attention: each key/value head serves `groups` consecutive query heads.
        k = key.repeat_interleave(self.groups, dim=-3) if self.groups > 1 else key
        v = value.repeat_interleave(self.groups, dim=-3) if self.groups > 1 else value
        self.q, self.k, self.v = query, k, v
        scores = query @ k.transpose(-2, -1) * self.scale
        if is_causal:  # position i sees keys 0..i (top-left aligned when L != S)
            attn_mask = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # exp(-∞) = 0: no weight, and so no gradient, where masked
                scores = scores.masked_fill(~attn_mask, -math.inf)
            else:
                scores = scores + attn_mask
        self.attn = masked_softmax(scores)
        return self.attn @ v

    def backward(self, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return (dq, dk, dv) from d loss / d output."""
        grad_attn = grad_out @ self.v.transpose(-2, -1)  # o = a v  =>  da = do vᵀ
        grad_v = self.attn.transpose(-2, -1) @ grad_out  # and dv = aᵀ do
        grad_scores = softmax_backward(self.attn, grad_attn, -1)
        grad_q = grad_scores @ self.k * self.scale  # s = q kᵀ · scale
        grad_k = grad_scores.transpose(-2, -1) @ self.q * self.scale
        if self.groups > 1:  # a shared key/value head sums the gradients of the query heads it served
            grad_k, grad_v = (
                t.unflatten(-3, (t.shape[-3] // self.groups, self.groups)).sum(-3) for t in (grad_k, grad_v)
            )
        return grad_q, grad_k, grad_v


def masked_softmax(scores: Tensor) -> Tensor:
    """Softmax along the last axis; a row whose scores are all -∞ gets weights 0 (as PyTorch's attention)."""
    top = scores.amax(-1, keepdim=True)
    empty = top == -math.inf
    e = torch.exp(scores - torch.where(empty, torch.zeros_like(top), top))  # shift by the max: no overflow
    total = e.sum(-1, keepdim=True)
    return e / torch.where(empty, torch.ones_like(total), total)


class SelfAttention(nn.Module):
    """Self-attention as a one-input module, so it can sit in ``nn.Sequential`` and ``Residual`` blocks.

    Wraps ``nn.MultiheadAttention`` (as ``self.attention``) and calls it as ``attention(x, x, x)``, with a
    causal mask when ``causal=True`` (position i attends to positions ≤ i, as in a GPT block). A
    standard pre-norm block is then
    ``Residual(nn.Sequential(nn.LayerNorm(d), SelfAttention(d, heads, causal=True)))`` followed by
    ``Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)))``.

    Args:
        embed_dim: E, the width of x.
        num_heads: H; E must be divisible by H.
        causal: mask attention to later positions.
        bias: projection biases.
        batch_first: x is ``[N, L, E]`` (default) rather than ``[L, N, E]``; ``[L, E]`` is always accepted.
        dropout: attention dropout (the reference covers it in eval mode only).

    Shape:
        x: ``[N, L, E]`` (``batch_first``), ``[L, N, E]`` or ``[L, E]``; y: the same.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=batch_first
        )
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = attention(x, x, x), causally masked when ``causal``."""
        mask = None
        if self.causal:
            length = _seq_len(x, self.attention.batch_first)
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # True: may not attend
        return self.attention(x, x, x, attn_mask=mask, need_weights=False, is_causal=self.causal)[0]


@register_reference(nn.MultiheadAttention)
class MultiheadAttentionReference(ReferenceLayer):
    """``mha(query, key, value, ...)[0]``; query ``[N, L, E]`` (``batch_first``), ``[L, N, E]`` or ``[L, E]``.

    Walked as a node, the module receives one input, the query, and attends to itself. A composite
    reference that calls the module otherwise configures this reference (``node.reference``) before
    its forward, as PyTorch's call would: ``key`` and ``value`` for cross-attention (``None`` means the
    query itself), ``attn_mask`` ([L, S] or [N·H, L, S]; bool True = may *not* attend, or float, added),
    ``key_padding_mask`` ([N, S]; bool True = ignore that key, or float), ``causal`` (a causal mask when
    ``attn_mask`` is not given). After the backward, ``grad_key`` and ``grad_value`` hold d loss / d key
    and d loss / d value (``None`` where that input is the query, whose gradient already counts it).

    Supported: packed or separate (kdim, vdim) projections, with or without bias, no
    ``add_bias_kv`` / ``add_zero_attn``, and attention dropout only in eval mode or with p = 0 (the
    dropout inside ``F.multi_head_attention_forward`` has no module whose mask could be recorded). A
    query row whose keys are all masked gets a zero attention output, as PyTorch's ``need_weights=False``
    path (the one transformer layers use) computes it.
    """

    module: nn.MultiheadAttention

    key: Tensor | None = None
    value: Tensor | None = None
    attn_mask: Tensor | None = None
    key_padding_mask: Tensor | None = None
    causal: bool = False

    def forward(self, x: Tensor) -> Tensor:
        """Multi-head attention of the query ``x`` over ``key`` and ``value`` (``x`` itself by default)."""
        m = self.module
        self._check_supported()
        self.layout = "unbatched" if x.dim() == 2 else ("batch_first" if m.batch_first else "seq_first")
        key = x if self.key is None else self.key
        value = key if self.value is None and self.key is not None else (x if self.value is None else self.value)
        # Which of the three inputs are the query itself: their gradients are summed into the query's.
        self.key_is_query, self.value_is_query = key is x, value is x
        xq, xk, xv = (self._to_batch(t) for t in (x, key, value))  # [N, L, E], [N, S, kdim], [N, S, vdim]
        self.inputs = (xq, xk, xv)
        n, length, embed = xq.shape
        keys = xk.shape[1]
        heads, self.head_dim = m.num_heads, embed // m.num_heads

        projected = []
        for t, w, b in zip(self.inputs, self._projections(), self._biases()):
            p = t @ w.T
            if b is not None:
                p = p + b
            projected.append(p.reshape(n, -1, heads, self.head_dim).transpose(1, 2))  # [N, H, ·, d]
        self.core = ScaledDotProductAttentionReference()
        q, k, v = projected
        o = self.core.forward(q, k, v, attn_mask=self._merged_mask(n, length, keys, x))
        self.o = o.transpose(1, 2).reshape(n, length, embed)  # heads side by side again

        y = self.o @ m.out_proj.weight.T
        if m.out_proj.bias is not None:
            y = y + m.out_proj.bias
        return self._from_batch(y)

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Retrace out_proj, attention, and the q, k, v projections; q, k, v of one tensor add up."""
        m = self.module
        g = self._to_batch(grad_out)
        n, length, embed = g.shape
        grads: ParamGrads = {"out_proj.weight": g.reshape(-1, embed).T @ self.o.reshape(-1, embed)}
        if m.out_proj.bias is not None:
            grads["out_proj.bias"] = g.sum((0, 1))

        grad_o = (g @ m.out_proj.weight).reshape(n, length, m.num_heads, self.head_dim).transpose(1, 2)
        grad_heads = self.core.backward(grad_o)  # dq, dk, dv: [N, H, ·, d]
        grad_proj = [t.transpose(1, 2).reshape(n, -1, embed) for t in grad_heads]  # [N, ·, E] each
        weight_grads = [gp.reshape(-1, embed).T @ t.reshape(-1, t.shape[-1]) for gp, t in zip(grad_proj, self.inputs)]
        if m._qkv_same_embed_dim:
            grads["in_proj_weight"] = torch.cat(weight_grads)
        else:
            for name, grad in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), weight_grads):
                grads[name] = grad
        if m.in_proj_bias is not None:
            grads["in_proj_bias"] = torch.cat([gp.sum((0, 1)) for gp in grad_proj])

        grad_q, grad_k, grad_v = (gp @ w for gp, w in zip(grad_proj, self._projections()))
        # A fork becomes a sum: a tensor read as query and as key (and value) gets every path's gradient.
        if self.key_is_query:
            grad_q = grad_q + grad_k
        if self.value_is_query:
            grad_q = grad_q + grad_v
        self.grad_key = None if self.key_is_query else self._from_batch(grad_k)
        self.grad_value = None if self.value_is_query else self._from_batch(grad_v)
        return self._from_batch(grad_q), grads

    # --- helpers -------------------------------------------------------------------------------------

    def _to_batch(self, t: Tensor) -> Tensor:
        return {"unbatched": t.unsqueeze(0), "batch_first": t, "seq_first": t.transpose(0, 1)}[self.layout]

    def _from_batch(self, t: Tensor) -> Tensor:
        return {"unbatched": t.squeeze(0), "batch_first": t, "seq_first": t.transpose(0, 1)}[self.layout]

    def _projections(self) -> tuple[Tensor, Tensor, Tensor]:
        m = self.module
        if m._qkv_same_embed_dim:
            w_q, w_k, w_v = m.in_proj_weight.chunk(3)
            return w_q, w_k, w_v
        return m.q_proj_weight, m.k_proj_weight, m.v_proj_weight

    def _biases(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        bias = self.module.in_proj_bias
        if bias is None:
            return None, None, None
        b_q, b_k, b_v = bias.chunk(3)
        return b_q, b_k, b_v

    def _merged_mask(self, n: int, length: int, keys: int, x: Tensor) -> Tensor | None:
        """attn_mask and key_padding_mask as one additive float mask [N, H | 1, L, S] (-∞ = may not attend)."""
        heads = self.module.num_heads
        mask = self.attn_mask
        if mask is None and self.causal:
            mask = torch.ones(length, keys, dtype=torch.bool, device=x.device).triu(1)
        merged: Tensor | None = None
        if mask is not None:
            merged = _additive(mask, x.dtype)
            if merged.dim() == 3:  # [N·H, L, S]: one mask per (sample, head)
                merged = merged.reshape(n, heads, length, keys)
        if self.key_padding_mask is not None:
            padding = _additive(self.key_padding_mask, x.dtype).reshape(n, 1, 1, keys)
            merged = padding if merged is None else merged + padding
        return merged

    def _check_supported(self) -> None:
        m = self.module
        problem = None
        if m.bias_k is not None or m.add_zero_attn:
            problem = "add_bias_kv=True or add_zero_attn=True"
        elif m.training and m.dropout > 0:
            problem = f"attention dropout p={m.dropout} in training mode (its random mask cannot be recorded)"
        if problem is not None:
            raise UnsupportedLayerError(
                f"No reference backward for MultiheadAttention {self.path or '(model)'!r} with {problem}. "
                "The reference covers attention without extra key/value biases; call model.eval() for dropout, "
                "or use gradscope.verify(..., on_unsupported='finite_difference') to check it numerically."
            )


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = masked) as 0 / -∞, a float mask as it is (PyTorch adds it to the scores)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


@register_reference(SelfAttention)
class SelfAttentionReference(ReferenceLayer):
    """The wrapped attention's reference, told whether the mask is causal; its gradients are recorded under ``attention``."""

    module: SelfAttention

    def forward(self, x: Tensor) -> Tensor:
        """Run ``attention``'s reference as self-attention."""
        self.attention = self.child("attention")
        if isinstance(self.attention.reference, MultiheadAttentionReference):
            self.attention.reference.causal = self.module.causal
        return self.attention.forward(x)

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """All parameters live in ``attention``, whose node records them."""
        return self.attention.backward(grad_out), {}
