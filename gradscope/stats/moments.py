"""The fused pass: a few reductions per gradient from which every built-in statistic follows.

Reading the gradients is the whole cost of monitoring on a CPU and most of it on a GPU, so the
built-in statistics are not computed one by one. Instead each gradient is reduced to *moments*
(sum, sum of squares, min, max, non-zero count, non-finite count) and each weight to its sum of
squares; each built-in statistic (:mod:`gradscope.stats.builtin`) names the moments it needs and
derives its value from them on the host at flush time (:mod:`gradscope.stats.frame`). Moments also
aggregate exactly: a layer's or a shard's moments are sums (or min/max) of its parts, which is what
layer aggregates and distributed reductions need.

Nothing here synchronises with an accelerator. Results land in the device buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = [
    "CORE_MOMENTS",
    "GRAD_MOMENTS",
    "MOMENTS",
    "MOMENT_INDEX",
    "PARAM_MOMENTS",
    "SUM_MOMENTS",
    "MomentPlan",
]

GRAD_MOMENTS = ("sum", "sumsq", "min", "max", "nnz", "nonfinite")
PARAM_MOMENTS = ("psumsq", "dsumsq")
MOMENTS = GRAD_MOMENTS + PARAM_MOMENTS
#: Column of each moment in a ``[..., len(MOMENTS)]`` array: the one definition of the moment index.
MOMENT_INDEX: dict[str, int] = {name: i for i, name in enumerate(MOMENTS)}

#: Moments taken at every recorded step: one pass over the gradients (the sum of squares), plus the
#: non-finite count, which costs nothing while every gradient is finite. The others need a pass
#: each (the weights and the update: three) and are taken on sampled steps (``sample_every``).
CORE_MOMENTS = frozenset({"sumsq", "nonfinite"})

#: How a group's moments follow from its parts (parameters into a layer, shards into a tensor): these
#: add up; ``min`` and ``max`` take the smallest and the largest.
SUM_MOMENTS = ("sum", "sumsq", "nnz", "nonfinite", "psumsq", "dsumsq")


_PLAIN = (Tensor, torch.nn.Parameter)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_of_squares(flat: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``sum(x**2)`` of each 1-D tensor (all of ``dtype``), accumulated in float32 or float64.

    On a CPU, ``torch.dot`` per tensor (BLAS) is both faster than ``_foreach_powsum`` (0.32 against
    0.52 ms over 2.9M floats, 2 threads) and far more accurate (relative error 2e-6 against 1e-4 on
    3M entries). On accelerators the fused multi-tensor ``_foreach_powsum`` (one launch for all) wins.
    """
    if flat and flat[0].device.type == "cpu" and dtype in (torch.float32, torch.float64):
        return [torch.dot(x, x) for x in flat]
    return list(torch._foreach_powsum(list(flat), 2, dtype=_acc_dtype(dtype)))


