"""The other side of the comparison: autograd on a copy of the model, observed module by module.

Parameter gradients come from ``torch.autograd.grad`` (never ``.backward()``, so no ``.grad`` is written
and no post-accumulate hook fires). To observe the gradient at each module's input without changing
what autograd computes, a forward pre-hook hands every module a *view* of its input and hooks that
view: a view shares storage and version counter with the original, so in-place writes (even through
``.data``) still reach the tensors autograd saved, exactly as in the unobserved model, yet the view's
gradient counts only the paths through this module. The same pre-hook snapshots the random state,
from which the forward hook of an ``nn.Dropout`` rebuilds the mask it drew.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gradscope.errors import ConfigurationError
from gradscope.reference.backprop import CallKey
from gradscope.reference.dropout import DROPOUT_FUNCTIONS, draw_keep_mask
from gradscope.reference.rng import RngState, capture_rng, replay_rng

__all__ = ["AutogradResult", "run_autograd", "summarise"]


@dataclass
class AutogradResult:
    """What autograd computed for one batch, in the shapes :class:`~gradscope.reference.backprop.BackpropResult` uses.

    Attributes:
        loss: the 0-d loss.
        output_grad: d loss / d model output (``None`` if the output does not require grad).
        param_grads: d loss / d parameter for every parameter with ``requires_grad``, by name; a
            parameter that autograd found unused gets zeros.
        input_grads: d loss / d input of each module call whose input requires grad and stayed observable.
        watched: the module calls whose input required grad, so that its gradient was hooked.
        outputs: each module call's forward output (a copy, taken when the call returned).
        masks: the keep mask each ``nn.Dropout`` call in training mode drew.
        rng_states: the random state just before each module call.
    """

    loss: Tensor
    output_grad: Tensor | None
    param_grads: dict[str, Tensor] = field(default_factory=dict)
    input_grads: dict[CallKey, Tensor] = field(default_factory=dict)
    watched: set[CallKey] = field(default_factory=set)
    outputs: dict[CallKey, Tensor] = field(default_factory=dict)
    masks: dict[CallKey, Tensor] = field(default_factory=dict)
    rng_states: dict[CallKey, RngState] = field(default_factory=dict)


class _Observer:
    """Owns the hooks on the model copy and what they record; :meth:`close` removes every hook."""

    def __init__(self, model: nn.Module, result: AutogradResult) -> None:
        self.result = result
        self.paths: dict[int, list[str]] = defaultdict(list)
        for path, module in model.named_modules(remove_duplicate=False):
            self.paths[id(module)].append(path)
        self.seen: Counter[int] = Counter()
        self.calls: Counter[str] = Counter()
        self.running: dict[int, list[CallKey]] = defaultdict(list)
        self.producers: dict[int, tuple[Any, int]] = {}
        self.inputs: dict[CallKey, tuple[Tensor, int]] = {}
        self.keep: list[Tensor] = []
        self.handles = []
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(self._before))
            self.handles.append(module.register_forward_hook(self._after))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _key(self, module: nn.Module) -> CallKey:
        # A module reachable under several paths (shared) takes them in turn, in tree order.
        paths = self.paths[id(module)]
        path = paths[self.seen[id(module)] % len(paths)]
        self.seen[id(module)] += 1
        key = (path, self.calls[path])
        self.calls[path] += 1
        return key

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        key = self._key(module)
        self.running[id(module)].append(key)
        first = next((a for a in args if isinstance(a, Tensor)), None)
        self.result.rng_states[key] = capture_rng(first.device if first is not None else torch.device("cpu"))
        views: dict[int, Tensor] = {}
        observed = False
        new_args = []
        for arg in args:
            if isinstance(arg, Tensor) and arg.is_floating_point() and arg.requires_grad:
                if id(arg) not in views:  # attention's (x, x, x) must stay one tensor: x is x is x
                    view = views[id(arg)] = arg.view_as(arg)
                    # The node that produced the input, before any view of ours: an in-place write
                    # rebases every view's history, but that node stays in the graph.
                    self.producers[id(view)] = self.producers.get(id(arg), (arg.grad_fn, arg.output_nr))
                    self.keep.append(view)  # ids stay unique while the run lasts
                    if not observed:  # the first tensor argument is the input the reference sees
                        view.register_hook(self._recorder(key))
                        self.result.watched.add(key)
                        self.inputs[key] = (view, view._version)
                        observed = True
                new_args.append(views[id(arg)])
            else:
                new_args.append(arg)
        return tuple(new_args)

    def _node_recorder(self, key: CallKey, index: int) -> Callable[[tuple[Tensor | None, ...]], None]:
        def record(grad_outputs: tuple[Tensor | None, ...]) -> None:
            grad = grad_outputs[index] if index < len(grad_outputs) else None
            if grad is not None and key not in self.result.input_grads:
                self.result.input_grads[key] = grad.detach().clone()

        return record

    def _recorder(self, key: CallKey) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:
            self.result.input_grads[key] = grad.detach().clone()

        return record

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        key = self.running[id(module)].pop()
        watched = self.inputs.pop(key, None)
        if watched is not None and watched[0]._version != watched[1]:
            # The module wrote into its input (ReLU6(inplace=True)): the hook on the view will not fire.
            # The gradient of the input's old value reaches the node that produced it; read it there.
            node, index = self.producers.get(id(watched[0]), (None, 0))
            if node is not None:
                node.register_prehook(self._node_recorder(key, index))
        out = output[0] if isinstance(output, tuple) and output else output
        if isinstance(out, Tensor):
            self.result.outputs[key] = out.detach().clone()
        if args and isinstance(args[0], Tensor) and type(module) in DROPOUT_FUNCTIONS:
            # Draw again from the state the module drew from: same shape, same generator, same mask.
            with replay_rng(self.result.rng_states[key]):
                mask = draw_keep_mask(module, args[0])
            if mask is not None:
                self.result.masks[key] = mask


def summarise(error: BaseException, limit: int = 300) -> str:
    """The user's error in one line: its type and the first line of its message, shortened."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}".rstrip(": ") + ("" if text.endswith(".") else ".")


