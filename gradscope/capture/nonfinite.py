"""Where a NaN came from: the module and the operation whose output or gradient first became non-finite.

Nothing here runs during training: no hook, no mode, no read until someone asks. Two ways to ask,
both through :meth:`gradscope.GradScope.locate_nonfinite`:

* **Replay** (a transient NaN, one bad batch): ``scope.locate_nonfinite((inputs, targets), loss_fn)``
  runs ``loss_fn(model(inputs), targets)`` and its backward again, on a deep copy of the model (the
  watched weights, buffers and ``.grad`` are never touched; the copy costs one more set of parameters
  and buffers while the replay runs; a model that cannot be copied is replayed itself, its buffers
  written back afterwards; the global random state is restored), with

  - forward: a pre/post hook on every module (which module is running) and a
    :class:`torch.overrides.TorchFunctionMode` that checks every operation's output: the first whose
    output holds NaN/Inf while its inputs were finite is the origin (or the first that consumed a
    non-finite parameter, or a non-finite value that came from outside, the batch);
  - backward: a hook on every node of the autograd graph (``Node.register_hook``), run through
    ``torch.autograd.grad`` (so ``.grad`` stays as it was): the first node whose incoming gradient
    was finite and whose outgoing gradient is not is the origin (a custom ``autograd.Function``'s
    backward, ``sqrt`` at 0...). The node is attributed to the module that created it in the forward.

* **Armed forward** (a persistent NaN, non-finite weights): ``scope.locate_nonfinite()`` without a
  batch arms the same forward checks for the model's next forward (one host read per operation,
  on that forward only), then removes every hook and mode it installed. Call it again afterwards
  to get the origin.

* **Automatic** (the default, :func:`auto_locate`): when the first ``nonfinite_gradients`` finding is
  confirmed (on a CPU at the step that produced it), the forward checks are armed for the model's
  next forward, with no call from the user, and the origin is added to that finding (its message
  and ``evidence["origin"]``, so the report, the JSON and the TensorBoard text show it) and logged.
  Nothing is installed before: a run without NaN never gets a module hook, a mode or a read. By
  then the optimizer has usually written NaN into every weight the NaN gradient reached, so the
  next forward would blame the first of them. On a CPU with an optimizer, the row of the step is
  host memory in the optimizer's pre-hook (one comparison of bytes per step, the check the live
  diagnosis makes anyway): at the first non-finite gradient the weights and buffers are copied
  *before* the update (one copy of the model's parameters and buffers, held until the next
  forward), and the next forward's inputs are run once more through the model with that copy
  (``torch.func.functional_call``) under the checks, then the copy is freed. Otherwise (an
  accelerator, no optimizer) the next forward itself is checked, and an origin that reads a
  non-finite parameter says that the update may have written it.

A non-finite value found in the forward pass is reported first (it came first, even when a later
``tanh`` or ``softmax`` absorbed it); the backward is searched when the forward was finite.
Values that are non-finite on purpose are not origins: an operation given a non-finite Python
number (``masked_fill(mask, float("-inf"))``), a registered buffer or a tensor from outside holding
only ``-inf`` (an additive attention mask) and what is computed from them, unless that computation
creates a NaN (a fully masked row's softmax).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode

from gradscope.capture.weakcall import WeakCall
from gradscope.findings import Finding

__all__ = ["LOSS", "NonfiniteLocator", "NonfiniteOrigin", "auto_locate", "locate_nonfinite", "tensor_stats"]

#: The "module" of operations that ran outside the model (in ``loss_fn``).
LOSS = "(loss function)"
_LOG = logging.getLogger("gradscope")
_DUNDER = {"truediv": "div", "rtruediv": "div", "floordiv": "div", "rpow": "pow", "radd": "add", "rsub": "sub"}
#: Uninitialised memory may hold NaN until it is filled: never an origin.
_UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
_MAX_NODES = 1_000_000  # a graph walk never runs away on a pathological graph


@dataclass(frozen=True)
class NonfiniteOrigin:
    """Where a NaN/Inf first appeared.

    Attributes:
        phase: ``"forward"`` (an operation's output) or ``"backward"`` (a gradient an autograd node computed).
        module: the module's path in the model (``"encoder.attn"``; ``""`` for the model itself), or
            ``"(loss function)"`` for an operation of ``loss_fn``.
        module_type: the module's class name (``"Linear"``), or ``"loss_fn"``.
        operation: forward: the torch function (``"log"``, ``"div"``, ``"linear"``); backward: the
            autograd node (``"SqrtBackward0"``, ``"MyFunctionBackward"``).
        cause: ``"operation"`` (finite inputs, non-finite result), ``"parameter"`` (it consumed a
            non-finite weight, named in ``parameter``) or ``"input"`` (it consumed a non-finite value
            that came from outside the model: the batch).
        step: the step it belongs to (the last step ``scope.step()`` ended, or the next one for an armed forward).
        input_stats: statistics of the module's input at that step (see :func:`tensor_stats`).
        operand_stats: statistics of the operation's first tensor input (forward), or of the incoming
            gradient (backward); None when there was none.
        message: one sentence saying all of the above.
        parameter: the non-finite parameter's name when ``cause == "parameter"``.
    """

    phase: str
    module: str
    module_type: str
    operation: str
    cause: str
    step: int
    input_stats: dict[str, Any] | None
    operand_stats: dict[str, Any] | None
    message: str
    parameter: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dictionary (the finding's evidence)."""
        return asdict(self)


def tensor_stats(t: Tensor) -> dict[str, Any]:
    """Shape, dtype, min and max of the finite entries, and counts of zeros, negatives, NaN, +Inf, -Inf.

    Args:
        t: any floating tensor (read in float64; one host read).

    Returns:
        ``{"shape", "dtype", "numel", "min", "max", "zeros", "negatives", "nan", "posinf", "neginf",
        "nonfinite"}``; ``min``/``max`` are None when no entry is finite.
    """
    x = t.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(x)
    fin = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    big = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    n_fin = finite.sum()
    row = torch.stack(
        [
            n_fin.to(x.dtype),
            torch.where(finite, x, big).min() if x.numel() else big,
            torch.where(finite, x, -big).max() if x.numel() else -big,
            (fin == 0).logical_and(finite).sum().to(x.dtype),
            (x < 0).sum().to(x.dtype),
            torch.isnan(x).sum().to(x.dtype),
            (x == math.inf).sum().to(x.dtype),
            (x == -math.inf).sum().to(x.dtype),
        ]
    )
    # sync point: statistics of one tensor, only while locating a NaN (on request).
    n, lo, hi, zeros, neg, nan, pinf, ninf = row.tolist()
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "numel": int(x.numel()),
        "min": lo if n else None,
        "max": hi if n else None,
        "zeros": int(zeros),
        "negatives": int(neg),
        "nan": int(nan),
        "posinf": int(pinf),
        "neginf": int(ninf),
        "nonfinite": int(nan + pinf + ninf),
    }


