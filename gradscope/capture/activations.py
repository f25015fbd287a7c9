"""Activation statistics for dead and saturated units, taken by forward hooks on sampled steps only.

One global forward hook (``torch.nn.modules.module.register_module_forward_hook``) is registered just
before a sampled step and removed at its end, so other steps pay nothing. It is global, not on the
user's modules, and it picks the watched modules by identity: nothing is ever left on a module, so
``torch.save(model)``, pickling and ``copy.deepcopy(model)`` work at every step, and the forward
passes of a deep copy (an EMA or evaluation model) never reach the scope. Only modules in training
mode are measured (a validation forward inside a step is ignored), and only the first training
forward of a step (one micro-batch under gradient accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from gradscope.capture.hooks import HookManager
from gradscope.capture.weakcall import WeakCall

__all__ = ["ACTIVATION_KINDS", "SATURATION_DERIVATIVE", "ActivationMonitor", "find_activations"]

#: Module type -> family. "relu": piecewise linear, dead when the output is <= 0 (zero gradient, or
#: a tiny slope for leaky variants); "tanh"/"sigmoid"/"hardtanh": saturating, dead gradient at the ends.
ACTIVATION_KINDS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "relu",
    nn.PReLU: "relu",
    nn.RReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Hardtanh: "hardtanh",
    nn.Hardsigmoid: "hardsigmoid",
}

#: An output counts as saturated where the local derivative is below this fraction of its maximum:
#: tanh |y| > 0.995 (|x| > 3.0), sigmoid y < 0.0025 or y > 0.9975 (|x| > 6.0). Hard variants: at the
#: clamp, where the derivative is exactly 0.
SATURATION_DERIVATIVE = 0.01
_SIGMOID_LOW = (1.0 - (1.0 - SATURATION_DERIVATIVE) ** 0.5) / 2.0  # 4 y (1 - y) = SATURATION_DERIVATIVE

_CHANNEL_FIRST = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.GroupNorm,
    nn.MaxPool1d,
    nn.AvgPool1d,
)


def _kind(module: nn.Module) -> str | None:
    kind = ACTIVATION_KINDS.get(type(module))
    if kind is None:
        for cls, k in ACTIVATION_KINDS.items():
            if isinstance(module, cls):
                return k
    return kind


def _last_leaf(module: nn.Module) -> nn.Module:
    children = list(module.children())
    return _last_leaf(children[-1]) if children else module


def _channel_first_3d(parent: nn.Module | None, name: str) -> bool:
    # A 3-D output is [N, C, L] after a Conv1d and [N, T, F] in sequence models; look at the module
    # defined just before the activation in the same parent to tell which.
    if parent is None:
        return False
    prev = None
    for child_name, child in parent.named_children():
        if child_name == name:
            break
        prev = child
    return prev is not None and isinstance(_last_leaf(prev), _CHANNEL_FIRST)


@dataclass(frozen=True)
class ActivationInfo:
    """One watched activation module."""

    index: int
    path: str
    kind: str
    channel_first_3d: bool


def find_activations(model: nn.Module) -> list[tuple[ActivationInfo, nn.Module]]:
    """Every activation module of a known family, with its path, in registration order."""
    found: list[tuple[ActivationInfo, nn.Module]] = []
    parents = {id(m): (parent, n) for parent in model.modules() for n, m in parent.named_children()}
    seen: set[int] = set()
    for path, module in model.named_modules():
        kind = _kind(module)
        if kind is None or id(module) in seen:
            continue
        seen.add(id(module))
        parent, name = parents.get(id(module), (None, ""))
        info = ActivationInfo(len(found), path, kind, _channel_first_3d(parent, name))
        found.append((info, module))
    return found


def _unit_dim(y: Tensor, channel_first_3d: bool) -> int:
    if y.dim() >= 4 or (y.dim() == 3 and channel_first_3d):
        return 1
    return y.dim() - 1


def _inactive(y: Tensor, kind: str, module: nn.Module) -> Tensor:
    """Boolean mask of outputs whose local gradient is zero (or nearly so)."""
    if kind == "relu":
        return y <= 0
    if kind == "tanh":
        return y.abs() > (1.0 - SATURATION_DERIVATIVE) ** 0.5
    if kind == "sigmoid":
        # 4 y (1 - y) < SATURATION_DERIVATIVE, as bounds on y: two compares instead of four passes
        return (y < _SIGMOID_LOW) | (y > 1.0 - _SIGMOID_LOW)
    if kind == "hardtanh":
        lo, hi = getattr(module, "min_val", -1.0), getattr(module, "max_val", 1.0)
        return (y <= lo) | (y >= hi)
    # hardsigmoid: flat outside (-3, 3), where the output is exactly 0 or 1
    return (y <= 0) | (y >= 1)


def activation_statistics(
    y: Tensor, kind: str, module: nn.Module, channel_first_3d: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(act_zero_fraction, act_dead_fraction, act_saturated_fraction)`` of one output; NaN where not applicable.

    Args:
        y: the module's output, ``[N, ...]`` with the batch first.
        kind: the module's family (:data:`ACTIVATION_KINDS`).
        module: the module (hard variants read their bounds).
        channel_first_3d: whether a 3-D output is ``[N, C, L]`` rather than ``[N, T, C]``.
    """
    y = y.detach()
    nan = torch.full((), float("nan"), device=y.device)
    inactive = _inactive(y, kind, module)  # one pass over the output, 1 byte per entry
    if y.dim() >= 2:
        unit = _unit_dim(y, channel_first_3d)
        if unit == y.dim() - 1:
            units = inactive.reshape(-1, y.shape[-1])
            dims: tuple[int, ...] = (0,)
            samples = units.shape[0]
        else:  # [N, C, *spatial]
            units = inactive.reshape(y.shape[0], y.shape[1], -1)
            dims = (0, 2)
            samples = units.shape[0] * units.shape[2]
        count_dtype = torch.int32 if samples < 2**31 else torch.int64
        per_unit = units.sum(dim=dims, dtype=count_dtype)  # inactive entries of each unit
        # One pass over the mask gives both: the fraction of inactive entries, and the units inactive
        # for every sample (and position) of the batch, which are dead. (Three times faster than a
        # count_nonzero and two all() reductions over the mask.)
        frac = per_unit.sum(dtype=torch.int64).to(torch.float32) / max(inactive.numel(), 1)
        dead = (per_unit == samples).float().mean()
    else:
        frac = torch.count_nonzero(inactive).to(torch.float32) / max(inactive.numel(), 1)
        dead = nan
    if kind == "relu":
        return frac, dead, nan
    return nan, dead, frac


