"""Activation statistics for dead and saturated units, taken by forward hooks on sampled steps only.

One global forward hook (``torch.nn.modules.module.register_module_forward_hook``) is registered just
before a sampled step and removed at its end, so other steps pay nothing. It is global, not on the
user's modules, and it picks the watched modules by identity: nothing is ever left on a module, so
``torch.save(model)``, pickling and ``copy.deepcopy(model)`` work at every step, and the forward
passes of a deep copy (an EMA or evaluation model) never reach the scope. Only modules in training
mode are measured (a validation forward inside a step is ignored), and only the first training
forward of a step (one micro-batch under gradient accumulation).

Each output is read at its hook, before anything later in the forward can change it in place (a
``ReLU(inplace=True)``, a residual ``+=``). On a CPU the compiled kernel
(:func:`gradscope.capture.kernels.cpu_activation_kernel`) reads it once and writes the module's
three statistics into the buffer row: no operator at all. Elsewhere a mask and one reduction per
module are launched at the hook, and the statistics of all the modules of the step are finished
and written together, in a fixed number of operators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from gradscope.capture import kernels
from gradscope.capture.hooks import HookManager
from gradscope.capture.weakcall import WeakCall

__all__ = ["ACTIVATION_KINDS", "MIN_UNIT_SAMPLES", "SATURATION_DERIVATIVE", "ActivationMonitor", "find_activations"]

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
_TANH_HIGH = (1.0 - SATURATION_DERIVATIVE) ** 0.5  # 1 - y**2 = SATURATION_DERIVATIVE

#: Entries per unit (samples x positions) below which a unit's output is not judged dead. A unit is dead
#: when it is inactive for every sample; over one or two samples (a mixture-of-experts' expert that
#: the router sent one token) half of the healthy units of a ReLU layer are. From 8 on, a unit active
#: for half the inputs looks dead in 0.4 % of batches.
MIN_UNIT_SAMPLES = 8

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


def _geometry(shape: torch.Size, numel: int, channel_first_3d: bool) -> tuple[int, int, int, bool]:
    """``(outer, units, inner, per_unit)``: the output read as ``[outer, units, inner]``, units on axis 1.

    ``[N, C, *spatial]`` (4-D and more, 3-D channel first) is ``[N, C, prod(spatial)]``; otherwise the
    units are the last axis and every other axis is a sample: ``[numel / F, F, 1]``. Below 2-D there
    are no units (``per_unit`` False): ``[1, 1, numel]``. With fewer than :data:`MIN_UNIT_SAMPLES`
    entries per unit, ``per_unit`` is False too (no dead fraction is taken, only the inactive one).
    """
    nd = len(shape)
    if nd < 2:
        return 1, 1, numel, False
    if nd >= 4 or (nd == 3 and channel_first_3d):
        outer, units = shape[0], shape[1]
        inner = numel // (outer * units)
        return outer, units, inner, outer * inner >= MIN_UNIT_SAMPLES
    units = shape[-1]
    return numel // units, units, 1, numel // units >= MIN_UNIT_SAMPLES


def _inactive(y: Tensor, kind: str, module: nn.Module) -> Tensor:
    """Boolean mask of outputs whose local gradient is zero (or nearly so)."""
    if kind == "relu":
        return y <= 0
    if kind == "tanh":
        return y.abs() > _TANH_HIGH
    if kind == "sigmoid":
        # 4 y (1 - y) < SATURATION_DERIVATIVE, as bounds on y: two compares instead of four passes
        return (y < _SIGMOID_LOW) | (y > 1.0 - _SIGMOID_LOW)
    if kind == "hardtanh":
        lo, hi = _hard_bounds(module)
        return (y <= lo) | (y >= hi)
    # hardsigmoid: flat outside (-3, 3), where the output is exactly 0 or 1
    return (y <= 0) | (y >= 1)


def _hard_bounds(module: nn.Module) -> tuple[float, float]:
    return float(getattr(module, "min_val", -1.0)), float(getattr(module, "max_val", 1.0))


#: Family -> the compiled kernel's test (see ``activation_into`` in :mod:`gradscope.capture.kernels`):
#: 0 ``v <= a``; 1 ``|v| > a``; 2 ``v < a or v > b``; 3 ``v <= a or v >= b``; with its ``(a, b)``
#: (hardtanh reads its bounds from the module at each call). The same tests as :func:`_inactive`.
_KERNEL_TEST: dict[str, tuple[int, float, float]] = {
    "relu": (0, 0.0, 0.0),
    "tanh": (1, _TANH_HIGH, 0.0),
    "sigmoid": (2, _SIGMOID_LOW, 1.0 - _SIGMOID_LOW),
    "hardtanh": (3, -1.0, 1.0),
    "hardsigmoid": (3, 0.0, 1.0),
}


def _mask_into(y: Tensor, kind: str, module: nn.Module, out: Tensor) -> Tensor:
    """:func:`_inactive` as 0/1 in a float tensor ``out`` (on a CPU three times faster than a bool mask)."""
    if kind == "relu":
        return torch.le(y, 0, out=out)
    if kind == "tanh":
        return torch.gt(y.abs(), _TANH_HIGH, out=out)
    if kind == "sigmoid":
        lo, hi = _SIGMOID_LOW, 1.0 - _SIGMOID_LOW
    elif kind == "hardtanh":
        lo, hi = _hard_bounds(module)
    else:
        lo, hi = 0.0, 1.0
    # sigmoid: y < lo or y > hi; hardtanh, hardsigmoid: y <= lo or y >= hi (0/1: or is the maximum)
    strict = kind == "sigmoid"
    low = (torch.lt if strict else torch.le)(y, lo, out=out)
    high = (torch.gt if strict else torch.ge)(y, hi, out=torch.empty_like(out))
    return torch.maximum(low, high, out=out)


#: Below this many entries per unit (and in all), counts of a 0/1 float mask are exact in float32.
_EXACT_FLOAT32 = 2**24


def _unit_counts_cpu(y: Tensor, kind: str, module: nn.Module, geometry: tuple[int, int, int, bool]) -> Tensor:
    """:func:`_unit_counts` on a CPU without the compiled kernel: a float mask and float sums (exact counts).

    On a CPU, comparisons that write a bool tensor and sums of it are not vectorised: a float 0/1
    mask and two float reductions read the same output three times faster. Outputs with too many
    entries per unit for exact float32 sums take :func:`_unit_counts`.
    """
    outer, units, inner, per_unit = geometry
    if outer * inner >= _EXACT_FLOAT32 or (not per_unit and inner >= _EXACT_FLOAT32):
        return _unit_counts(y, kind, module, geometry)
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    mask = _mask_into(y, kind, module, torch.empty(y.shape, dtype=dtype))
    if not per_unit:
        return mask.sum().reshape(1)
    if inner == 1:
        return (mask if mask.dim() == 2 else mask.reshape(outer, units)).sum(dim=0)
    return mask.reshape(outer, units, inner).sum(dim=2).sum(dim=0)


def _unit_counts(y: Tensor, kind: str, module: nn.Module, geometry: tuple[int, int, int, bool]) -> Tensor:
    """Inactive entries per unit ``[units]`` (integer), or of the whole output ``[1]`` when there are no units.

    The operator path (accelerators; a CPU without the compiled kernel): a mask and one reduction of
    it, launched at hook time. One pass over the mask gives both statistics: the fraction of inactive
    entries (the sum of the counts), and the units inactive for every sample and position, which are
    dead (count == samples). What is left is a few numbers per unit, finished for every module of the
    step at once (:func:`_finish`).
    """
    outer, units, inner, per_unit = geometry
    inactive = _inactive(y, kind, module)  # one pass over the output, 1 byte per entry
    if not per_unit:
        return torch.count_nonzero(inactive).reshape(1)
    count_dtype = torch.int32 if outer * inner < 2**31 else torch.int64
    if inner == 1:
        if inactive.dim() != 2:
            inactive = inactive.reshape(outer, units)
        return inactive.sum(dim=0, dtype=count_dtype)
    return inactive.reshape(outer, units, inner).sum(dim=(0, 2), dtype=count_dtype)


@dataclass(frozen=True)
class _FinishPlan:
    """The constant tensors that finish the counts of one set of modules and shapes (cached per set)."""

    rows: Tensor  # [K] long: the modules' rows in the buffer's activation block
    segment: Tensor  # [T] long: which module each count belongs to (its position in the step's list)
    samples: Tensor  # [T] long: entries per unit (-1 where the module has no units)
    denom: Tensor  # [K, 2] float32: (numel, units) of each module
    columns: Tensor  # [3] long: (fraction, dead, fraction)
    mask: Tensor  # [K, 3] float32: 1 where a column applies, NaN where not
    whole: bool  # the rows are 0 .. n_act - 1 in order: the block is the whole activation row


_Part = tuple[int, str, tuple[int, int, int, bool]]  # (row, kind, geometry) of one measured module


def _finish_plan(parts: Sequence[_Part], device: torch.device, n_act: int) -> _FinishPlan:
    segment: list[int] = []
    samples: list[int] = []
    denom: list[tuple[float, float]] = []
    mask: list[tuple[float, float, float]] = []
    nan = float("nan")
    for k, (_, kind, (outer, units, inner, per_unit)) in enumerate(parts):
        width = units if per_unit else 1
        segment += [k] * width
        samples += [outer * inner if per_unit else -1] * width
        denom.append((float(max(outer * units * inner, 1)), float(units)))
        relu = kind == "relu"
        mask.append((1.0 if relu else nan, 1.0 if per_unit else nan, nan if relu else 1.0))

    def put(values: list[Any], dtype: torch.dtype) -> Tensor:
        # Made on the host and copied without a stream synchronisation (the plan is made inside a
        # forward pass, where an accelerator's host sync would be one per new set of shapes).
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    rows = [part[0] for part in parts]
    return _FinishPlan(
        rows=put(rows, torch.long),
        segment=put(segment, torch.long),
        samples=put(samples, torch.long),
        denom=put(denom, torch.float32),
        columns=put([0, 1, 0], torch.long),
        mask=put(mask, torch.float32),
        whole=rows == list(range(n_act)),
    )


def _finish(counts: list[Tensor], plan: _FinishPlan, acc: torch.dtype) -> Tensor:
    """``[K, 3]`` float32 statistics of K modules from their counts, in a fixed number of operators.

    The fraction of inactive entries is ``float32(total) / numel`` and the dead fraction
    ``float32(dead units) / units``, float32 divisions of exact counts (integers in ``acc``: float64,
    or float32 on MPS, exact up to 2**24), as the compiled kernel computes them.
    """
    if len(counts) == 1:
        flat = counts[0]
    else:
        if len({c.dtype for c in counts}) > 1:  # integer and float counts: both exact in acc
            counts = [c.to(acc) for c in counts]
        flat = torch.cat(counts)
    both = torch.stack((flat.to(acc), flat.eq(plan.samples).to(acc)), dim=1)  # [T, 2]: count, dead
    sums = torch.zeros(plan.denom.shape, dtype=acc, device=flat.device).index_add_(0, plan.segment, both)
    fractions = sums.float().div_(plan.denom)  # [K, 2]: inactive fraction, dead fraction
    return fractions.index_select(1, plan.columns).mul_(plan.mask)


def activation_statistics(
    y: Tensor, kind: str, module: nn.Module, channel_first_3d: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(act_zero_fraction, act_dead_fraction, act_saturated_fraction)`` of one output; NaN where not applicable.

    The statistics the monitor records (float32 values: its compiled and batched paths give the same
    numbers).

    Args:
        y: the module's output, ``[N, ...]`` with the batch first.
        kind: the module's family (:data:`ACTIVATION_KINDS`).
        module: the module (hard variants read their bounds).
        channel_first_3d: whether a 3-D output is ``[N, C, L]`` rather than ``[N, T, C]``.
    """
    return _statistics(y, kind, module, channel_first_3d, _unit_counts)


