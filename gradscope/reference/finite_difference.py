"""The numerical fallback: finite differences, with their own error bound, for modules without a reference.

For a module f with input x, parameters θ and incoming gradient g = dL/dy, the gradient with respect
to a tensor u (x or one parameter) is the gradient of the scalar φ(u) = ⟨g, f(u)⟩. The fallback
never needs all of it; it checks autograd's gradient through directional derivatives:

- a tensor with at most ``coordinates`` entries is differenced entry by entry (v = e_i), which gives
  the whole gradient, so the reference pass can continue upstream from it;
- a larger tensor is differenced along ``directions`` random sign vectors v that cover every entry
  (see :class:`~gradscope.reference.sampled.DirectionalGradient` for why a single wrong entry cannot
  hide, and why k directions miss any error with probability at most 2^-k).

Along one direction v, with step h, two central differences are taken::

    D(h)  = (φ(u + h v) − φ(u − h v)) / 2h          truncation error c·h² + O(h⁴)
    D(2h) = (φ(u + 2h v) − φ(u − 2h v)) / 4h         truncation error 4c·h² + O(h⁴)
    R     = (4 D(h) − D(2h)) / 3                     Richardson: the h² term cancels

and the estimate R is given the error bound

    E = 2 (|D(h) − D(2h)|  +  h · |S(h) − S(2h)|)  +  12 ε_f · Σ|g ⊙ f(u)| / h,
    S(h) = (φ(u + h v) − 2 φ(u) + φ(u − h v)) / h²

The first term is three times the truncation error of D(h), measured, so it over-covers R's; it also
covers a kink (ReLU at 0) between h and 2h from the point. A kink closer than h can leave D(h) and
D(2h) equal and both wrong (at distance 0 both give the mean of the two slopes); the second
differences S then disagree by about 1/h, and the second term, about half the slope jump, covers
it, while for a smooth φ it is O(h³). So a kink makes the bound wide instead of making a false alarm;
the factor 2 is for several kinks at once (thousands of ReLUs moved together). When the measured
terms exceed the rounding term (a kink, not truncation, dominates), the step shrinks eightfold, up to
twice, and the estimate with the smallest bound is kept.
The third term bounds rounding: each φ carries an error of a few ε_f times the sum of its terms'
magnitudes, divided by the step (and the second differences add a few more). ε_f is the machine epsilon of the lowest precision
the module computes in: the differences run on a float64 copy of the module (so a float32 model is
differenced in float64), and a module that casts to float32 inside (an RMSNorm that upcasts, then
downcasts) is detected by watching the dtypes of its intermediate results, and then differenced with
float32's ε and step h = ε_f^(1/3) · max(1, max|u|), which balances truncation against rounding.

The module's forward runs under ``torch.no_grad()`` with the random state of the autograd run
replayed before every evaluation, so that dropout inside it draws the same masks; every call gets a
fresh copy of its input, so a module that writes into its input (``inplace=True``) cannot corrupt the
point being differenced, and perturbations are out of place, so any memory layout works.

Some entries have no numerical derivative to compare with, by definition; they are left out of the
directions and the report says why: the ``padding_idx`` row of an embedding (autograd defines its
gradient as 0) and the weight of an ``Embedding(max_norm=...)`` (the forward renormalises it in place,
a step autograd does not differentiate).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gradscope.reference.base import GradientOrSample, ParamGrads, ReferenceLayer
from gradscope.reference.rng import RngState, replay_rng
from gradscope.reference.sampled import (
    DirectionalGradient,
    JointEstimate,
    SampledGradient,
    direction_seed,
    rademacher,
    rounding_rtol,
)

__all__ = ["DirectionalGradient", "FiniteDifferenceConfig", "FiniteDifferenceReference", "SampledGradient"]

#: Multiplies ε_f · Σ|g ⊙ f| / h in the rounding part of the error bound (see the module docstring).
ROUNDING_FACTOR = 12.0


@dataclass(frozen=True)
class FiniteDifferenceConfig:
    """How the fallback differences a module.

    Attributes:
        coordinates: a tensor with at most this many entries is differenced entry by entry.
        directions: a larger tensor is differenced along this many random sign directions (each costs
            four forwards of the module); any error is missed with probability at most 2^-directions,
            a single wrong entry never.
        seed: seeds the directions, together with the tensor's name, so runs repeat.
    """

    coordinates: int = 16
    directions: int = 4
    seed: int = 0


def call_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` on a copy of x, as the model calls it (attention is called as self-attention)."""
    x = x.clone()  # a module that writes into its input must not corrupt the point being differenced
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    out = module(x)
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, Tensor):
        logits = getattr(out, "logits", None)
        hint = " Wrap it in a module that returns `.logits`." if isinstance(logits, Tensor) else ""
        raise TypeError(f"{type(module).__name__} returned {type(out).__name__}, not a tensor.{hint}")
    return out