def _local(t: Tensor) -> Tensor:
    # DTensor (FSDP2, tensor parallel): reduce the local shard; shards are combined at flush.
    if type(t) in _PLAIN:
        return t  # the common case, on every step's path: no failed attribute lookup
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class MomentPlan:
    """Which moments to compute for a set of statistics, and the code that computes them.

    Args:
        moments: moment names to compute (a subset of :data:`MOMENTS`).
        custom: user statistics, ``(grad, param) -> 0-d tensor``, appended as extra columns.
    """

    #: Built-in statistics the plan serves, the custom ones (name -> how they aggregate per layer), and
    #: the built-ins taken on sampled steps only; filled by :meth:`for_statistics`.
    builtin: tuple[str, ...] = ()
    custom_reduce: dict[str, str]
    sampled_stats: tuple[str, ...] = ()

    @classmethod
    def for_statistics(cls, names: Sequence[str]) -> MomentPlan:
        """The plan that computes the registered statistics ``names`` (built-in and custom).

        Each statistic object says what it needs: a built-in its moments, a custom one its function.
        """
        from gradscope.stats.registry import STATISTICS

        stats = [STATISTICS.get(s) for s in names]
        builtin = [s for s in stats if s.builtin]
        custom = [s for s in stats if not s.builtin]
        plan = cls(sorted({m for s in builtin for m in s.moments}), [s.fn for s in custom])
        plan.builtin = tuple(s.name for s in builtin)
        plan.custom_reduce = {s.name: s.reduce for s in custom}
        plan.sampled_stats = tuple(s.name for s in builtin if s.sampled)
        return plan

    def __init__(self, moments: Sequence[str], custom: Sequence[Callable[[Tensor, Tensor], Tensor]] = ()) -> None:
        wanted = set(moments)
        unknown = wanted - set(MOMENTS)
        if unknown:
            raise ValueError(f"Unknown moments {sorted(unknown)}; known: {', '.join(MOMENTS)}.")
        if wanted & {"min", "max"}:
            wanted |= {"min", "max"}  # one pass gives both
        if "nonfinite" in wanted:
            wanted.add("sumsq")  # the finite flag that gates the exact count
        self.moments = frozenset(wanted)
        self.custom = tuple(custom)
        self.custom_reduce = {}
        self.n_cols = len(MOMENTS) + len(self.custom)
        self._needs_grads = bool(self.moments & set(GRAD_MOMENTS)) or bool(self.custom)
        self._nan_cache: dict[tuple[int, torch.device], Tensor] = {}
        #: Custom statistics that failed (index in :attr:`custom` -> reason): NaN from then on.
        self.failed: dict[int, str] = {}

    @property
    def needs_grads(self) -> bool:
        """True when any gradient moment or custom statistic is collected."""
        return self._needs_grads

    def _nan(self, n: int, device: torch.device) -> Tensor:
        key = (n, device)
        if key not in self._nan_cache:
            self._nan_cache[key] = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
        return self._nan_cache[key]

    def grad_moments(self, grads: Sequence[Tensor], params: Sequence[Tensor], *, sampled: bool = True) -> Tensor:
        """Moments of each gradient (and custom statistics), as a ``[len(grads), n_cols]`` float64 tensor.

        The eager path: per-tensor ATen operators (the fused paths are in
        :mod:`gradscope.capture.kernels`). Columns follow :data:`MOMENTS` then the custom statistics;
        moments not in the plan, moments outside :data:`CORE_MOMENTS` when ``sampled`` is False, and
        the parameter moments (filled elsewhere) are NaN. All gradients must be on one device.

        Sparse gradients are measured over their stored values (after ``coalesce()``), the entries
        not stored counting as zeros; complex ones over their real and imaginary parts
        (:func:`real_view`). A custom statistic that fails is NaN here and listed in :attr:`failed`.
        """
        device = grads[0].device
        local = [_local(g) for g in grads]
        block = self.builtin_moments(local, sampled=sampled)
        if not self.custom:
            return block
        return torch.cat([block, self.custom_columns(local, params, device)], dim=1)

    def builtin_moments(self, local: Sequence[Tensor], *, sampled: bool = True) -> Tensor:
        """The ``[len(local), len(MOMENTS)]`` float64 moments of local (not DTensor) gradients, eagerly."""
        wanted = self.wanted(sampled)
        grad_cols = [m for m in GRAD_MOMENTS if m in wanted]
        n = len(local)
        device = local[0].device
        cols: dict[str, Tensor] = {}
        by_kind: dict[Any, list[int]] = {}
        for i, g in enumerate(local):
            kind: Any = g.dtype if g.layout == torch.strided and not g.is_complex() else "special"
            by_kind.setdefault(kind, []).append(i)
        single = len(by_kind) == 1
        parts: dict[str, list[tuple[list[int], Tensor]]] = {m: [] for m in grad_cols if m != "nonfinite"}
        special: list[tuple[list[int], Tensor]] = []
        for kind, idx in by_kind.items():
            if kind == "special":
                special.append((idx, torch.stack([_special_moments(local[i]) for i in idx])))
                continue
            dtype = kind
            gs = [local[i].reshape(-1) for i in idx] if not single else [g.reshape(-1) for g in local]
            acc = _acc_dtype(dtype)
            if "sum" in wanted:
                parts["sum"].append((idx, torch.stack([g.sum(dtype=acc) for g in gs]).to(torch.float64)))
            if "sumsq" in wanted:
                parts["sumsq"].append((idx, torch.stack(sum_of_squares(gs, dtype)).to(torch.float64)))
            if "min" in wanted:
                # aminmax reads the data once for both; never an inf-norm (12x slower on CPU).
                mm = [torch.aminmax(g) if g.numel() else (g.new_zeros(()), g.new_zeros(())) for g in gs]
                parts["min"].append((idx, torch.stack([a for a, _ in mm]).to(torch.float64)))
                parts["max"].append((idx, torch.stack([b for _, b in mm]).to(torch.float64)))
            if "nnz" in wanted:
                parts["nnz"].append((idx, torch.stack([torch.count_nonzero(g) for g in gs]).to(torch.float64)))
        if special:
            # Sparse / complex tensors: every moment of each, in the MOMENTS columns.
            for idx, vals in special:
                for m in grad_cols:
                    parts.setdefault(m, []).append((idx, vals[:, MOMENT_INDEX[m]]))
            single = False
        dense_nf = [i for kind, idx in by_kind.items() if kind != "special" for i in idx]
        for m, pieces in parts.items():
            if single:
                cols[m] = pieces[0][1]
            else:
                out = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
                for idx, vals in pieces:
                    if m == "nonfinite":
                        continue
                    out[torch.tensor(idx, device=device)] = vals
                cols[m] = out
        if "nonfinite" in wanted:
            if special:
                nf = torch.zeros(n, dtype=torch.float64, device=device)
                if dense_nf:
                    sub = [local[i] for i in dense_nf]
                    nf[torch.tensor(dense_nf, device=device)] = self._nonfinite(sub, cols["sumsq"][dense_nf])
                for idx, vals in special:
                    nf[torch.tensor(idx, device=device)] = vals[:, MOMENT_INDEX["nonfinite"]]
                cols["nonfinite"] = nf
            else:
                cols["nonfinite"] = self._nonfinite(local, cols["sumsq"])
        return torch.stack([cols.get(m, self._nan(n, device)) for m in MOMENTS], dim=1)

    def wanted(self, sampled: bool) -> frozenset[str]:
        """The moments taken at a sampled (or, ``sampled=False``, an ordinary) recorded step."""
        return self.moments if sampled else self.moments & CORE_MOMENTS

    def custom_columns(self, local: Sequence[Tensor], params: Sequence[Tensor], device: torch.device) -> Tensor:
        """``[len(local), len(custom)]`` float64: each custom statistic of each gradient.

        A statistic that raises (or returns something that is not one number) is NaN from then on and
        recorded in :attr:`failed` (index -> reason) for the caller to warn about; the others go on.
        """
        columns = []
        n = len(local)
        for k, fn in enumerate(self.custom):
            if k in self.failed:
                columns.append(self._nan(n, device))
                continue
            try:
                # DTensor: the local shard (a custom statistic has no rule to combine shards; the scope says so)
                vals = [fn(gl, _local(p)) for gl, p in zip(local, params)]
                col = torch.stack([torch.as_tensor(v).reshape(()).to(device=device, dtype=torch.float64) for v in vals])
            except Exception as exc:
                self.failed[k] = f"{type(exc).__name__}: {exc}"
                col = self._nan(n, device)
            columns.append(col)
        return torch.stack(columns, dim=1)

    def _nonfinite(self, grads: Sequence[Tensor], sumsq: Tensor) -> Tensor:
        # The sum of squares is finite when every entry is (NaN and Inf propagate into it), so the
        # flag comes free with the core pass. (It also trips when squares overflow, |g| > 1e19 in
        # float32; the exact count below then reports 0.)
        finite = torch.isfinite(sumsq)
        if sumsq.device.type == "cpu":
            # sync point: CPU tensors only; reading a CPU value is a memory load, not a device sync.
            # It lets the exact count (a full extra pass, the costliest moment on a CPU) run only on
            # steps where something is non-finite.
            if bool(finite.all()):
                return torch.zeros_like(sumsq)
        counts = torch.stack([g.numel() - torch.isfinite(g).sum() for g in grads]).to(torch.float64)
        return torch.where(finite, torch.zeros_like(counts), counts)

    @staticmethod
    def param_sumsq(params: Sequence[Tensor]) -> Tensor:
        """Sum of squares of each weight, ``[len(params)]`` float64."""
        local = [_local(p.detach()).reshape(-1) for p in params]
        dtypes = {p.dtype for p in local}
        if len(dtypes) == 1:
            (dtype,) = dtypes
            return torch.stack(sum_of_squares(local, dtype)).to(torch.float64)
        return torch.stack([sum_of_squares([p], p.dtype)[0].to(torch.float64) for p in local])