def _tensors(obj: Any, depth: int = 0) -> Iterator[Tensor]:
    """Floating (or complex) tensors in nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif depth < 4 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)


def _has_nonfinite_number(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if depth < 3 and isinstance(obj, (tuple, list)):
        return any(_has_nonfinite_number(o, depth + 1) for o in obj)
    if depth < 3 and isinstance(obj, dict):
        return any(_has_nonfinite_number(o, depth + 1) for o in obj.values())
    return False


def _finite(t: Tensor) -> bool:
    # sync point: one finiteness flag per checked tensor, only while locating a NaN (on request).
    return bool(torch.isfinite(t).all())


def _has_nan(t: Tensor) -> bool:
    # sync point: only for a tensor already found non-finite, while locating a NaN.
    return bool(torch.isnan(t).any())


def _only_neginf(t: Tensor) -> bool:
    # sync point: only for a tensor already found non-finite, while locating a NaN.
    return bool((t == -math.inf).sum() == (~torch.isfinite(t)).sum())


def _op_name(func: Any) -> str:
    name = str(getattr(func, "__name__", None) or func)
    if name.startswith("__") and name.endswith("__"):
        name = name.strip("_")
        name = _DUNDER.get(name, name)
    return name


@dataclass
class _Event:
    module: str
    operation: str
    cause: str
    operand_stats: dict[str, Any] | None
    input_stats: dict[str, Any] | None
    parameter: str | None = None


class _FiniteMode(TorchFunctionMode):
    """Checks the output of every torch function call while the checks run."""

    def __init__(self, checks: _Checks) -> None:
        super().__init__()
        self._checks = checks

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self._checks.paused:
            self._checks.after_op(func, args, kwargs or {}, out)
        return out


class _Checks:
    """Finiteness checks for one forward (module hooks + a function mode) and one backward (node hooks).

    Args:
        model: the module to check (every submodule gets a pre-hook and an always-called post-hook).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.paths: dict[int, tuple[str, nn.Module]] = {id(m): (name, m) for name, m in model.named_modules()}
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self.buffer_ids = {id(b) for b in model.buffers()}
        self.stack: list[tuple[str, set[Any]]] = []
        self.inputs: dict[str, Tensor] = {}
        self.owner: dict[Any, tuple[str, str]] = {}
        self.deliberate: dict[int, Tensor] = {}  # id -> tensor (kept alive so an id is never reused)
        self.forward: _Event | None = None
        self.backward: _Event | None = None
        self.paused = False
        self.mode = _FiniteMode(self)
        self.handles: list[Any] = []

    # -- install / remove ----------------------------------------------------------------------------
    def install(self) -> None:
        """Register the module hooks (the mode is entered separately)."""
        for _, (_, module) in self.paths.items():
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post, always_call=True))

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # -- forward -------------------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: Any) -> None:
        self.paused = True
        try:
            path = self.paths.get(id(module), ("?", module))[0]
            ins = list(_tensors(args))
            if ins and path not in self.inputs:
                self.inputs[path] = ins[0]
            self.stack.append((path, {t.grad_fn for t in ins if t.grad_fn is not None}))
        finally:
            self.paused = False

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.paused = True
        try:
            if not self.stack:
                return
            path, stop = self.stack.pop()
            # Nodes the mode did not see (a custom autograd.Function's own node) belong to this module.
            todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
            seen = 0
            while todo and seen < _MAX_NODES:
                node = todo.pop()
                seen += 1
                if node is None or node in stop or node in self.owner:
                    continue
                self.owner[node] = (path, node.name())
                todo.extend(n for n, _ in node.next_functions if n is not None)
        finally:
            self.paused = False

    def current(self) -> str:
        """The innermost module running now (or the loss function)."""
        return self.stack[-1][0] if self.stack else LOSS

    def after_op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        """Attribute the op's autograd node to the running module; check its output until an origin is found."""
        self.paused = True
        try:
            outs = list(_tensors(out))
            if not outs:
                return
            name, path = _op_name(func), self.current()
            for t in outs:
                node = t.grad_fn
                if node is not None and node not in self.owner:
                    self.owner[node] = (path, name)
            if self.forward is None:
                self._check(name, path, outs, args, kwargs)
        finally:
            self.paused = False

    def _check(self, name: str, path: str, outs: list[Tensor], args: Any, kwargs: Any) -> None:
        bad = [t for t in outs if not _finite(t)]
        if not bad:
            return
        if name in _UNINITIALISED:
            self._keep(bad)  # uninitialised memory may hold NaN until it is filled
            return
        # An in-place operation's input is its output, already overwritten: its prior state is unknown.
        ins = [t for t in _tensors((args, kwargs)) if not any(t is o for o in outs)]
        bad_ins = [t for t in ins if not _finite(t)]
        params = [t for t in bad_ins if id(t) in self.param_names]
        on_purpose = {
            id(t)
            for t in bad_ins
            if id(t) in self.deliberate
            or id(t) in self.buffer_ids
            or (id(t) not in self.param_names and _only_neginf(t))
        }  # computed from a deliberate -inf, a mask buffer, an additive -inf mask passed in
        outside = [t for t in bad_ins if id(t) not in self.param_names and id(t) not in on_purpose]
        if params:
            self._found(path, name, "parameter", params[0], self.param_names[id(params[0])])
        elif outside:
            self._found(path, name, "input", outside[0])
        elif not bad_ins:
            if _has_nonfinite_number((args, kwargs)):
                self._keep(bad)  # masked_fill(mask, -inf), full(..., -inf): on purpose
            else:
                self._found(path, name, "operation", ins[0] if ins else None)
        elif any(_has_nan(t) for t in bad) and not any(_has_nan(t) for t in bad_ins):
            # only deliberate -inf went in, and a NaN came out (inf - inf, a fully masked softmax)
            self._found(path, name, "operation", ins[0] if ins else None)
        else:
            self._keep(bad)

    def _found(self, path: str, name: str, cause: str, operand: Tensor | None, parameter: str | None = None) -> None:
        # Read now: a later in-place operation could change the tensors.
        inp = self.inputs.get(path)
        self.forward = _Event(
            path, name, cause,
            tensor_stats(operand) if operand is not None else None,
            tensor_stats(inp) if inp is not None else None,
            parameter,
        )  # fmt: skip

    def _keep(self, tensors: list[Tensor]) -> None:
        for t in tensors:
            self.deliberate[id(t)] = t

    # -- backward ------------------------------------------------------------------------------------
    def hook_graph(self, root: Any) -> None:
        """A hook on every node reachable from ``root`` (a ``grad_fn``)."""
        seen: set[Any] = set()
        todo = [root]
        while todo and len(seen) < _MAX_NODES:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            self.handles.append(node.register_hook(self._node_hook(node)))
            todo.extend(n for n, _ in node.next_functions if n is not None)

    def _node_hook(self, node: Any) -> Callable[[Any, Any], None]:
        ref = weakref.ref(self)

        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            checks = ref()
            if checks is None or checks.backward is not None:
                return
            gin, gout = list(_tensors(grad_inputs)), list(_tensors(grad_outputs))
            bad_in = [t for t in gin if not _finite(t)]
            if not bad_in:
                return
            bad_out = [t for t in gout if not _finite(t)]
            if bad_out and (any(_has_nan(t) for t in bad_out) or not any(_has_nan(t) for t in bad_in)):
                return  # it passed on what it was given
            path, _ = checks.owner.get(node, (LOSS, ""))
            inp = checks.inputs.get(path)
            checks.backward = _Event(
                path, node.name(), "operation",
                tensor_stats(gout[0]) if gout else None,
                tensor_stats(inp) if inp is not None else None,
            )  # fmt: skip

        return hook


