"""``nn.Embedding``: a table lookup, whose backward scatters gradients back into the looked-up rows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["EmbeddingReference"]


@register_reference(nn.Embedding)
class EmbeddingReference(ReferenceLayer):
    """y = W[i] for integer indices i ``[*]``, y ``[*, embedding_dim]``.

    The lookup selects rows, so dL/dW[r] is the sum of the output gradients at every position that
    looked up row r (an index-add), divided by how often r occurs when ``scale_grad_by_freq`` is set.
    The ``padding_idx`` row gets no gradient. Indices are not differentiable: ``grad_in`` is None.
    """

    module: nn.Embedding

    def forward(self, x: Tensor) -> Tensor:
        """Look up one row of the weight per index."""
        m = self.module
        if m.max_norm is not None:
            raise UnsupportedLayerError(
                f"No reference backward for Embedding {self.path or '(model)'!r} with max_norm={m.max_norm}: "
                "it renormalizes the weight in place during the forward. Use max_norm=None, or "
                "gradscope.verify(..., on_unsupported='finite_difference')."
            )
        self.indices = x
        return m.weight[x]

    def backward(self, grad_out: Tensor) -> tuple[None, ParamGrads]:
        """Index-add each position's gradient into the row it read."""
        m = self.module
        flat = self.indices.reshape(-1)
        rows = grad_out.reshape(-1, m.embedding_dim)
        if m.scale_grad_by_freq:
            counts = torch.bincount(flat, minlength=m.num_embeddings)
            rows = rows / counts[flat].unsqueeze(1).to(rows.dtype)
        grad_weight = torch.zeros_like(m.weight).index_add_(0, flat, rows)
        if m.padding_idx is not None:
            grad_weight[m.padding_idx] = 0
        return None, {"weight": grad_weight}