def real_view(g: Tensor) -> Tensor:
    """A complex tensor as real numbers: its real and imaginary parts side by side (``view_as_real``)."""
    return torch.view_as_real(g.resolve_conj()) if g.is_complex() else g


def _special_moments(g: Tensor) -> Tensor:
    """All gradient moments (``[len(MOMENTS)]`` float64, parameter columns NaN) of a sparse or complex tensor.

    Sparse: the stored values after ``coalesce()``; the entries not stored are zeros, so they add
    nothing to the sums, count as zeros and bound the min and max by 0. Complex: the sum, min and max
    are over the real and imaginary parts taken as real numbers, the sum of squares is
    ``sum(|z|**2)``, and an entry counts as non-zero (non-finite) when either part is.
    """
    numel = g.numel()
    if g.layout != torch.strided:
        vals = g.coalesce().values() if g.layout == torch.sparse_coo else g.values()
        holes = vals.numel() < numel
    else:
        vals, holes = g, False
    flat = vals.reshape(-1)
    parts = real_view(flat).reshape(-1)
    acc = _acc_dtype(parts.dtype)
    out = torch.full((len(MOMENTS),), float("nan"), dtype=torch.float64, device=g.device)
    out[MOMENT_INDEX["sum"]] = parts.sum(dtype=acc).to(torch.float64)
    p = parts.to(acc)
    out[MOMENT_INDEX["sumsq"]] = torch.dot(p, p).to(torch.float64)
    if parts.numel():
        lo, hi = torch.aminmax(parts)
        lo, hi = lo.to(torch.float64), hi.to(torch.float64)
    else:
        lo = hi = torch.zeros((), dtype=torch.float64, device=g.device)
    if holes:
        lo, hi = torch.minimum(lo, lo.new_zeros(())), torch.maximum(hi, hi.new_zeros(()))
    out[MOMENT_INDEX["min"]], out[MOMENT_INDEX["max"]] = lo, hi
    out[MOMENT_INDEX["nnz"]] = torch.count_nonzero(flat).to(torch.float64)
    out[MOMENT_INDEX["nonfinite"]] = (~torch.isfinite(flat)).sum().to(torch.float64)
    return out
