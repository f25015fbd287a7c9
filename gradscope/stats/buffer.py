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

    @property
    def device(self) -> torch.device:
        """The buffer's device."""
        return self.storage.device

    def moments(self, slot: int) -> Tensor:
        """View ``[n_params, n_cols]`` of a row."""
        return self.storage[slot, : self._a].view(self.shape_moments)

    def activations(self, slot: int) -> Tensor:
        """View ``[n_act, n_act_cols]`` of a row."""
        return self.storage[slot, self._a : self._b].view(self.shape_act)

    def scalars(self, slot: int) -> Tensor:
        """View ``[n_scalars]`` of a row."""
        return self.storage[slot, self._b :]

    def claim(self) -> int:
        """Reserve the next row, cleared to NaN, and return its index."""
        slot = self.used
        self.storage[slot].fill_(float("nan"))
        self.used += 1
        return slot

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

        The rows copied are freed. Rows claimed after them (the step in progress, whose activation
        statistics may already be written) move to the front, keep their content and stay claimed:
        a row of index ``n + k`` becomes row ``k``.

        Shapes: ``[n, n_params, n_cols]``, ``[n, n_act, n_act_cols]``, ``[n, n_scalars]``.

        Raises:
            ValueError: ``n`` is negative or more than the rows in use.
        """
        used = self.used
        n = used if n is None else n
        if not 0 <= n <= used:
            raise ValueError(f"StatsBuffer.snapshot: expected 0 <= n <= {used} (the rows in use), but got n={n}.")
        # sync point: the one device-to-host copy per flush.
        host = self.storage[:n].to("cpu", copy=True).numpy().astype(np.float64, copy=False)
        kept = used - n
        if kept and n:
            src = self.storage[n:used]
            # The destination overlaps the source only when more rows are kept than copied.
            self.storage[:kept].copy_(src.clone() if kept > n else src)
        self.used = kept
        return (
            host[:, : self._a].reshape(n, *self.shape_moments),
            host[:, self._a : self._b].reshape(n, *self.shape_act),
            host[:, self._b :].reshape(n, self.n_scalars),
        )