# -- the origin ------------------------------------------------------------------------------------------
def _origin(checks: _Checks, event: _Event, phase: str, step: int) -> NonfiniteOrigin:
    path = event.module
    module = checks.paths[id(checks.model)][1] if path == "" else None
    if path not in ("", LOSS):
        module = dict(checks.model.named_modules()).get(path)
    module_type = "loss_fn" if path == LOSS else type(module).__name__ if module is not None else "?"
    in_stats, op_stats = event.input_stats, event.operand_stats
    where = f"{module_type} {path!r}" if path not in ("", LOSS) else ("the model itself" if path == "" else LOSS)
    if phase == "forward":
        what = {
            "operation": f"`{event.operation}` turned finite inputs into NaN/Inf",
            "parameter": f"`{event.operation}` read the non-finite parameter {event.parameter!r}",
            "input": f"`{event.operation}` received a non-finite input from outside the model (the batch)",
        }[event.cause]
    else:
        what = f"the backward of `{event.operation}` turned a finite incoming gradient into NaN/Inf"
    stats = f" The module's input: {_describe(in_stats)}." if in_stats is not None else ""
    if op_stats is not None and op_stats != in_stats:
        whose = "the operation's input" if phase == "forward" else "the incoming gradient"
        stats += f" {whose[0].upper()}{whose[1:]}: {_describe(op_stats)}."
    message = f"First non-finite value at step {step}, {phase} pass: in {where}, {what}.{stats}"
    return NonfiniteOrigin(
        phase=phase, module=path, module_type=module_type, operation=event.operation, cause=event.cause,
        step=step, input_stats=in_stats, operand_stats=op_stats, message=message, parameter=event.parameter,
    )  # fmt: skip


