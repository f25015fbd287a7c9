"""The numerical fallback: central differences for modules that have no reference.

For a module f with input x, parameters θ and incoming gradient g = dL/dy, the gradient with respect
to one coordinate u (an entry of x or θ) is the directional derivative of the scalar ⟨g, f⟩:

    dL/du ≈ (⟨g, f(u + h)⟩ - ⟨g, f(u - h)⟩) / 2h,     error O(h²) + O(ε/h),

so h ≈ ε^(1/3) · max(1, |u|) balances truncation against rounding (about 6e-6 in float64). Each
coordinate costs two forwards of the module, so only a seeded random subset of coordinates is
checked, and the estimate is compared with autograd on that subset with looser tolerances. The
module's forward runs under ``torch.no_grad()``, with the random state of the autograd run replayed
so that dropout inside it draws the same masks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.rng import RngState, replay_rng
from gradscope.reference.sampled import SampledGradient

__all__ = ["FiniteDifferenceConfig", "FiniteDifferenceReference", "SampledGradient"]


@dataclass(frozen=True)
class FiniteDifferenceConfig:
    """How the fallback samples coordinates.

    Attributes:
        coordinates: at most this many coordinates per tensor (all of them when the tensor is smaller).
        seed: seeds the choice of coordinates, together with the tensor's name, so runs repeat.
    """

    coordinates: int = 16
    seed: int = 0


def sample_coordinates(numel: int, name: str, config: FiniteDifferenceConfig) -> Tensor:
    """A seeded random subset of ``range(numel)`` of size ``min(numel, config.coordinates)``, ascending."""
    if numel <= config.coordinates:
        return torch.arange(numel)
    # crc32 rather than hash(): Python salts str hashes per process, and runs must repeat.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randperm(numel, generator=generator)[: config.coordinates].sort().values


def call_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` on a copy of x, as the model calls it (attention is called as self-attention)."""
    x = x.clone()  # a module that writes into its input must not corrupt the reference's cached tensors
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


class FiniteDifferenceReference(ReferenceLayer):
    """Stands in for a module without a reference: its own forward, and central differences backward.

    Its backward returns :class:`SampledGradient` values for the input and for every trainable
    parameter of the module (its submodules' included), keyed by name relative to the module.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        path: str,
        call: int,
        config: FiniteDifferenceConfig,
        rng_state: RngState | None,
    ) -> None:
        super().__init__(module, path=path, call=call)
        self.config = config
        self.rng_state = rng_state

    def forward(self, x: Tensor) -> Tensor:
        """Run the module itself, replaying the random state of the autograd run."""
        self.x = x
        with replay_rng(self.rng_state):
            return call_module(self.module, x)

    def backward(self, grad_out: Tensor) -> tuple[SampledGradient | None, ParamGrads]:
        """Estimate d⟨g, f⟩/du by central differences on sampled coordinates of x and of each parameter."""

        def objective() -> float:
            with replay_rng(self.rng_state):
                return float((grad_out * call_module(self.module, x)).sum())

        x = self.x.clone()
        grad_in = self._sample(x, f"{self.path}:input", objective) if x.is_floating_point() else None
        grads: ParamGrads = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                grads[name] = self._sample(param, f"{self.path}.{name}", objective)
        return grad_in, grads

    def _sample(self, tensor: Tensor, name: str, objective: Callable[[], float]) -> SampledGradient:
        """Perturb ``tensor`` in place one coordinate at a time (restoring it exactly) and difference."""
        flat = tensor.view(-1) if tensor.is_contiguous() else None
        if flat is None:  # view(-1) must alias the tensor the module reads
            raise RuntimeError(f"Cannot perturb {name!r} in place: it is not contiguous.")
        indices = sample_coordinates(flat.numel(), name, self.config)
        eps = torch.finfo(tensor.dtype).eps
        values = []
        for i in indices.tolist():
            original = flat[i].item()
            step = eps ** (1 / 3) * max(1.0, abs(original))
            flat[i] = original + step
            high, up = flat[i].item(), objective()
            flat[i] = original - step
            low, down = flat[i].item(), objective()
            flat[i] = original
            values.append((up - down) / (high - low))  # the steps actually taken, after rounding
        return SampledGradient(
            shape=tensor.shape,
            indices=indices.to(tensor.device),
            values=torch.tensor(values, dtype=tensor.dtype, device=tensor.device),
        )
