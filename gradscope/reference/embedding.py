"""``nn.Embedding`` and ``nn.EmbeddingBag``: table lookups, whose backward scatters gradients back into the rows read.

EmbeddingBag looks up a bag of rows per output and reduces them (sum, mean or max) without forming the
``[*, embedding_dim]`` intermediate: its backward is the lookup's index-add, with each entry's gradient
first passed back through the reduction (times its per-sample weight for sum, divided by the bag size
for mean, only to the winning entry of each coordinate for max).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["EmbeddingBagReference", "EmbeddingReference"]


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


@register_reference(nn.EmbeddingBag)
class EmbeddingBagReference(ReferenceLayer):
    """y[b] = reduce over the bag's entries i of w_i · W[index_i], for bags from 2-d input or from offsets.

    Bags: each row of a 2-d input ``[B, L]``, or ``input[offsets[b] : offsets[b + 1]]`` for a 1-d input
    with ``offsets`` (``include_last_offset`` makes the last offset the end of the last bag). Entries equal
    to ``padding_idx`` are left out of their bag (and of its size for ``mean``); an empty bag gives zeros.
    Local derivatives, per entry i of bag b: sum: dW[index_i] += w_i g[b] and dw_i = ⟨g[b], W[index_i]⟩;
    mean: dW[index_i] += g[b] / |b|; max: per coordinate j, dW[index_i, j] += g[b, j] for the first entry
    attaining the maximum. Within a model, the module is called with its input alone; call
    :meth:`forward` with ``offsets`` and ``per_sample_weights`` directly to reference the other forms, and
    read the gradient of the per-sample weights from :attr:`grad_per_sample_weights` after :meth:`backward`.
    """

    module: nn.EmbeddingBag

    def forward(self, x: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        """Reduce each bag's rows of the weight."""
        m = self.module
        if m.max_norm is not None:
            raise UnsupportedLayerError(
                f"No reference backward for EmbeddingBag {self.path or '(model)'!r} with max_norm={m.max_norm}: "
                "it renormalizes the weight in place during the forward. Use max_norm=None, or "
                "gradscope.verify(..., on_unsupported='finite_difference')."
            )
        if per_sample_weights is not None and m.mode != "sum":
            raise UnsupportedLayerError(
                f"EmbeddingBag {self.path or '(model)'!r}: per_sample_weights needs mode='sum' (PyTorch rejects "
                f"it with mode={m.mode!r})."
            )
        flat = x.reshape(-1)
        if x.dim() == 2:
            bags, length = x.shape
            bag_of = torch.arange(bags, device=x.device).repeat_interleave(length)
        else:
            if offsets is None:
                raise UnsupportedLayerError(
                    f"EmbeddingBag {self.path or '(model)'!r} got a 1-d input without offsets; pass offsets."
                )
            starts = offsets[:-1] if m.include_last_offset else offsets
            bags = starts.numel()
            # Entry i belongs to the last bag whose start is <= i.
            bag_of = torch.searchsorted(starts, torch.arange(flat.numel(), device=x.device), right=True) - 1
            if m.include_last_offset:  # entries past the last offset belong to no bag
                bag_of = torch.where(torch.arange(flat.numel(), device=x.device) < offsets[-1], bag_of, -1)
        keep = bag_of >= 0
        if m.padding_idx is not None:
            keep = keep & (flat != m.padding_idx)
        self.flat, self.bag_of, self.keep, self.bags = flat[keep], bag_of[keep], keep, bags
        self.entry_weight = per_sample_weights.reshape(-1)[keep] if per_sample_weights is not None else None
        self.psw_shape = per_sample_weights.shape if per_sample_weights is not None else None
        rows = m.weight[self.flat]  # [entries, dim]
        out = torch.zeros(bags, m.embedding_dim, dtype=m.weight.dtype, device=m.weight.device)
        self.counts = torch.bincount(self.bag_of, minlength=bags).to(m.weight.dtype)
        if m.mode == "max":
            # Entries in bag order, so the first maximum is the first entry attaining it.
            out = out.fill_(-torch.inf).scatter_reduce(0, self.bag_of[:, None].expand_as(rows), rows, "amax")
            out = torch.where(self.counts[:, None] > 0, out, torch.zeros_like(out))
            winners = torch.full((bags, m.embedding_dim), flat.numel(), dtype=torch.long, device=x.device)
            position = torch.arange(rows.shape[0], device=x.device)[:, None].expand_as(rows)
            candidate = torch.where(rows == out[self.bag_of], position, flat.numel())
            self.winner = winners.scatter_reduce(0, self.bag_of[:, None].expand_as(rows), candidate, "amin")
            return out
        if self.entry_weight is not None:
            rows = rows * self.entry_weight[:, None]
        out = out.index_add(0, self.bag_of, rows)
        if m.mode == "mean":
            out = out / torch.clamp(self.counts, min=1)[:, None]
        return out

    def backward(self, grad_out: Tensor) -> tuple[None, ParamGrads]:
        """Pass each bag's gradient back to its entries, then index-add the entries into their rows."""
        m = self.module
        if m.mode == "max":
            has_winner = self.winner < self.flat.numel()
            bag, dim = torch.nonzero(has_winner, as_tuple=True)
            rows_read = self.flat[self.winner[bag, dim]]
            grad_weight = torch.zeros_like(m.weight).index_put_((rows_read, dim), grad_out[bag, dim], accumulate=True)
            return None, {"weight": grad_weight}
        entry_grad = grad_out[self.bag_of]  # [entries, dim]
        if m.mode == "mean":
            entry_grad = entry_grad / self.counts[self.bag_of][:, None]
        if self.psw_shape is not None:
            assert self.entry_weight is not None
            grad_psw = torch.zeros(self.keep.numel(), dtype=grad_out.dtype, device=grad_out.device)
            grad_psw[self.keep] = (entry_grad * m.weight[self.flat]).sum(1)
            self.grad_per_sample_weights: Tensor | None = grad_psw.reshape(self.psw_shape)
            entry_grad = entry_grad * self.entry_weight[:, None]
        if m.scale_grad_by_freq:
            counts = torch.bincount(self.flat, minlength=m.num_embeddings)
            entry_grad = entry_grad / counts[self.flat][:, None].to(entry_grad.dtype)
        return None, {"weight": torch.zeros_like(m.weight).index_add_(0, self.flat, entry_grad)}
