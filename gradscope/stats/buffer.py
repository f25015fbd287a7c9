"""The device buffer: statistics stay on the device until a flush copies them to the host at once."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["StatsBuffer"]


class StatsBuffer:
    """A preallocated ``[capacity, row]`` float64 tensor on the watched model's device.

    One row holds one recorded step: the moments of every parameter ``[n_params, n_cols]``, the
    activation statistics ``[n_act, n_act_cols]`` and the scalars the user passed ``[n_scalars]``,
    laid out end to end so a flush is **one** device-to-host copy. Unwritten entries are NaN.

    Args:
        capacity: rows (recorded steps) between flushes.
        n_params: watched parameters.
        n_cols: columns per parameter (moments and custom statistics).
        n_act: watched activation modules.
        n_act_cols: statistics per activation module.
        n_scalars: scalar slots (loss, val_loss, user scalars).
        device: where the buffer lives (the model's device).
    """

    def __init__(
        self,
        *,
        capacity: int,
        n_params: int,
        n_cols: int,
        n_act: int,
        n_act_cols: int,
        n_scalars: int,
        device: torch.device,
    ) -> None:
        self.capacity = capacity
        self.shape_moments = (n_params, n_cols)
        self.shape_act = (n_act, n_act_cols)
        self.n_scalars = n_scalars
        self._a = n_params * n_cols
        self._b = self._a + n_act * n_act_cols
        self.row_size = self._b + n_scalars
        # float64 on MPS does not exist; everything else takes it (exact counts above 2**24).
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.storage = torch.full((capacity, self.row_size), float("nan"), dtype=dtype, device=device)
        self.used = 0
        self._pinned: Tensor | None = None  # host side of copy_async, made on first use
        self._views: dict[int, Tensor] = {}
        self._act_views: dict[int, Tensor] = {}
        # A CPU buffer is host memory: NumPy writes into it cost a fraction of a torch call (the
        # per-step host work: clearing a row, writing the scalars).
        # sync point: CPU tensors only; a view of host memory, made once, nothing to wait for.
        self._host = self.storage.numpy() if self.storage.device.type == "cpu" else None

    @property
    def device(self) -> torch.device:
        """The buffer's device."""
        return self.storage.device

    def moments(self, slot: int) -> Tensor:
        """View ``[n_params, n_cols]`` of a row (made once per row: this is on every step's path)."""
        view = self._views.get(slot)
        if view is None:
            view = self._views[slot] = self.storage[slot, : self._a].view(self.shape_moments)
        return view

    def host_moments(self, slot: int) -> np.ndarray | None:
        """A CPU buffer's row ``[n_params, n_cols]`` as a NumPy view (no torch call); None on a device."""
        if self._host is None:
            return None
        return self._host[slot, : self._a].reshape(self.shape_moments)

    def activations(self, slot: int) -> Tensor:
        """View ``[n_act, n_act_cols]`` of a row (made once per row: sampled steps resolve it in a forward hook)."""
        view = self._act_views.get(slot)
        if view is None:
            view = self._act_views[slot] = self.storage[slot, self._a : self._b].view(self.shape_act)
        return view

    def scalars(self, slot: int) -> Tensor:
        """View ``[n_scalars]`` of a row."""
        return self.storage[slot, self._b :]

    def claim(self) -> int:
        """Reserve the next row, cleared to NaN, and return its index.

        A CPU buffer keeps every row past the used ones at NaN (:meth:`drop` clears the rows it frees,
        all at once), so claiming one there is a counter: no call per step.
        """
        slot = self.used
        if self._host is None:
            self.storage[slot].fill_(float("nan"))
        self.used = slot + 1
        return slot

    def set_scalar(self, slot: int, col: int, value: float) -> None:
        """Write a host number into scalar column ``col`` of row ``slot``."""
        if self._host is not None:
            self._host[slot, self._b + col] = value
        else:
            self.storage[slot, self._b + col].fill_(value)

    def rows(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the first ``n`` rows, to change in place on the device (the distributed reduction).

        Shapes: ``[n, n_params, n_cols]``, ``[n, n_act, n_act_cols]``, ``[n, n_scalars]``.
        """
        head = self.storage[:n]
        return (
            head[:, : self._a].view(n, *self.shape_moments),
            head[:, self._a : self._b].view(n, *self.shape_act),
            head[:, self._b :],
        )

    def snapshot(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copy the first ``n`` used rows (default: all) to the host and return (moments, activations, scalars).

        The rows copied are freed (see :meth:`drop`).

        Shapes: ``[n, n_params, n_cols]``, ``[n, n_act, n_act_cols]``, ``[n, n_scalars]``.

        Raises:
            ValueError: ``n`` is negative or more than the rows in use.
        """
        n = self._check(n)
        # sync point: the one device-to-host copy per flush.
        host = self.storage[:n].to("cpu", copy=True).numpy().astype(np.float64, copy=False)
        self.drop(n)
        return self.split(host)

    def peek(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first ``n`` used rows on the host, left in the buffer (``report()`` of a distributed run).

        Shapes as in :meth:`snapshot`.
        """
        n = self._check(n)
        # sync point: report() by request, in a distributed run: this rank's rows that wait for the
        # next collective flush (on a CPU buffer a plain copy).
        host = self.storage[:n].to("cpu", copy=True).numpy().astype(np.float64, copy=False)
        return self.split(host)

    def take_cpu(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A CPU buffer's first ``n`` rows, copied and freed: the live path reads host memory directly.

        Raises:
            ValueError: the buffer is not on the CPU (use :meth:`copy_async`), or ``n`` is out of range.
        """
        if self.device.type != "cpu":
            raise ValueError(f"StatsBuffer.take_cpu: the buffer is on {self.device}; use copy_async().")
        n = self._check(n)
        # sync point: CPU tensors only; the buffer is host memory, there is no device to wait for.
        host = self.storage[:n].numpy().astype(np.float64, copy=True)
        self.drop(n)
        return self.split(host)

    def copy_async(self, n: int) -> tuple[Tensor, torch.cuda.Event]:
        """A device buffer's first ``n`` rows into pinned host memory, without waiting; the rows are freed.

        The copy and the move of the remaining rows to the front are queued on the current stream in
        that order, so the copy reads the rows before they are overwritten. Read the returned host
        tensor only once the returned event has completed (``event.query()``); it is reused by the
        next call, so at most one copy may be in flight.

        Returns:
            ``(host, event)``: ``host[:n]`` holds the rows once ``event`` completes.
        """
        n = self._check(n)
        if self._pinned is None:
            self._pinned = torch.empty(self.storage.shape, dtype=self.storage.dtype, pin_memory=True)
        host = self._pinned[:n]
        host.copy_(self.storage[:n], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.drop(n)
        return host, event

    def drop(self, n: int) -> None:
        """Free the first ``n`` used rows (on the device, no sync).

        Rows claimed after them (the step in progress, whose activation statistics may already be
        written) move to the front, keep their content and stay claimed: a row of index ``n + k``
        becomes row ``k``.
        """
        used = self.used
        kept = used - n
        if kept and n:
            src = self.storage[n:used]
            # The destination overlaps the source only when more rows are kept than copied.
            self.storage[:kept].copy_(src.clone() if kept > n else src)
        if self._host is not None and n:
            self._host[kept:used].fill(np.nan)  # the rows freed read as cleared when claimed again
        self.used = kept

    def split(self, host: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``[n, row_size]`` on the host as (moments, activations, scalars)."""
        n = host.shape[0]
        return (
            host[:, : self._a].reshape(n, *self.shape_moments),
            host[:, self._a : self._b].reshape(n, *self.shape_act),
            host[:, self._b :].reshape(n, self.n_scalars),
        )

    def _check(self, n: int | None) -> int:
        used = self.used
        n = used if n is None else n
        if not 0 <= n <= used:
            raise ValueError(f"StatsBuffer: expected 0 <= n <= {used} (the rows in use), but got n={n}.")
        return n