def _describe(stats: dict[str, Any]) -> str:
    def num(v: float | None) -> str:
        return "none finite" if v is None else f"{v:.4g}"

    return (
        f"min {num(stats['min'])}, max {num(stats['max'])}, {stats['zeros']} zeros, {stats['negatives']} negatives, "
        f"{stats['nonfinite']} non-finite of {stats['numel']}"
    )


def _replica(model: nn.Module) -> tuple[nn.Module, dict[str, Tensor] | None]:
    """A deep copy without the ``.grad`` tensors (gradscope's own hooks are inert in a copy).

    A model that cannot be deep-copied (a lock, a handle among its attributes) is replayed itself:
    then a snapshot of its buffers (returned) is written back afterwards (BatchNorm's running
    statistics), the weights are only read and ``torch.autograd.grad`` leaves ``.grad`` alone.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if p.grad is not None:
            memo[id(p.grad)] = None
    try:
        return copy.deepcopy(model, memo), None
    except Exception:
        return model, {name: b.detach().clone() for name, b in model.named_buffers()}


def _replay(model: nn.Module, batch: Any, loss_fn: Callable[[Any, Any], Tensor], step: int) -> NonfiniteOrigin | None:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not callable(loss_fn):
        from gradscope.errors import ConfigurationError

        raise ConfigurationError(
            "scope.locate_nonfinite(batch, loss_fn) expects batch=(inputs, targets) and a callable "
            f"loss_fn(model(inputs), targets); got batch of type {type(batch).__name__} and loss_fn={loss_fn!r}."
        )
    inputs, targets = batch
    replica, buffers = _replica(model)
    checks = _Checks(replica)
    devices = sorted({p.device.index or 0 for p in replica.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        checks.install()
        try:
            with checks.mode:
                out = replica(inputs)
                outs = list(_tensors(out))
                if outs:
                    checks.inputs[LOSS] = outs[0]
                loss = loss_fn(out, targets)
            if checks.forward is not None:  # first in time, even when later operations absorbed it (tanh)
                return _origin(checks, checks.forward, "forward", step)
            params = [p for p in replica.parameters() if p.requires_grad]
            if loss.requires_grad and params:
                checks.hook_graph(loss.grad_fn)
                torch.autograd.grad(loss.sum(), params, allow_unused=True)
            return _origin(checks, checks.backward, "backward", step) if checks.backward is not None else None
        finally:
            checks.remove()
            if buffers is not None:
                with torch.no_grad():
                    for name, b in replica.named_buffers():
                        if name in buffers:
                            b.copy_(buffers[name])


class NonfiniteLocator:
    """Finds where a NaN came from for one scope; installs nothing until asked (or until the first NaN).

    Args:
        scope: the :class:`gradscope.GradScope` (held weakly).
    """

    GROUP = "nonfinite-locator"

    def __init__(self, scope: Any) -> None:
        self._scope = weakref.ref(scope)
        self.origin: NonfiniteOrigin | None = None
        self._armed: _Checks | None = None
        self._finding: Finding | None = None  # the finding an automatic arming amends
        self._before: dict[str, Tensor] | None = None  # parameters and buffers before the update that wrote NaN
        self._before_step: int | None = None
        self._replaying = False

    @property
    def armed(self) -> bool:
        """True while checks wait for the model's next forward."""
        return self._armed is not None

    def replay(self, batch: Any, loss_fn: Callable[[Any, Any], Tensor]) -> NonfiniteOrigin | None:
        """Run ``batch`` again under the checks (see the module docstring); record and return the origin."""
        scope = self._scope()
        if scope is None:
            return None
        origin = _replay(scope.module, batch, loss_fn, max(scope.step_count, 1))
        if origin is not None:
            self.disarm()  # an arming still waiting for the next forward has nothing left to find
            self._deliver(scope, origin, asked=True)
        return origin

    def arm(self) -> None:
        """Check the model's next forward (non-finite weights); the hooks go after it."""
        scope = self._scope()
        if scope is None or self._armed is not None:
            return
        checks = _Checks(scope.module)
        hooks = scope._hooks
        # Order matters: the gate's pre-hook runs before the checks' own, its post-hook after theirs.
        hooks.add(self.GROUP, scope.module.register_forward_pre_hook(WeakCall(self, "_gate_pre"), with_kwargs=True))
        checks.install()
        for handle in checks.handles:  # the scope's manager owns them too: close() removes an unused arming
            hooks.add(self.GROUP, handle)
        hooks.add(self.GROUP, scope.module.register_forward_hook(WeakCall(self, "_gate_post"), always_call=True))
        self._armed = checks

    def disarm(self) -> None:
        """Remove every hook of an armed check (idempotent)."""
        scope = self._scope()
        if self._armed is not None:
            self._armed.remove()
            self._armed = None
        if scope is not None:
            scope._hooks.remove(self.GROUP)

    # -- automatic ---------------------------------------------------------------------------------------
    def _before_update(self) -> None:
        """Copy the weights before an update that would write NaN into them (one copy per run).

        Called by the recorder's optimizer pre-hook once it has captured the step's gradients; after the
        copy the recorder drops the call.
        """
        scope = self._scope()
        if scope is None or self._before is not None or self._finding is not None or self.origin is not None:
            return
        if scope._diagnosis.pending_finite():
            return
        module = scope.module
        with torch.no_grad():
            # tied parameters are listed once, under their first name: functional_call ties them again
            before = {name: p.detach().clone() for name, p in module.named_parameters()}
            before.update({name: b.detach().clone() for name, b in module.named_buffers()})
        self._before, self._before_step = before, scope._recorder.pending.step
        scope._recorder.before_update = None

    def _auto_arm(self, finding: Finding) -> None:
        """The first ``nonfinite_gradients`` finding is confirmed: check the next forward, amend the finding."""
        scope = self._scope()
        if scope is None or self.origin is not None or scope.closed:
            return
        self._finding = finding
        self.arm()

    # -- the armed forward ---------------------------------------------------------------------------------
    def _gate_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        checks = self._armed
        if checks is None or self._replaying:
            return
        if self._before is None:
            checks.mode.__enter__()
            return
        # The weights as they were before the update that wrote NaN, with this forward's inputs: the
        # forward is run once more, on the side, under the checks; the user's forward runs unchecked.
        self._replaying = True
        before, self._before = self._before, None
        devices = sorted({p.device.index or 0 for p in before.values() if p.device.type == "cuda"})
        names = set(checks.param_names.values())
        for name, t in before.items():  # the copies stand for the parameters and buffers they copy
            if name in names:
                checks.param_names[id(t)] = name
            else:
                checks.buffer_ids.add(id(t))
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), checks.mode:
                torch.func.functional_call(module, before, args, kwargs, strict=False)
        except Exception as exc:  # a forward that fails on the side: the checks have what they found
            _LOG.info("gradscope: the forward replayed to locate the NaN raised %s: %s", type(exc).__name__, exc)
        finally:
            self._replaying = False
            del before
            self._finish(checks)

    def _gate_post(self, module: nn.Module, args: Any, output: Any) -> None:
        checks = self._armed
        if checks is None or self._replaying:
            return
        checks.mode.__exit__(None, None, None)
        self._finish(checks)

    def _finish(self, checks: _Checks) -> None:
        self.disarm()
        scope = self._scope()
        if scope is None:
            return
        step = self._before_step if self._before_step is not None else scope.step_count + 1
        if checks.forward is None:
            _LOG.info("gradscope: the forward checked for NaN/Inf was finite (a transient NaN: replay its batch).")
            return
        origin = _origin(checks, checks.forward, "forward", step)
        if self._finding is not None and self._before_step is None and origin.cause == "parameter":
            origin = dataclasses.replace(
                origin,
                message=origin.message
                + " The optimizer's update with the non-finite gradient may have written that parameter: the "
                "first layer in backward order holding NaN/Inf is the better lead.",
            )
        self._deliver(scope, origin, asked=self._finding is None)

    def _deliver(self, scope: Any, origin: NonfiniteOrigin, *, asked: bool) -> None:
        """Add the origin to the ``nonfinite_gradients`` finding; a finding of its own when there is none."""
        self.origin = origin
        existing = next((f for f in scope.engine.findings if f.kind == "nonfinite_gradients"), None)
        if existing is not None and "origin" in existing.evidence:
            return
        # Asked for (a replay, an arming by hand): a warning. Found on its own: the finding it amends was
        # announced already (at its own level), so the origin is logged at INFO.
        _LOG.log(logging.WARNING if asked else logging.INFO, "gradscope: %s", origin.message)
        if existing is not None:
            amended = dataclasses.replace(
                existing,
                message=f"{existing.message} Origin: {origin.message}",
                evidence={**existing.evidence, "origin": origin.to_dict()},
            )
            scope._diagnosis.amend(existing, amended)
            self._finding = amended
            return
        layer = origin.module if origin.module not in ("", LOSS) else None
        scope.engine.findings.append(
            Finding(
                kind="nonfinite_gradients",
                severity="error",
                step=origin.step,
                layer=layer,
                message=origin.message,
                suggestion=(
                    "Guard the operation named: add an epsilon or clamp its input (log, sqrt, division, acos, "
                    "pow), subtract the row maximum before exp, check the batch for NaN/Inf."
                ),
                evidence={"origin": origin.to_dict()},
            )
        )
        scope.engine.findings.sort(key=lambda f: f.step)