class ActivationMonitor:
    """Registers a global forward hook on sampled steps and writes statistics into the device buffer.

    Args:
        model: the watched module.
        hooks: the scope's hook manager (owns the handles).
    """

    GROUP = "activations"

    def __init__(self, model: nn.Module, hooks: HookManager) -> None:
        self.entries = find_activations(model)
        self._hooks = hooks
        # module identity -> its entry: the global hook measures these modules only (not a deep copy's)
        self._by_id: dict[int, tuple[ActivationInfo, nn.Module]] = {id(m): (info, m) for info, m in self.entries}
        self._target: Callable[[], Tensor] | None = None
        self._seen: set[int] = set()
        #: Set when a hook ran inside a ``torch.compile`` trace (the module was compiled after watching).
        self.compiled = False

    @property
    def paths(self) -> list[str]:
        """Paths of the watched activation modules."""
        return [info.path for info, _ in self.entries]

    @property
    def kinds(self) -> list[str]:
        """Families of the watched activation modules."""
        return [info.kind for info, _ in self.entries]

    @property
    def armed(self) -> bool:
        """True while the hook is registered (a sampled step is in progress)."""
        return self._hooks.count(self.GROUP) > 0

    def arm(self, target: Callable[[], Tensor]) -> None:
        """Register the hook; it writes each watched module's row of ``target()`` (``[n_act, 3]``)."""
        self.disarm()
        self._target = target
        self._seen = set()
        if self.entries:
            # Weakly bound: the global hook registry never keeps the monitor (and its scope) alive.
            hook = WeakCall(self, "_on_forward")
            self._hooks.add(self.GROUP, torch.nn.modules.module.register_module_forward_hook(hook))

    def retarget(self, target: Callable[[], Tensor]) -> None:
        """Point the armed hooks at another buffer row (the row moved during a flush)."""
        self._target = target

    def disarm(self) -> None:
        """Remove the hook (end of a sampled step)."""
        self._hooks.remove(self.GROUP)
        self._target = None

    def _on_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        entry = self._by_id.get(id(module))
        if entry is None or entry[1] is not module:
            return  # another module (another model, a deep copy): not watched
        info = entry[0]
        if torch.compiler.is_compiling():
            # Under torch.compile this hook is traced into the graph, and a write into a buffer row
            # would be frozen there (later steps would not land in their own rows). Measure nothing
            # and tell the scope, which then stops arming hooks (no graph break, no recompiles).
            self.compiled = True
            return
        if not module.training or info.index in self._seen or self._target is None:
            return
        if not isinstance(output, Tensor) or output.numel() == 0:
            return
        self._seen.add(info.index)
        stats = activation_statistics(output, info.kind, module, info.channel_first_3d)
        row = self._target()[info.index]
        row.copy_(torch.stack(stats).to(device=row.device, dtype=row.dtype))
