"""Histograms of gradients and weights computed on the device, without a host sync.

TensorBoard's ``add_histogram`` copies the whole tensor to the host and bins it with NumPy: 58x the
step time of GPT-2 on a GPU when done for every gradient (DESIGN section 9). Here each layer (all of
its parameters together) is reduced on the device to a small row of numbers, kept there, and copied
to the host with everything else at the next flush.

Buckets: ``bins`` equal-width buckets between the layer's own minimum and maximum, the convention of
``numpy.histogram(x, bins)``: bucket ``k`` holds ``edges[k] <= x < edges[k + 1]``, the last one also
holds ``x == max``. A constant tensor (a gradient that is exactly zero everywhere...) follows
TensorBoard's own convention for one distinct value (``tensorboard.plugins.histogram.summary_v2``):
every edge equals the value and the last bucket holds every element, so TensorBoard draws a spike at
the value (numpy's ``[v - 0.5, v + 0.5]`` range would be drawn as a flat band one unit wide). Every
value is placed by comparison with the edges written, so the counts are exactly
``numpy.histogram(x, bins=edges)``.

* CPU tensors: ``torch.histogram(x, bins, range=(min, max))``, one pass per tensor; reading ``min``
  and ``max`` of a CPU tensor waits for nothing.
* Accelerators: ``min`` and ``max`` stay device tensors (``torch.histc`` with data-dependent bounds
  would read them on the host: a sync), the edges are computed on the device, values are placed
  with ``torch.bucketize`` and counted with ``torch.histc`` over the integer bucket indices, whose
  bounds are fixed.

A layer whose gradient holds NaN or Inf has no meaningful range; its row is computed anyway (no
branch on device values) and dropped on the host (the non-finite finding reports it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHUNK", "HistogramRows", "histogram_rows", "row_width", "split_row"]

#: Elements binned at once: bounds the temporaries (an int32 and a float32 index per element).
CHUNK = 1 << 22


def row_width(bins: int) -> int:
    """Length of one layer's row: ``bins + 1`` edges, ``bins`` counts, sum, sum of squares."""
    return 2 * bins + 3


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flat_chunks(t: Tensor) -> list[Tensor]:
    flat = t.detach().reshape(-1)
    if flat.numel() <= CHUNK:
        return [flat]
    return list(flat.split(CHUNK))


