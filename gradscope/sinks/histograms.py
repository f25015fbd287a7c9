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

* CPU tensors, with the compiled kernel (:func:`gradscope.capture.kernels.cpu_histogram_kernel`,
  when this machine has it built): one call for every layer, two reads of each tensor, edges
  ``lo + (hi - lo) * k / bins`` in float64 and every value placed among them by comparison. A model
  of many small layers spent its histogram step in per-operation overhead: 129 layers of gradients
  and weights took 13.7 ms of operators.
* CPU tensors otherwise (no kernel built, or a view with gaps between its entries):
  ``torch.histogram(x, bins, range=(min, max))``, one pass per layer (per chunk of a large
  tensor); reading ``min`` and ``max`` of a CPU tensor waits for nothing, so every layer's are read
  at once, and the rows of all layers are assembled together (:func:`_rows_cpu`: the values of the
  per-layer :func:`_row_cpu`, with a few operations per tensor instead of some twenty per layer).
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

from gradscope.capture.kernels import cpu_histogram_kernel

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
    kept = [[t.detach() for t in tensors if t.numel() > 0] for tensors in groups]
    on_cpu = [i for i, tensors in enumerate(kept) if tensors and tensors[0].device.type == "cpu"]
    cpu_rows = dict(zip(on_cpu, _rows_cpu_any([kept[i] for i in on_cpu], bins).unbind())) if on_cpu else {}
    rows = []
    for i, tensors in enumerate(kept):
        if not tensors:  # made where the others live: a host-to-device copy could wait for the device
            rows.append(torch.full((row_width(bins),), float("nan"), dtype=torch.float64, device=device))
        elif i in cpu_rows:
            rows.append(cpu_rows[i])
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


def _rows_cpu_any(groups: Sequence[Sequence[Tensor]], bins: int) -> Tensor:
    """The CPU groups' rows: with the compiled kernel when it is built and takes these tensors, else :func:`_rows_cpu`."""
    kernel = cpu_histogram_kernel()
    if kernel is not None:
        flat = [t for tensors in groups for t in tensors]
        ends = np.cumsum([len(tensors) for tensors in groups]).tolist()
        out = torch.empty((len(groups), row_width(bins)), dtype=torch.float64)
        try:
            kernel(flat, ends, bins, out)
            return out
        except (RuntimeError, TypeError, ValueError):  # checked before anything is written
            pass  # a view with gaps between its entries: the operator path below
    return _rows_cpu(groups, bins)


def _rows_cpu(groups: Sequence[Sequence[Tensor]], bins: int) -> Tensor:
    """:func:`_row_cpu` of every group, with the same values, in a few operations per tensor.

    A model of many small layers spends its histogram time in per-operation overhead, not in
    binning; here every minimum and maximum is read in one host copy, the counts of all chunks are
    added in one ``index_add_`` (exact: they are integers), the sums in Python floats in the order
    :func:`_row_cpu` adds them, and the rows are assembled as one tensor, so that row ``g`` equals
    ``_row_cpu(groups[g], bins)``.

    Args:
        groups: ``G`` non-empty groups of non-empty CPU tensors.
        bins: number of equal-width buckets.

    Returns:
        ``[G, 2 * bins + 3]`` float64.
    """
    flat = [t for tensors in groups for t in tensors]
    # Each tensor's min and max (torch.stack promotes mixed dtypes to one that holds every value
    # exactly), as float64: the group's min/max equal those _row_cpu takes in its working dtype.
    # sync point: CPU tensors only; the values are in host memory already, there is no device to wait for.
    pairs = torch.stack([v for t in flat for v in torch.aminmax(t)]).to(torch.float64).tolist()
    out = torch.full((len(groups), row_width(bins)), float("nan"), dtype=torch.float64)
    hists: list[Tensor] = []  # counts of each binned chunk, and the group it belongs to
    hist_group: list[int] = []
    edges: list[Tensor] = []  # edges of each binned group, and which
    edges_group: list[int] = []
    chunk_sums: list[Tensor] = []  # per chunk, in the working dtype
    chunk_squares: list[Tensor] = []
    finite: list[tuple[int, int]] = []  # (group, number of chunks) of the groups with a row
    constant: list[tuple[int, float, int]] = []  # (group, value, numel) of the one-value groups
    k = 0
    for g, tensors in enumerate(groups):
        ext = pairs[2 * k : 2 * (k + len(tensors))]
        k += len(tensors)
        if not all(math.isfinite(v) for v in ext):
            continue  # NaN or Inf: the row stays NaN
        lo, hi = min(ext[0::2]), max(ext[1::2])
        work = _group_dtype(tensors)
        chunks = [c if c.dtype == work else c.to(work) for t in tensors for c in _flat_chunks(t)]
        for x in chunks:
            chunk_sums.append(x.sum())
            chunk_squares.append(torch.dot(x, x))
        finite.append((g, len(chunks)))
        if lo == hi:  # one distinct value: TensorBoard's convention, every edge at it, all in the last bucket
            constant.append((g, lo, sum(t.numel() for t in tensors)))
            continue
        # Placement depends on each element and the range alone, so small tensors of a layer are
        # binned together: one call instead of one per tensor, the same counts.
        binned = [torch.cat(chunks)] if 1 < len(chunks) and sum(x.numel() for x in chunks) <= CHUNK else chunks
        for x in binned:
            hist, group_edges = torch.histogram(x, bins=bins, range=(lo, hi))
            hists.append(hist)
            hist_group.append(g)
        edges.append(group_edges)
        edges_group.append(g)
    if not finite:
        return out
    counts = torch.zeros(len(groups), bins, dtype=torch.float64)
    if hists:
        counts.index_add_(0, torch.tensor(hist_group), torch.stack(hists).to(torch.float64))
        out[edges_group, : bins + 1] = torch.stack(edges).to(torch.float64)
    for g, value, numel in constant:
        out[g, : bins + 1] = value
        counts[g, -1] = float(numel)
    # sync point: CPU tensors only, as above; one read of every chunk's sum and sum of squares.
    sums, squares = torch.stack([torch.stack(chunk_sums), torch.stack(chunk_squares)]).to(torch.float64).tolist()
    totals: list[list[float]] = []
    m = 0
    for _, n_chunks in finite:
        total, square = 0.0, 0.0
        for i in range(m, m + n_chunks):  # float64 additions in _row_cpu's order
            total += sums[i]
            square += squares[i]
        m += n_chunks
        totals.append([total, square])
    rows = [g for g, _ in finite]
    out[rows, bins + 1 : 2 * bins + 1] = counts[rows]
    out[rows, 2 * bins + 1 :] = torch.tensor(totals, dtype=torch.float64)
    return out


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
