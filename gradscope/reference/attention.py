"""``nn.MultiheadAttention`` as self-attention: the block that BackPACK and Cockpit cannot follow.

Walked as a node, the module computes ``mha(x, x, x, need_weights=False)[0]`` (how transformer blocks
call it). With E = embed_dim, H heads of size d = E/H, and per head:

    q, k, v = x W_qᵀ + b_q, x W_kᵀ + b_k, x W_vᵀ + b_v      (one packed [3E, E] in_proj_weight)
    s = q kᵀ / √d           [L, L] scores (with -∞ above the diagonal when causal)
    a = softmax(s)          along the key axis
    o = a v                 [L, d]; heads concatenated back to [L, E]
    y = o W_oᵀ + b_o        out_proj

The backward retraces these lines bottom-up: out_proj is a linear layer, ``o = a v`` is a matrix
product (da = g vᵀ, dv = aᵀ g), the softmax backward is y ⊙ (g - Σ g y) per row, and s = q kᵀ/√d
gives dq = ds k/√d and dk = dsᵀ q/√d. q, k and v all come from x, so dx sums the three paths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.activations import softmax_backward
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["MultiheadAttentionReference", "SelfAttention", "SelfAttentionReference"]


def _seq_len(x: Tensor, batch_first: bool) -> int:
    return x.shape[0] if x.dim() == 2 or not batch_first else x.shape[1]


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
    """Self-attention without masks; x ``[N, L, E]`` (``batch_first``), ``[L, N, E]`` or unbatched ``[L, E]``.

    Supported: packed projections (kdim = vdim = embed_dim), with or without bias, no
    ``add_bias_kv`` / ``add_zero_attn``, and attention dropout only in eval mode or with p = 0 (the
    dropout inside ``F.multi_head_attention_forward`` has no module whose mask could be recorded).
    A composite reference that calls the module with a causal mask sets ``causal = True`` on this
    reference (``node.reference``) before its forward, as :class:`SelfAttentionReference` does.
    """

    module: nn.MultiheadAttention

    causal: bool = False

    def forward(self, x: Tensor) -> Tensor:
        """Multi-head self-attention of ``x`` with itself."""
        m = self.module
        self._check_supported()
        self.layout = "unbatched" if x.dim() == 2 else ("batch_first" if m.batch_first else "seq_first")
        xb = {"unbatched": x.unsqueeze(0), "batch_first": x, "seq_first": x.transpose(0, 1)}[self.layout]
        self.x = xb  # [N, L, E]
        n, length, embed = xb.shape
        heads, self.head_dim = m.num_heads, embed // m.num_heads

        qkv = xb @ m.in_proj_weight.T
        if m.in_proj_bias is not None:
            qkv = qkv + m.in_proj_bias
        q, k, v = (t.reshape(n, length, heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        self.q, self.k, self.v = q, k, v  # [N, H, L, d]

        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # [N, H, L, L]
        if self.causal:  # exp(-∞) = 0: no weight, and so no gradient, on later positions
            later = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(later, -math.inf)
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        self.attn = e / e.sum(-1, keepdim=True)
        self.o = (self.attn @ v).transpose(1, 2).reshape(n, length, embed)  # heads side by side again

        y = self.o @ m.out_proj.weight.T
        if m.out_proj.bias is not None:
            y = y + m.out_proj.bias
        return {"unbatched": y.squeeze(0), "batch_first": y, "seq_first": y.transpose(0, 1)}[self.layout]

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """Retrace out_proj, a·v, softmax, q·kᵀ and the packed input projection."""
        m = self.module
        g = {"unbatched": grad_out.unsqueeze(0), "batch_first": grad_out, "seq_first": grad_out.transpose(0, 1)}[
            self.layout
        ]
        n, length, embed = g.shape
        heads, scale = m.num_heads, 1.0 / math.sqrt(self.head_dim)
        grads: ParamGrads = {"out_proj.weight": g.reshape(-1, embed).T @ self.o.reshape(-1, embed)}
        if m.out_proj.bias is not None:
            grads["out_proj.bias"] = g.sum((0, 1))

        grad_o = (g @ m.out_proj.weight).reshape(n, length, heads, self.head_dim).transpose(1, 2)  # [N, H, L, d]
        grad_attn = grad_o @ self.v.transpose(-2, -1)  # o = a v  =>  da = do vᵀ
        grad_v = self.attn.transpose(-2, -1) @ grad_o  # and dv = aᵀ do
        grad_scores = softmax_backward(self.attn, grad_attn, -1)
        grad_q = grad_scores @ self.k * scale  # s = q kᵀ / √d
        grad_k = grad_scores.transpose(-2, -1) @ self.q * scale

        grad_qkv = torch.cat([t.transpose(1, 2).reshape(n, length, embed) for t in (grad_q, grad_k, grad_v)], dim=-1)
        flat = grad_qkv.reshape(-1, 3 * embed)
        grads["in_proj_weight"] = flat.T @ self.x.reshape(-1, embed)
        if m.in_proj_bias is not None:
            grads["in_proj_bias"] = flat.sum(0)
        grad_x = grad_qkv @ m.in_proj_weight  # q, k and v all read x: the three paths add up here
        return {"unbatched": grad_x.squeeze(0), "batch_first": grad_x, "seq_first": grad_x.transpose(0, 1)}[
            self.layout
        ], grads

    def _check_supported(self) -> None:
        m = self.module
        problem = None
        if not m._qkv_same_embed_dim:
            problem = "separate kdim/vdim projections"
        elif m.bias_k is not None or m.add_zero_attn:
            problem = "add_bias_kv=True or add_zero_attn=True"
        elif m.training and m.dropout > 0:
            problem = f"attention dropout p={m.dropout} in training mode (its random mask cannot be recorded)"
        if problem is not None:
            raise UnsupportedLayerError(
                f"No reference backward for MultiheadAttention {self.path or '(model)'!r} with {problem}. "
                "The reference covers packed self-attention; call model.eval() for dropout, or use "
                "gradscope.verify(..., on_unsupported='finite_difference') to check it numerically."
            )


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