class _DtypeWatch(TorchFunctionMode):
    """Records the floating dtypes of every tensor a forward computes, to find where it rounds most."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, Tensor) and item.is_floating_point():
                self.dtypes.add(item.dtype)
        return out


def _least_precise(dtypes: set[torch.dtype]) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


@dataclass(eq=False)
class _Target:
    """One tensor to difference: the input or a parameter of the float64 working copy."""

    name: str  # relative to the module ("" for the input)
    label: str  # as the report names it
    tensor: Tensor
    mask: Tensor | None = None  # flat bool: entries with a numerical derivative to compare
    excluded: str = ""
    seed: int = 0  # of its directions in the joint check
    scale: float = 1.0  # it moves along scale * v: steps relative to its magnitude
    directions: Tensor | None = None  # [k, numel] the joint check's signs for it (CPU)


class FiniteDifferenceReference(ReferenceLayer):
    """Stands in for a module without a reference: its own forward, and finite differences backward.

    Its backward returns a :class:`SampledGradient` (small tensors, every entry) or a
    :class:`DirectionalGradient` (larger ones) for the input and for every trainable parameter of the
    module (its submodules' included), keyed by name relative to the module.
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
        #: what the report should say about this module (its working precision, left-out entries)
        self.notes: list[str] = []

    def forward(self, x: Tensor) -> Tensor:
        """Run the module itself, replaying the random state of the autograd run."""
        self.x = x
        with replay_rng(self.rng_state):
            return call_module(self.module, x)

    def backward(self, grad_out: Tensor) -> tuple[GradientOrSample | None, ParamGrads]:
        """Estimate d⟨g, f⟩/du for the input and each parameter, with an error bound for each estimate.

        All the tensors are differenced together along joint directions (see
        :class:`~gradscope.reference.sampled.JointEstimate`); each one gets a
        :class:`DirectionalGradient` that refers to the joint estimate, and a tensor that has no
        numerical counterpart (``Embedding(max_norm=...)``) gets one with no direction and the reason.
        """
        self._prepare(grad_out)
        checkable = [t for t in self.targets if t.mask is None or bool(t.mask.any())]  # sync point: CPU masks
        k = self.config.directions if checkable else 0
        for target in checkable:
            target.seed = direction_seed(self.config.seed, target.label)
            target.scale = self._scale(target.tensor)
            target.directions = rademacher(target.tensor.numel(), k, target.seed, torch.device("cpu"))
            if target.mask is not None:
                target.directions = target.directions * target.mask.to(torch.float64)
        h = self.eps ** (1 / 3)
        signs = {id(t): t.directions for t in checkable if t.directions is not None}
        values, errors = [], []
        for j in range(k):
            shift = {id(t): (t.scale * signs[id(t)][j]).reshape(t.tensor.shape).to(t.tensor.device) for t in checkable}
            value, error = self._difference(shift, h)
            values.append(value)
            errors.append(error)
        device = self.x.device
        joint = JointEstimate(
            values=torch.tensor(values, dtype=torch.float64, device=device),
            errors=torch.tensor(errors, dtype=torch.float64, device=device),
            layer=self._name(),
            members=len(checkable),
            refine=self._refine,
        )
        estimates: dict[str, GradientOrSample] = {}
        for target in self.targets:
            in_joint = target in checkable
            estimates[target.name] = DirectionalGradient(
                shape=target.tensor.shape,
                seed=target.seed,
                values=joint.values if in_joint else torch.zeros(0, dtype=torch.float64),
                errors=joint.errors if in_joint else torch.zeros(0, dtype=torch.float64),
                rtol=self.rtol,
                mask=target.mask,
                excluded=target.excluded,
                weight=target.scale,
                joint=joint if in_joint else None,
                label=target.label,
            )
        grad_in = estimates.pop("", None)
        return grad_in, estimates

    def _prepare(self, grad_out: Tensor) -> None:
        """The float64 working copy, its working precision, and the tensors to difference."""
        self.work = copy.deepcopy(self.module).to(torch.float64)
        self.x64 = self.x.to(torch.float64) if self.x.is_floating_point() else self.x
        self.g = grad_out.to(torch.float64)
        watch = _DtypeWatch()
        with watch, replay_rng(self.rng_state):
            y = call_module(self.work, self.x64).to(torch.float64)
        working = _least_precise(watch.dtypes | {torch.float64})
        self.eps = torch.finfo(working).eps
        if working != torch.float64:
            self.notes.append(
                f"{self._name()!r} computes internally in {_dtype_name(working)}: its finite differences use "
                f"{_dtype_name(working)}'s rounding, and autograd is held to rtol={rounding_rtol(working):g} there."
            )
        # sync point: verify is a one-off check; the rounding scale of φ is needed on the host.
        self.magnitude = float((self.g * y).abs().sum())
        self.phi0 = float((self.g * y).sum())  # sync point: as above; φ at the point itself
        self.rtol = rounding_rtol(_least_precise({working, grad_out.dtype}))
        self.targets: list[_Target] = []
        if self.x64.is_floating_point():
            self.targets.append(_Target("", f"{self._name()}:input", self.x64))
        originals = dict(self.module.named_parameters())
        self.targets += [t for t in self._parameter_targets(self.work) if originals[t.name].requires_grad]
        self.bases = {id(t): t.tensor.detach().clone() for t in self.targets}

    def _phi(self, shifts: dict[int, Tensor]) -> float:
        """⟨g, f⟩ with each target moved by its shift (keyed by ``id(target)``), then put back exactly."""
        point = self.x64
        moved = []
        for target in self.targets:
            shift = shifts.get(id(target))
            if shift is None:
                continue
            if target.name == "":
                point = self.x64 + shift  # out of place: any memory layout works
            else:
                target.tensor.copy_(self.bases[id(target)] + shift)  # under no_grad: a plain write
                moved.append(target)
        try:
            with replay_rng(self.rng_state):
                out = call_module(self.work, point).to(torch.float64)
            # sync point: verify is a one-off check; each finite difference is a host-side number.
            return float((self.g * out).sum())
        finally:
            for target in moved:
                target.tensor.copy_(self.bases[id(target)])

    def _difference(self, shift: dict[int, Tensor], h: float) -> tuple[float, float]:
        """Richardson-extrapolated central difference along ``shift`` (per target), and its error bound.

        When the bound shows a kink near the point (its measured part above its rounding part), the
        step shrinks eightfold, up to twice: a kink within a smaller step is that much less likely, and
        the estimate with the smallest bound is kept.
        """
        best = (math.nan, math.inf)
        for _ in range(3):
            value, measured, rounding = self._difference_at(shift, h)
            if measured + rounding < best[1]:
                best = (value, measured + rounding)
            if measured <= rounding:
                break
            h /= 8
        return best

    def _difference_at(self, shift: dict[int, Tensor], h: float) -> tuple[float, float, float]:
        """The estimate at step h, the measured part of its bound, and the rounding part."""

        def phi(c: float) -> float:
            return self._phi({key: c * h * d for key, d in shift.items()})

        up1, down1, up2, down2 = phi(1.0), phi(-1.0), phi(2.0), phi(-2.0)
        d1, d2 = (up1 - down1) / (2 * h), (up2 - down2) / (4 * h)
        # Second differences at both steps: equal up to O(h²) for a smooth φ, apart by about 1/h when a
        # kink (ReLU, max-pool) lies within h of the point, where D(h) and D(2h) can agree and both be wrong.
        s1 = (up1 - 2 * self.phi0 + down1) / h**2
        s2 = (up2 - 2 * self.phi0 + down2) / (4 * h**2)
        # Twice the measured terms: several kinks at once (thousands of ReLUs moved together) add up less
        # neatly than one, and a false alarm costs more than a slightly wider bound.
        measured = 2 * (abs(d1 - d2) + h * abs(s1 - s2))
        return (4 * d1 - d2) / 3, measured, ROUNDING_FACTOR * self.eps * self.magnitude / h

    @staticmethod
    def _scale(tensor: Tensor) -> float:
        # sync point: verify is a one-off check; the step size is chosen on the host.
        return max(1.0, float(tensor.detach().abs().max())) if tensor.numel() else 1.0

    @torch.no_grad()
    def _refine(self, label: str) -> SampledGradient | DirectionalGradient:
        """Difference one tensor on its own: entry by entry when small, else along its own directions.

        Called after the pass (by the comparison, when the joint check failed), hence its own ``no_grad``.
        """
        target = next(t for t in self.targets if t.label == label)
        numel = target.tensor.numel()
        mask = target.mask
        scale = self._scale(target.tensor)
        h = self.eps ** (1 / 3)
        if numel <= self.config.coordinates:
            indices = torch.arange(numel) if mask is None else mask.nonzero().reshape(-1)
            directions = torch.zeros(int(indices.numel()), numel, dtype=torch.float64)
            directions[torch.arange(int(indices.numel())), indices] = 1.0
        else:
            seed = direction_seed(self.config.seed + 1, label)  # other directions than the joint check's
            directions = rademacher(numel, self.config.directions, seed, torch.device("cpu"))
            if mask is not None:
                directions = directions * mask.to(torch.float64)
        values, errors = [], []
        for v in directions:
            shift = (scale * v).reshape(target.tensor.shape).to(target.tensor.device)
            value, error = self._difference({id(target): shift}, h)
            values.append(value)
            errors.append(error)
        device = target.tensor.device
        estimates = torch.tensor(values, dtype=torch.float64, device=device)
        bounds = torch.tensor(errors, dtype=torch.float64, device=device)
        if numel <= self.config.coordinates:
            # the step was scale * e_i: the estimate is scale times the entry's derivative
            return SampledGradient(
                shape=target.tensor.shape,
                indices=indices.to(device),
                values=estimates / scale,
                errors=bounds / scale,
                rtol=self.rtol,
                excluded=target.excluded,
            )
        return DirectionalGradient(
            shape=target.tensor.shape,
            seed=seed,
            values=estimates,
            errors=bounds,
            rtol=self.rtol,
            mask=mask,
            excluded=target.excluded,
            weight=scale,
            label=label,
        )

    def _name(self) -> str:
        name = self.path or "(model)"
        return name if self.call == 0 else f"{name} [call {self.call + 1}]"

    def _parameter_targets(self, work: nn.Module) -> Iterator[_Target]:
        owners = {
            f"{prefix}.{n}" if prefix else n: m
            for prefix, m in work.named_modules()
            for n, _ in m.named_parameters(recurse=False)
        }
        for name, param in work.named_parameters():
            label = f"{self.path}.{name}" if self.path else name
            target = _Target(name, label, param)
            owner = owners.get(name)
            if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) and param is owner.weight:
                if owner.max_norm is not None:
                    target.mask = torch.zeros(param.numel(), dtype=torch.bool)
                    target.excluded = (
                        f"{type(owner).__name__}(max_norm={owner.max_norm:g}) renormalises its weight in place during "
                        "the forward, a step autograd does not differentiate, so its gradient has no numerical "
                        "counterpart"
                    )
                elif owner.padding_idx is not None:
                    rows = torch.ones(param.shape[0], dtype=torch.bool)
                    rows[owner.padding_idx] = False
                    target.mask = rows[:, None].expand(param.shape).reshape(-1).clone()
                    target.excluded = (
                        f"row {owner.padding_idx} is the padding_idx row, whose gradient autograd defines as 0"
                    )
            yield target


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