def _statistics(
    y: Tensor, kind: str, module: nn.Module, channel_first_3d: bool, counter: Callable[..., Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`activation_statistics` with the per-unit counts of ``counter`` (:func:`_unit_counts` or the CPU one)."""
    y = y.detach()
    geometry = _geometry(y.shape, y.numel(), channel_first_3d)
    counts = counter(y, kind, module, geometry)
    plan = _finish_plan([(0, kind, geometry)], y.device, 1)
    out = _finish([counts], plan, torch.float32 if y.device.type == "mps" else torch.float64)[0]
    return out[0], out[1], out[2]


def _cpu_kernel() -> Any:
    """The compiled CPU activation kernel (``activation_into``), or None: not built, or not in this build.

    Loaded with the moment kernel (:mod:`gradscope.capture.kernels`); nothing starts a compiler here.
    """
    getter = getattr(kernels, "cpu_activation_kernel", None)
    return getter() if getter is not None else None


class _Slot:
    """What the hook needs of one watched module, computed once (the hook runs for every module call)."""

    __slots__ = ("cf3", "index", "kind", "module", "test")

    def __init__(self, info: ActivationInfo, module: nn.Module) -> None:
        self.index = info.index
        self.kind = info.kind
        self.cf3 = info.channel_first_3d
        self.module = module
        self.test = _KERNEL_TEST[info.kind]


class _ForwardHook(WeakCall):
    """The global forward hook: the monitor's ``_on_slot`` for a watched module, weakly bound (a :class:`WeakCall`).

    Every module of every model calls it during a sampled step, so a module that is not watched
    returns after one dictionary lookup, before the monitor is even looked up.
    """

    __slots__ = ("_slots",)

    def __init__(self, monitor: ActivationMonitor, slots: dict[int, _Slot]) -> None:
        super().__init__(monitor, "_on_slot")
        self._slots = slots

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        slot = self._slots.get(id(module))
        if slot is None or slot.module is not module:
            return  # another module (another model, a deep copy): not watched
        monitor = self._ref() if self._ref is not None else None
        if monitor is not None:
            monitor._on_slot(slot, module, output)


class ActivationMonitor:
    """Registers a global forward hook on sampled steps and writes statistics into the device buffer.

    Cost of a sampled step, per watched module: on a CPU with the compiled kernel, one call that
    reads the output once and writes its statistics straight into the buffer row; otherwise a mask
    and one reduction (launched at hook time), and for all the modules of the step one finish and
    one write into the row (when the last watched module has run, or at the end of the step).
    Modules that are not watched return after one dictionary lookup; steps that are not sampled
    have no hook.

    Args:
        model: the watched module.
        hooks: the scope's hook manager (owns the handles).
    """

    GROUP = "activations"

    def __init__(self, model: nn.Module, hooks: HookManager) -> None:
        self.entries = find_activations(model)
        self._hooks = hooks
        # module identity -> its slot: the global hook measures these modules only (not a deep copy's)
        self._slots: dict[int, _Slot] = {id(m): _Slot(info, m) for info, m in self.entries}
        self._target: Callable[[], Tensor] | None = None
        self._view: Tensor | None = None  # target(), resolved at the first module of the step
        self._seen: set[int] = set()
        self._kernel: Any = None  # the compiled CPU kernel, looked up when armed
        # Counts launched at hook time, finished and written together (the operator path).
        self._counts: list[Tensor] = []
        self._parts: list[_Part] = []
        self._plans: dict[tuple[Any, ...], _FinishPlan] = {}
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
        self._view = None
        self._seen = set()
        if self.entries:
            # The compiled kernel writes into a CPU buffer only (the model's device: outputs on an
            # accelerator never reach it, so it is not tried there).
            self._kernel = _cpu_kernel() if target().device.type == "cpu" else None
            # Weakly bound: the global hook registry never keeps the monitor (and its scope) alive.
            hook = _ForwardHook(self, self._slots)
            self._hooks.add(self.GROUP, torch.nn.modules.module.register_module_forward_hook(hook))

    def retarget(self, target: Callable[[], Tensor]) -> None:
        """Point the armed hooks at another buffer row (the row moved during a flush)."""
        self._target = target
        self._view = None

    def disarm(self) -> None:
        """Write what is still pending and remove the hook (end of a sampled step)."""
        if self._target is None and not self._counts:
            return  # not armed (the ordinary step): arm() sets the target before it registers the hook
        if self._counts:
            self._write_pending()
        self._hooks.remove(self.GROUP)
        self._target = None
        self._view = None
        self._kernel = None

    def _on_slot(self, slot: _Slot, module: nn.Module, output: object) -> None:
        if torch.compiler.is_compiling():
            # Under torch.compile this hook is traced into the graph, and a write into a buffer row
            # would be frozen there (later steps would not land in their own rows). Measure nothing
            # and tell the scope, which then stops arming hooks (no graph break, no recompiles).
            self.compiled = True
            return
        index = slot.index
        seen = self._seen
        if not module.training or index in seen or self._target is None or not isinstance(output, Tensor):
            return
        numel = output.numel()
        if numel == 0:
            return
        seen.add(index)
        view = self._view
        if view is None:
            view = self._view = self._target()
        geometry = _geometry(output.shape, numel, slot.cf3)
        kernel = self._kernel
        if kernel is not None and type(output) is Tensor:  # (a tensor subclass: the operator path)
            code, a, b = slot.test
            if slot.kind == "hardtanh":
                a, b = _hard_bounds(module)
            outer, units, inner, per_unit = geometry
            y = output
            if (
                inner > 1
                and output.dim() == 4
                and not output.is_contiguous()
                and output.is_contiguous(memory_format=torch.channels_last)
            ):  # channels-last: [N, H, W, C] in memory, a contiguous view read as [N*H*W, C, 1] (same units)
                y, outer, inner = output.permute(0, 2, 3, 1), outer * inner, 1
            try:
                kernel(y, outer, units, inner, code, a, b, per_unit, view, index)
                return
            except (RuntimeError, TypeError, ValueError):  # checked before anything is written
                pass  # a non-contiguous output: the operator path below
        y = output.detach()
        count = _unit_counts_cpu if y.is_cpu else _unit_counts
        self._counts.append(count(y, slot.kind, module, geometry))
        self._parts.append((index, slot.kind, geometry))
        if len(seen) == len(self.entries):
            self._write_pending()  # the last watched module of the step: write now, once

    def _write_pending(self) -> None:
        """Finish the pending counts of the step and write their rows with one copy."""
        counts, parts = self._counts, self._parts
        self._counts, self._parts = [], []
        view = self._view
        if view is None:
            if self._target is None:
                return
            view = self._view = self._target()
        device = counts[0].device
        if any(c.device != device for c in counts):  # a model spread over devices
            device = view.device
            counts = [c.to(device) for c in counts]
        key = (device, *parts)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 64:  # shapes that change every step (variable sequence lengths)
                self._plans.clear()
            plan = self._plans[key] = _finish_plan(parts, device, view.shape[0])
        acc = torch.float32 if view.dtype == torch.float32 else torch.float64
        block = _finish(counts, plan, acc)
        if plan.whole:  # every module, in order (the common case)
            view.copy_(block)
        else:
            view.index_copy_(0, plan.rows.to(view.device), block.to(device=view.device, dtype=view.dtype))
