"""Distributed runs: which rank writes, and how rank-local moments become the global statistics.

* **DDP** (``DistributedDataParallel``): the gradients are all-reduced before ``optimizer.step()``, so
  every rank already holds the moments of the global gradient. Nothing of the gradients is reduced.
* **FSDP2 / DTensor** (``fully_shard``, tensor parallel): each rank's moments are those of its local
  shard (:func:`gradscope.stats.moments._local`). At each flush they are combined across the shard
  group on the device buffer, before the one device-to-host copy: sums for ``sum``, ``sumsq``,
  ``nnz``, ``nonfinite``, ``psumsq``, ``dsumsq`` (a layer's squared norm is the sum of its shards'),
  min and max for ``min`` and ``max``. Never a shard's norm.
* **Scalars** passed to ``scope.step`` (the loss) are averaged over the ranks that passed them: with
  equal per-rank batches that is the loss of the global batch. **Activation statistics** (each rank
  sees its own batch) are averaged over ranks too: exact for ``act_zero_fraction`` and
  ``act_saturated_fraction`` with equal batches; ``act_dead_fraction`` becomes the mean over ranks of
  the fraction of units dead on that rank's batch (a unit dead on the global batch is dead on every
  rank's, so this is an upper bound of the global figure). Every rank's rules so see the same
  numbers, and findings are identical on all ranks.
* Only rank 0 writes (TensorBoard, sinks, the JSON report); the other ranks keep the same report in
  memory.

Collectives per flush: one ``MIN`` (a fingerprint of the scalar names, and the shards' min / -max)
and one ``SUM`` (scalars with their counts, and the shards' summed moments) when the shard group is
the whole world; a run with several shard groups adds one pair per group. Flushes happen at the same
``scope.step()`` counts on every rank, so they line up; ``scope.flush()`` and ``scope.close()`` are
collective, ``scope.report()`` is not (it returns what the last flush reduced).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradscope.stats.moments import MOMENT_INDEX, MOMENTS, SUM_MOMENTS

__all__ = ["MODES", "SUM_MOMENTS", "DistributedContext", "rank_and_world"]

#: ``watch(distributed=...)``: "auto" reduces across ranks when torch.distributed is initialised
#: with more than one rank; "local" makes every rank an independent scope (no collectives; DTensor
#: statistics are then those of the local shard, and every rank writes its own outputs).
MODES = ("auto", "local")

_M = MOMENT_INDEX
_SUM_COLS = [_M[m] for m in SUM_MOMENTS]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _names_fingerprint(names: Sequence[str]) -> float:
    # crc32 fits a float64 exactly; equal on every rank iff (almost surely) the name lists are equal.
    return float(zlib.crc32("\x1f".join(names).encode("utf-8")))


@dataclass
class _ShardSet:
    """Parameters sharded over the same process groups (one per mesh dimension with a Shard placement)."""

    members: list[int]
    groups: tuple[Any, ...]
    ranks: tuple[tuple[int, ...], ...]
    empty: list[bool]  # local shard holds no element: its min / max must not count
    index: Tensor | None = None
    empty_mask: Tensor | None = None


class DistributedContext:
    """Rank, world size and the reductions one scope needs; built by :meth:`detect`.

    Attributes:
        rank: this process's rank in the default group (0 without torch.distributed).
        world_size: number of ranks (1 without torch.distributed).
        active: True when statistics are reduced across ranks (``mode="auto"`` and ``world_size > 1``).
        notes: problems found when detecting (DTensor placements that cannot be reduced).
    """

    def __init__(self, *, rank: int, world_size: int, active: bool, shard_sets: list[_ShardSet], notes: list[str]):
        self.rank = rank
        self.world_size = world_size
        self.active = active
        self.shard_sets = shard_sets
        self.notes = notes
        self.collectives = 0  # issued so far (reported in meta; the tests count them)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def detect(cls, tensors: Sequence[Tensor], mode: str = "auto") -> DistributedContext:
        """Inspect torch.distributed and the watched parameters.

        Args:
            tensors: the watched parameters, in layout order.
            mode: one of :data:`MODES`.
        """
        import torch.distributed as dist

        rank, world = rank_and_world()
        active = mode == "auto" and world > 1
        sets: dict[tuple[tuple[int, ...], ...], _ShardSet] = {}
        notes: list[str] = []
        if active:
            for i, t in enumerate(tensors):
                placements = getattr(t, "placements", None)
                mesh = getattr(t, "device_mesh", None)
                if placements is None or mesh is None:
                    continue  # a plain tensor: replicated (DDP) or unsharded
                if any(p.is_partial() for p in placements):
                    notes.append(
                        f"parameter #{i} is a DTensor with a Partial placement {placements}: its statistics are "
                        "those of the local values, which gradscope cannot combine into the global ones."
                    )
                    continue
                dims = [d for d, p in enumerate(placements) if p.is_shard()]
                if not dims:
                    continue  # replicated on every mesh dimension: the local tensor is the whole one
                groups = tuple(mesh.get_group(d) for d in dims)
                ranks = tuple(tuple(dist.get_process_group_ranks(g)) for g in groups)
                s = sets.setdefault(ranks, _ShardSet(members=[], groups=groups, ranks=ranks, empty=[]))
                s.members.append(i)
                s.empty.append(t.to_local().numel() == 0)  # type: ignore[attr-defined]  # a DTensor: placements and device_mesh were found above
        return cls(rank=rank, world_size=world, active=active, shard_sets=list(sets.values()), notes=notes)

    # -- facts ---------------------------------------------------------------------------------------
    @property
    def writes(self) -> bool:
        """Whether this rank writes outputs (rank 0, or every rank when not reducing)."""
        return not self.active or self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether some watched parameter is sharded (its local moments need a reduction)."""
        return self.active and any(s.members for s in self.shard_sets)

    def describe(self) -> dict[str, Any]:
        """Facts for ``report.meta["distributed"]``."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "reduced": self.active,
            "sharded_tensors": sum(len(s.members) for s in self.shard_sets),
            "shard_groups": [
                list(r[0]) if len(r) == 1 else [list(x) for x in r] for r in (s.ranks for s in self.shard_sets)
            ],
            "collectives": self.collectives,
        }

    # -- reductions ----------------------------------------------------------------------------------
    def _all_reduce(self, t: Tensor, op: Any, group: Any = None) -> None:
        import torch.distributed as dist

        self.collectives += 1
        dist.all_reduce(t, op=op, group=group)

    def all_finite(self, flag: Tensor) -> Tensor:
        """``flag`` (a 0-d bool, "my gradients are finite") AND-ed over every rank (one collective).

        Used by ``on_nonfinite="raise"`` when parameters are sharded: a NaN lands in one rank's shard,
        and every rank must stop at the same step.
        """
        import torch.distributed as dist

        t = flag.to(torch.float32).reshape(1)
        self._all_reduce(t, dist.ReduceOp.MIN)
        return t[0] > 0

    def reduce(
        self,
        moments: Tensor,
        act: Tensor,
        scalars: Tensor,
        *,
        names: list[str],
        passed: np.ndarray,
        skip_col: int,
        max_names: int,
    ) -> list[str]:
        """Turn ``n`` rank-local buffer rows into global ones, in place, on the device.

        Args:
            moments: ``[n, P, C]`` view of the rows' moments (reduced for sharded parameters).
            act: ``[n, A, K]`` view of the rows' activation statistics (averaged over the ranks that
                measured them: each rank sees its own batch).
            scalars: ``[n, S]`` view of the rows' scalar slots; the first ``len(names)`` hold the named
                scalars, column ``skip_col`` the "optimizer step skipped" flag.
            names: this rank's scalar names, in column order.
            passed: ``[n, S]`` bool, which named scalar slots this rank wrote at each row.
            skip_col: column of the skip flag (summed: a step skipped on any rank is skipped everywhere).
            max_names: most scalar names kept.

        Returns:
            The scalar names every rank now shares; the columns of ``scalars`` follow them. Equal to
            ``names`` unless ranks passed different scalars.
        """
        import torch.distributed as dist

        world = tuple(range(self.world_size))
        n = moments.shape[0]
        for s in self.shard_sets:
            self._index(s, moments.device)

        # 1. MIN: a fingerprint of the scalar names (world), the shards' min and -max (their groups).
        fp = _names_fingerprint(names)
        lows = [self._min_payload(moments, s) for s in self.shard_sets]  # [n, k, 2] each
        head = torch.tensor([fp, -fp], dtype=moments.dtype, device=moments.device)
        flat = torch.cat([head, *(lo.reshape(-1) for lo, s in zip(lows, self.shard_sets) if s.ranks == (world,))])
        self._all_reduce(flat, dist.ReduceOp.MIN)
        off = 2
        for k, s in enumerate(self.shard_sets):
            if s.ranks == (world,):
                lows[k], off = flat[off : off + lows[k].numel()].view_as(lows[k]), off + lows[k].numel()
            else:
                for group in s.groups:
                    self._all_reduce(lows[k], dist.ReduceOp.MIN, group)
        # sync point: inside the flush (about to copy to the host anyway); decides the scalar layout.
        same_names = bool(flat[0] == -flat[1])

        # 2. When ranks passed different scalar names (one logged on some ranks only), agree on one list
        #    and move the columns. The previous common list stays a prefix, so older rows keep theirs.
        if not same_names:
            names, passed = self._agree_names(scalars, names, passed, max_names)

        # 3. SUM: the scalars with how many ranks passed each (world), the skip flag, and the shards'
        #    summable moments with how many ranks had a NaN min / max (NaN must survive the reduction).
        K = len(names)
        mask = torch.from_numpy(np.ascontiguousarray(passed[:, :K])).to(scalars.device)
        vals = torch.where(mask, scalars[:, :K], torch.zeros_like(scalars[:, :K]))
        skip = torch.nan_to_num(scalars[:, skip_col : skip_col + 1], nan=0.0)
        sums = [self._sum_payload(moments, s) for s in self.shard_sets]  # [n, k, 8] each
        act_ok = ~torch.isnan(act)
        act_vals = torch.where(act_ok, act, torch.zeros_like(act))
        parts = [vals.reshape(-1), mask.to(vals.dtype).reshape(-1), skip.reshape(-1)]
        parts += [act_vals.reshape(-1), act_ok.to(act.dtype).reshape(-1)]
        parts += [t.reshape(-1) for t, s in zip(sums, self.shard_sets) if s.ranks == (world,)]
        flat = torch.cat(parts)
        self._all_reduce(flat, dist.ReduceOp.SUM)
        total, count = flat[: n * K].view(n, K), flat[n * K : 2 * n * K].view(n, K)
        off = 2 * n * K
        scalars[:, skip_col] = flat[off : off + n]
        off += n
        a_sum, a_cnt = flat[off : off + act.numel()].view_as(act), flat[off + act.numel() : off + 2 * act.numel()]
        off += 2 * act.numel()
        a_cnt = a_cnt.view_as(act)
        act.copy_(torch.where(a_cnt > 0, a_sum / a_cnt, torch.full_like(a_sum, float("nan"))))
        for k, s in enumerate(self.shard_sets):
            if s.ranks == (world,):
                sums[k], off = flat[off : off + sums[k].numel()].view_as(sums[k]), off + sums[k].numel()
            else:
                for group in s.groups:
                    self._all_reduce(sums[k], dist.ReduceOp.SUM, group)
        mean = total / count
        scalars[:, :K] = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
        for s, red, lo in zip(self.shard_sets, sums, lows):
            sub = moments.index_select(1, s.index)  # type: ignore[arg-type]  # set by _index() before any reduction
            sub[..., len(MOMENTS) :] = float("nan")  # custom statistics of a shard: not the tensor's
            sub[..., _SUM_COLS] = red[..., : len(_SUM_COLS)]
            nan = torch.full_like(sub[..., 0], float("nan"))
            sub[..., _M["min"]] = torch.where(red[..., -2] > 0, nan, lo[..., 0])
            sub[..., _M["max"]] = torch.where(red[..., -1] > 0, nan, -lo[..., 1])
            moments.index_copy_(1, s.index, sub)  # type: ignore[arg-type]  # set by _index() before any reduction
        return list(names)

    @staticmethod
    def _min_payload(moments: Tensor, s: _ShardSet) -> Tensor:
        sub = moments.index_select(1, s.index)  # type: ignore[arg-type]  # set by _index() before any reduction
        inf = torch.full_like(sub[..., 0], float("inf"))
        # NaN (not measured, or a NaN gradient) and empty local shards must not win the min: NaN is
        # carried by a count in the SUM payload instead.
        lo = torch.where(torch.isnan(sub[..., _M["min"]]) | s.empty_mask, inf, sub[..., _M["min"]])  # type: ignore[operator]  # set by _index() before any reduction
        neg_hi = torch.where(torch.isnan(sub[..., _M["max"]]) | s.empty_mask, inf, -sub[..., _M["max"]])  # type: ignore[operator]  # set by _index() before any reduction
        return torch.stack([lo, neg_hi], dim=-1).contiguous()

    @staticmethod
    def _sum_payload(moments: Tensor, s: _ShardSet) -> Tensor:
        sub = moments.index_select(1, s.index)  # type: ignore[arg-type]  # set by _index() before any reduction
        nan_flags = torch.stack([torch.isnan(sub[..., _M["min"]]), torch.isnan(sub[..., _M["max"]])], dim=-1)
        return torch.cat([sub[..., _SUM_COLS], nan_flags.to(sub.dtype)], dim=-1).contiguous()

    def _agree_names(
        self, scalars: Tensor, names: list[str], passed: np.ndarray, max_names: int
    ) -> tuple[list[str], np.ndarray]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        self.collectives += 1
        dist.all_gather_object(gathered, list(names))
        agreed: list[str] = []
        for lst in gathered:
            for name in lst:
                if name not in agreed:
                    agreed.append(name)
        agreed = agreed[:max_names]
        old = scalars[:, : len(names)].clone()
        new_passed = np.zeros_like(passed)
        scalars[:, : len(agreed)] = float("nan")
        for j, name in enumerate(agreed):
            if name in names:
                c = names.index(name)
                scalars[:, j] = old[:, c]
                new_passed[:, j] = passed[:, c]
        return agreed, new_passed

    def _index(self, s: _ShardSet, device: torch.device) -> Tensor:
        if s.index is None or s.index.device != device:
            s.index = torch.tensor(s.members, dtype=torch.long, device=device)
            s.empty_mask = torch.tensor(s.empty, dtype=torch.bool, device=device)
        return s.index