_LOCATORS: weakref.WeakKeyDictionary[Any, NonfiniteLocator] = weakref.WeakKeyDictionary()


def _locator(scope: Any) -> NonfiniteLocator:
    locator = _LOCATORS.get(scope)
    if locator is None:
        locator = _LOCATORS[scope] = NonfiniteLocator(scope)
    return locator


def auto_locate(scope: Any) -> None:
    """Locate the origin of the first NaN automatically (see the module docstring); call after the hooks attach.

    Sets the scope's ``Diagnosis.first_nonfinite`` (arm the next forward when the first
    ``nonfinite_gradients`` finding is confirmed) and, on a CPU buffer with an optimizer, the
    recorder's ``before_update``: its optimizer pre-hook, once it has captured the gradients, copies
    the weights before an update that would write NaN into them. No module hook is installed until then.

    Args:
        scope: the :class:`gradscope.GradScope`, its parts built and attached (again after a re-layout).
    """
    locator = _locator(scope)
    diagnosis = scope._diagnosis
    diagnosis.first_nonfinite = WeakCall(locator, "_auto_arm")
    recorder = scope._recorder
    # Called from the recorder's own pre-hook (one hook per optimizer step, not two). Not with
    # on_nonfinite="raise": its guard stops the step before the update, the weights stay as they were.
    done = locator._before is not None or locator._finding is not None or locator.origin is not None
    wanted = recorder.optimizer is not None and recorder.buffer.device.type == "cpu" and scope._guard is None
    recorder.before_update = WeakCall(locator, "_before_update") if wanted and not done else None


def locate_nonfinite(
    scope: Any, batch: Any = None, loss_fn: Callable[[Any, Any], Tensor] | None = None
) -> NonfiniteOrigin | None:
    """``GradScope.locate_nonfinite``: replay ``batch``, or arm the next forward (see the module docstring)."""
    locator = _locator(scope)
    if batch is not None:
        if loss_fn is None:
            from gradscope.errors import ConfigurationError

            raise ConfigurationError(
                "scope.locate_nonfinite(batch) needs loss_fn too: loss_fn(model(inputs), targets) -> loss."
            )
        return locator.replay(batch, loss_fn)
    if locator.origin is None:
        if scope.closed:
            from gradscope.errors import ConfigurationError

            raise ConfigurationError(
                "scope.locate_nonfinite() cannot arm a closed scope; pass the batch to replay it: "
                "scope.locate_nonfinite((inputs, targets), loss_fn)."
            )
        locator.arm()
    return locator.origin