def _target_hint(output: Tensor, targets: Any) -> str:
    """What to check about the targets, with the offending range when class indices are out of it."""
    hint = " Check the targets against the model output (shape, dtype, and class indices in [0, C))."
    if isinstance(targets, Tensor) and not targets.is_floating_point() and targets.numel() and output.dim() >= 1:
        classes = output.shape[1] if output.dim() >= 2 else output.shape[0]
        valid = targets[targets != -100]  # the default ignore_index
        # sync point: verify is a one-off check and the loss already failed; the range goes in the message.
        low, high = (int(valid.min()), int(valid.max())) if valid.numel() else (0, 0)
        if low < 0 or high >= classes:
            hint = (
                f" The targets hold class indices from {low} to {high}, but the model output has {classes} "
                f"classes (dim 1 of shape {list(output.shape)}): indices must lie in [0, {classes})."
            )
    return hint


def run_autograd(
    model: nn.Module, inputs: Tensor, targets: Any, loss_fn: Callable[[Tensor, Any], Tensor]
) -> AutogradResult:
    """Forward and backward of ``model`` with autograd, recording every module call's input gradient.

    Args:
        model: the model copy to run (hooks are added for the call and removed before returning).
        inputs: the batch's inputs; a floating-point input is differentiated too.
        targets: the batch's targets.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the scalar loss.

    Returns:
        An :class:`AutogradResult`.
    """
    result = AutogradResult(loss=torch.zeros(()), output_grad=None)
    leaf = inputs.detach().requires_grad_(inputs.is_floating_point())
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    observer = _Observer(model, result)
    try:
        with torch.enable_grad():
            # A copy, so that a first layer writing into its input (ReLU(inplace=True)) writes into a
            # non-leaf tensor, as it would in training where inputs do not require grad.
            try:
                output = model(leaf.clone() if leaf.requires_grad else leaf)
            except Exception as error:
                raise ConfigurationError(
                    f"The model failed on the batch, before anything could be compared: {summarise(error)} "
                    "Check that the inputs fit the model (shape, dtype, device, index range): verify calls "
                    "model(inputs) with the batch's inputs as one tensor."
                ) from error
            if not isinstance(output, Tensor):
                logits = getattr(output, "logits", None)
                hint = (
                    " It has a `.logits` tensor: verify a wrapper whose forward returns `.logits`, for example "
                    "`class Logits(nn.Module): def forward(self, ids): return self.model(ids).logits`."
                    if isinstance(logits, Tensor)
                    else ""
                )
                raise ConfigurationError(
                    f"Expected the model to return a tensor, but it returned {type(output).__name__}. verify "
                    f"compares models called as loss_fn(model(inputs), targets) with a tensor output.{hint}"
                )
            if output.requires_grad:
                output.register_hook(lambda grad: setattr(result, "output_grad", grad.detach().clone()))
            try:
                loss = loss_fn(output, targets)
            except Exception as error:
                raise ConfigurationError(
                    f"loss_fn(model(inputs), targets) failed, before anything could be compared: "
                    f"{summarise(error)}{_target_hint(output, targets)}"
                ) from error
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                got = f"shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
                raise ConfigurationError(
                    f"Expected loss_fn(model(inputs), targets) to return a 0-d tensor, but got {got}. Use "
                    "reduction='mean' or 'sum'."
                )
            wanted = ([leaf] if leaf.requires_grad else []) + [p for _, p in params]
            if not wanted or not loss.requires_grad:
                raise ConfigurationError(
                    "Nothing to verify: no parameter of the model requires grad and the inputs are not "
                    "floating point. Unfreeze at least one parameter."
                )
            try:
                grads = torch.autograd.grad(loss, wanted, allow_unused=True)
            except RuntimeError as error:
                raise RuntimeError(
                    f"Autograd's own backward failed on the model, before any comparison (it fails in training "
                    f"too): {error}"
                ) from error
    finally:
        observer.close()
    result.loss = loss.detach()
    for (name, param), grad in zip(params, grads[len(wanted) - len(params) :]):
        if grad is None:
            grad = torch.zeros_like(param)
        result.param_grads[name] = grad.to_dense() if grad.is_sparse else grad
    return result
