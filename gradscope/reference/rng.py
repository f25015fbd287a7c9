"""Snapshots of the random number generators, so a random forward can be replayed exactly.

``gradscope.verify`` records the generator state before each module call of the autograd run; the
reference pass then replays it to rebuild a dropout mask, and the finite-difference check replays it
before every perturbed forward, so all of them see the random draws the autograd run saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["RngState", "capture_rng", "replay_rng"]


@dataclass(frozen=True)
class RngState:
    """The CPU generator state, plus the CUDA generator state of ``device`` when it is a GPU."""

    cpu: torch.Tensor
    device: torch.device
    accelerator: torch.Tensor | None


def capture_rng(device: torch.device) -> RngState:
    """Snapshot the generators that a module running on ``device`` draws from."""
    accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(cpu=torch.get_rng_state(), device=device, accelerator=accelerator)


@contextmanager
def replay_rng(state: RngState | None) -> Iterator[None]:
    """Run the body from ``state`` (when given), then put the generators back as they were."""
    if state is None:
        yield
        return
    devices = [state.device] if state.accelerator is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state.cpu)
        if state.accelerator is not None:
            torch.cuda.set_rng_state(state.accelerator, state.device)
        yield