def _edges(lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """``bins + 1`` increasing edges from ``lo`` to ``hi`` (0-d device tensors), numpy's convention."""
    # A constant tensor (hi == lo) gets bins + 1 equal edges: bucketize places every value in the last bucket.
    steps = torch.arange(bins + 1, device=lo.device, dtype=lo.dtype) / bins
    edges = lo + (hi - lo) * steps
    # Rounding may push the computed end points past the range; clamping keeps the edges monotone
    # and makes the first and last ones exactly the minimum and maximum.
    edges = torch.minimum(torch.maximum(edges, lo), hi)
    edges[0] = lo
    edges[-1] = hi
    return edges


def histogram_rows(groups: Sequence[Sequence[Tensor]], bins: int) -> Tensor:
    """One histogram row per group of tensors, computed where the tensors live, without a device sync.

    Args:
        groups: ``G`` groups (layers); each is a list of tensors of any shape on one device (a layer's
            gradients, or its weights). A group's histogram covers all its tensors' elements.
        bins: number of equal-width buckets.

    Returns:
        ``[G, 2 * bins + 3]`` float64 tensor on the tensors' device; see :func:`split_row`. A group
        holding NaN or Inf, or no element at all, gives a row that is not all finite.
    """
    device = next((t.device for g in groups for t in g), torch.device("cpu"))
    rows = []
    for tensors in groups:
        tensors = [t.detach() for t in tensors if t.numel() > 0]
        if not tensors:  # made where the others live: a host-to-device copy could wait for the device
            rows.append(torch.full((row_width(bins),), float("nan"), dtype=torch.float64, device=device))
        elif tensors[0].device.type == "cpu":
            rows.append(_row_cpu(tensors, bins))
        else:
            rows.append(_row_device(tensors, bins))
    # A model spread over devices: gather on the first one (device to device, no host sync).
    return torch.stack([r.to(device, non_blocking=True) for r in rows])


def _minmax(tensors: Sequence[Tensor], work: torch.dtype) -> tuple[Tensor, Tensor]:
    mins, maxs = [], []
    for t in tensors:
        lo_t, hi_t = torch.aminmax(t)
        mins.append(lo_t)
        maxs.append(hi_t)
    return torch.stack(mins).to(work).min(), torch.stack(maxs).to(work).max()


def _group_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_cpu(tensors: Sequence[Tensor], bins: int) -> Tensor:
    """CPU: ``torch.histogram`` (one pass, exact against the edges it returns) with the layer's range."""
    work = _group_dtype(tensors)
    lo_t, hi_t = _minmax(tensors, work)
    # sync point: CPU tensors only; the values are in host memory already, there is no device to wait for.
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return torch.full((row_width(bins),), float("nan"), dtype=torch.float64)
    counts = torch.zeros(bins, dtype=torch.float64)
    total = torch.zeros(2, dtype=torch.float64)
    if lo == hi:  # one distinct value: TensorBoard's convention, every edge at it, all in the last bucket
        for t in tensors:
            for chunk in _flat_chunks(t):
                x = chunk.to(work)
                total += torch.stack([x.sum(), torch.dot(x, x)]).to(torch.float64)
        counts[-1] = float(sum(t.numel() for t in tensors))
        return torch.cat([torch.full((bins + 1,), lo, dtype=torch.float64), counts, total])
    edges = None
    for t in tensors:
        for chunk in _flat_chunks(t):
            x = chunk.to(work)
            hist, edges = torch.histogram(x, bins=bins, range=(lo, hi))
            counts += hist.to(torch.float64)
            total += torch.stack([x.sum(), torch.dot(x, x)]).to(torch.float64)
    assert edges is not None
    return torch.cat([edges.to(torch.float64), counts, total])


def _row_device(tensors: Sequence[Tensor], bins: int) -> Tensor:
    """Accelerators: edges from device-side min/max, values placed by comparison (``bucketize``)."""
    work = _group_dtype(tensors)
    lo, hi = _minmax(tensors, work)
    edges = _edges(lo, hi, bins)
    counts = torch.zeros(bins, dtype=torch.float64, device=edges.device)
    total = torch.zeros(2, dtype=torch.float64, device=edges.device)
    for t in tensors:
        for chunk in _flat_chunks(t):
            x = chunk.to(work)
            # right=True: index i with edges[i-1] <= x < edges[i]; x == max gives bins + 1.
            idx = torch.bucketize(x, edges, right=True, out_int32=True)
            idx = idx.clamp_(1, bins).sub_(1)
            # Fixed bounds, so histc reads nothing back; indices are exact integers in float32
            # (a chunk has fewer than 2**24 elements).
            counts += torch.histc(idx.to(torch.float32), bins=bins, min=0, max=bins).to(torch.float64)
            total += torch.stack([x.sum(), torch.dot(x, x)]).to(torch.float64)
    return torch.cat([edges.to(torch.float64), counts, total])


class HistogramRows:
    """A host copy of :func:`histogram_rows`'s output, taken apart.

    Attributes:
        edges: ``[G, bins + 1]``.
        counts: ``[G, bins]``.
        sums: ``[G]``; sums of squares: ``sum_squares`` ``[G]``.
        finite: ``[G]``: False where the group held NaN or Inf (its histogram is meaningless).
    """

    def __init__(self, rows: np.ndarray, bins: int) -> None:
        self.edges = rows[:, : bins + 1]
        self.counts = rows[:, bins + 1 : 2 * bins + 1]
        self.sums = rows[:, 2 * bins + 1]
        self.sum_squares = rows[:, 2 * bins + 2]
        self.finite = np.isfinite(rows).all(axis=1)


def split_row(row: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(edges [bins+1], counts [bins], sum, sum_squares)`` of one row of :func:`histogram_rows`."""
    return row[: bins + 1], row[bins + 1 : 2 * bins + 1], float(row[2 * bins + 1]), float(row[2 * bins + 2])
