"""The reference pass: walk the model's modules, run each reference forward, then each backward.

This is backpropagation with the graph made of modules instead of scalar operations. The forward
visits the module tree from the root; every call of a module becomes a :class:`Node` that holds the
module's reference (see :mod:`gradscope.reference.base`). The loss reference then seeds
g = d loss / d output, and the root node's backward sends g back down the same tree: each node turns
the gradient of its output into the gradient of its input, and records the gradients of its
parameters on the way. Autograd is off for the whole pass, and every node checks that it stays off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from gradscope.errors import ConfigurationError, UnsupportedLayerError
from gradscope.reference.base import GradientOrSample, LossReference, ParamGrads, ReferenceLayer
from gradscope.reference.finite_difference import FiniteDifferenceConfig, FiniteDifferenceReference
from gradscope.reference.losses import resolve_loss
from gradscope.reference.registry import REFERENCES
from gradscope.reference.rng import RngState
from gradscope.reference.sampled import DirectionalGradient, SampledGradient

__all__ = ["BackpropResult", "CallKey", "Node", "Tape", "display_name", "manual_backward", "run_reference"]

#: One call of one module: its path in the model and which call it is (0 for the first).
CallKey = tuple[str, int]

#: ``masks`` may be keyed by path (the first call) or by ``(path, call)``.
MaskKey = Union[str, CallKey]

#: Dropout keep masks by :data:`MaskKey`; spelled as a union because a ``Mapping``'s key type is invariant,
#: so ``{"2": mask}`` is a ``Mapping[str, Tensor]`` and not a ``Mapping[MaskKey, Tensor]``.
Masks = Union[Mapping[str, Tensor], Mapping[CallKey, Tensor], Mapping[MaskKey, Tensor]]


def display_name(key: CallKey) -> str:
    """How a module call is named in reports: its path, ``(model)`` for the root, ``[call 2]`` for repeats."""
    path, call = key
    name = path or "(model)"
    return name if call == 0 else f"{name} [call {call + 1}]"


def supported_types() -> list[str]:
    """Names of the module types with a layer reference, sorted (losses excluded)."""
    return sorted(
        t.__name__ for t, cls in REFERENCES.items() if isinstance(cls, type) and issubclass(cls, ReferenceLayer)
    )


def _unsupported_message(module: nn.Module, path: str) -> str:
    kind = type(module).__name__
    where = f"module {path!r}" if path else "the model itself"
    hint = ""
    if next(module.children(), None) is not None:
        hint = (
            f" {kind}.forward is custom code that the reference cannot read: build the model from "
            "nn.Sequential and Residual blocks, or register a composite reference whose forward and "
            "backward call self.child(name) for each submodule (see docs/verify.md)."
        )
    return (
        f"No reference backward for {where} ({kind}). Supported: {', '.join(supported_types())}.{hint} "
        f"Register one with @gradscope.register_reference({kind}), or pass on_unsupported='finite_difference'."
    )


def _require_autograd_off(where: str) -> None:
    if torch.is_grad_enabled():
        raise AssertionError(
            f"The reference pass reached {where} with autograd enabled; it must run under torch.no_grad() "
            "so that no gradient in it comes from autograd."
        )


def _require_plain(tensor: Tensor, what: str) -> None:
    if tensor.requires_grad or tensor.grad_fn is not None:
        raise AssertionError(f"{what} is attached to an autograd graph; references must use plain tensor algebra.")


@dataclass
class BackpropResult:
    """Everything one reference pass computed.

    Attributes:
        loss: the 0-d loss.
        output: the model output.
        output_grad: d loss / d output, the shape of ``output``.
        param_grads: d loss / d parameter by parameter name (``"1.weight"``), as
            ``model.named_parameters()`` names them (a shared parameter once, contributions summed).
        input_grads: d loss / d input of each module call, by :data:`CallKey`; a call's input gradient
            counts only the paths through that module (a residual branch's share, not the total).
        outputs: each module call's forward output, by :data:`CallKey`.
        order: the module calls in the order their forwards started (a container before its children).
        forward_order: the module calls in the order their forwards finished (children before their
            container), so the first call in it whose output is wrong is where a forward disagreement starts.
        backward_order: the module calls in the order their backwards finished, so the first call in it
            whose gradients are wrong is where a disagreement starts.
        owners: for each parameter name, the module call whose backward produced it.
        loss_method: ``"reference"`` when the loss has a reference, ``"autograd"`` when d loss / d output
            came from autograd on the loss alone (an unrecognised ``loss_fn``).
        notes: remarks on what could not be computed, in words.
        stopped: module calls checked numerically below which the pass could not continue (no
            gradient at their input to continue from), so the modules before them were not reached.
    """

    loss: Tensor
    output: Tensor
    output_grad: Tensor
    param_grads: dict[str, GradientOrSample] = field(default_factory=dict)
    input_grads: dict[CallKey, GradientOrSample] = field(default_factory=dict)
    outputs: dict[CallKey, Tensor] = field(default_factory=dict)
    order: list[CallKey] = field(default_factory=list)
    forward_order: list[CallKey] = field(default_factory=list)
    backward_order: list[CallKey] = field(default_factory=list)
    owners: dict[str, CallKey] = field(default_factory=dict)
    loss_method: str = "reference"
    notes: list[str] = field(default_factory=list)
    stopped: list[CallKey] = field(default_factory=list)


class Tape:
    """The state of one reference pass: which module calls ran, and the gradients they produced.

    Args:
        model: the root module; parameter names are taken from ``model.named_parameters()``.
        masks: dropout keep masks for modules in training mode, by path or ``(path, call)``.
        on_unsupported: ``"error"`` or ``"finite_difference"`` (see :func:`gradscope.verify`).
        finite_difference: how the fallback samples coordinates.
        rng_states: the random state before each module call of an autograd run, replayed by the fallback.
        resume: autograd's input gradient of each module call; upstream of a module checked on a
            sample of coordinates only, the pass continues from it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        masks: Masks | None = None,
        on_unsupported: str = "error",
        finite_difference: FiniteDifferenceConfig | None = None,
        rng_states: Mapping[CallKey, RngState] | None = None,
        resume: Mapping[CallKey, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.masks: dict[MaskKey, Tensor] = {key: mask for key, mask in (masks or {}).items()}
        self.on_unsupported = on_unsupported
        self.finite_difference = finite_difference or FiniteDifferenceConfig()
        self.rng_states = dict(rng_states or {})
        self.resume = dict(resume or {})
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self.calls: Counter[str] = Counter()
        self.param_grads: dict[str, GradientOrSample] = {}
        self.input_grads: dict[CallKey, GradientOrSample] = {}
        self.outputs: dict[CallKey, Tensor] = {}
        self.order: list[CallKey] = []
        self.forward_order: list[CallKey] = []
        self.backward_order: list[CallKey] = []
        self.owners: dict[str, CallKey] = {}
        self.notes: list[str] = []
        self.stopped: list[CallKey] = []

    def node(self, module: nn.Module, path: str) -> Node:
        """A new node for the next call of ``module`` at ``path``."""
        call = self.calls[path]
        self.calls[path] += 1
        return Node(self, module, (path, call))

    def reference(self, module: nn.Module, key: CallKey) -> ReferenceLayer:
        """The reference instance for one module call: registered, or the fallback, or an error."""
        cls = REFERENCES.get(type(module)) if type(module) in REFERENCES else None
        if isinstance(cls, type) and issubclass(cls, ReferenceLayer):
            return cls(module, path=key[0], tape=self, call=key[1])
        if isinstance(cls, type) and issubclass(cls, LossReference):
            raise ConfigurationError(
                f"Module {display_name(key)!r} is a loss ({type(module).__name__}) inside the model. Pass the "
                "loss as loss_fn and return the logits (or predictions) from the model."
            )
        return self.fallback(module, key, _unsupported_message(module, key[0]))

    def fallback(self, module: nn.Module, key: CallKey, message: str) -> ReferenceLayer:
        """The finite-difference stand-in when ``on_unsupported="finite_difference"``, else raise ``message``."""
        if self.on_unsupported != "finite_difference":
            raise UnsupportedLayerError(message)
        return FiniteDifferenceReference(
            module,
            path=key[0],
            call=key[1],
            config=self.finite_difference,
            rng_state=self.rng_states.get(key),
        )

    def mask(self, path: str, call: int, x: Tensor) -> Tensor | None:
        """The dropout keep mask given for this call, checked against the input's shape."""
        mask = self.masks.get((path, call), self.masks.get(path) if call == 0 else None)
        if mask is not None and mask.shape != x.shape:
            raise ConfigurationError(
                f"Expected the dropout mask for {display_name((path, call))!r} to have the input's shape "
                f"{list(x.shape)}, but got {list(mask.shape)}."
            )
        return mask

    def record_params(self, node: Node, grads: ParamGrads) -> None:
        """File a node's parameter gradients under the model's parameter names, summing shared ones."""
        module = node.module
        for name, grad in grads.items():
            try:
                param = module.get_parameter(name)
            except AttributeError:
                own = ", ".join(n for n, _ in module.named_parameters()) or "(none)"
                raise RuntimeError(
                    f"{type(node.reference).__name__} for {node.name!r} returned a gradient for {name!r}, which "
                    f"is not a parameter of {type(module).__name__}. Its parameters: {own}."
                ) from None
            if tuple(grad.shape) != tuple(param.shape):
                raise RuntimeError(
                    f"{type(node.reference).__name__} for {node.name!r} returned a gradient of shape "
                    f"{list(grad.shape)} for {name!r}, whose shape is {list(param.shape)}."
                )
            if isinstance(grad, Tensor):
                _require_plain(grad, f"The gradient of {name!r} from {node.name!r}")
            full_name = self.param_names.get(id(param))
            if full_name is None or not param.requires_grad:
                continue  # frozen parameters are frozen on purpose: nothing to compare
            previous = self.param_grads.get(full_name)
            if previous is None:
                self.param_grads[full_name] = grad
                self.owners[full_name] = node.key
            elif isinstance(previous, Tensor) and isinstance(grad, Tensor):
                self.param_grads[full_name] = previous + grad  # a shared parameter sums its uses
            else:
                self.notes.append(
                    f"{full_name!r} is used by a module checked by finite differences and by another module; "
                    "only the first use is compared."
                )

    def resume_from(self, key: CallKey, *, checked_entirely: bool = False) -> Tensor | None:
        """Autograd's input gradient of a module call checked numerically, to continue the pass upstream of it.

        Args:
            key: the module call.
            checked_entirely: the estimate covered every entry of the input, so autograd's gradient
                there was itself checked entry by entry and continuing from it needs no note.
        """
        grad = self.resume.get(key)
        if grad is None:
            self.stopped.append(key)
            self.notes.append(
                f"Upstream of {display_name(key)!r} the reference has no full gradient to continue from, so the "
                "layers before it are not checked."
            )
            return None
        if not checked_entirely:
            self.notes.append(
                f"{display_name(key)!r} is checked numerically along random directions, which gives no full gradient "
                "at its input; the layers before it are checked starting from autograd's gradient at its input."
            )
        return grad.clone()


class Node:
    """One call of one module in a reference pass: runs its reference and records what it computes.

    Composite references get their children's nodes from :meth:`ReferenceLayer.child` and call
    :meth:`forward` and :meth:`backward` on them.
    """

    def __init__(self, tape: Tape, module: nn.Module, key: CallKey) -> None:
        self.tape = tape
        self.module = module
        self.key = key
        self.name = display_name(key)
        self.reference = tape.reference(module, key)

    def forward(self, x: Tensor) -> Tensor:
        """The module's output, computed by its reference.

        Args:
            x: the module's input.

        Returns:
            The output; the node keeps the shapes to check the backward against.
        """
        _require_autograd_off(self.name)
        self.input_shape, self.input_is_float = x.shape, x.is_floating_point()
        self.tape.order.append(self.key)
        try:
            y = self.reference.forward(x)
        except UnsupportedLayerError as error:
            if self.tape.on_unsupported != "finite_difference" or isinstance(self.reference, FiniteDifferenceReference):
                raise
            # A registered type in a configuration its reference does not cover: check it numerically.
            self.reference = self.tape.fallback(self.module, self.key, str(error))
            y = self.reference.forward(x)
        if not isinstance(y, Tensor):
            raise TypeError(
                f"{type(self.reference).__name__}.forward for {self.name!r} returned {type(y).__name__}, not a Tensor."
            )
        _require_plain(y, f"The output of the reference for {self.name!r}")
        self.output_shape = y.shape
        self.tape.outputs[self.key] = y
        self.tape.forward_order.append(self.key)
        return y

    def backward(self, grad_out: Tensor | None) -> Tensor | None:
        """D loss / d input from d loss / d output, recording the parameter and input gradients.

        Args:
            grad_out: d loss / d output, the shape of the output; ``None`` when no gradient reaches it.

        Returns:
            d loss / d input (``None`` for a non-differentiable input such as token indices).
        """
        if grad_out is None:
            return None
        _require_autograd_off(self.name)
        if grad_out.shape != self.output_shape:
            raise RuntimeError(
                f"The gradient sent back into {self.name!r} has shape {list(grad_out.shape)}, but its output had "
                f"shape {list(self.output_shape)}: a composite reference routed gradients to the wrong child."
            )
        grad_in, grads = self.reference.backward(grad_out)
        self.tape.record_params(self, grads)
        self.tape.backward_order.append(self.key)
        if grad_in is None:
            if isinstance(self.reference, FiniteDifferenceReference):
                self.tape.notes.extend(self.reference.notes)
            return None
        if tuple(grad_in.shape) != tuple(self.input_shape):
            raise RuntimeError(
                f"{type(self.reference).__name__}.backward for {self.name!r} returned an input gradient of shape "
                f"{list(grad_in.shape)}, but the input had shape {list(self.input_shape)}."
            )
        self.tape.input_grads[self.key] = grad_in
        if isinstance(self.reference, FiniteDifferenceReference):
            self.tape.notes.extend(self.reference.notes)
        if isinstance(grad_in, (SampledGradient, DirectionalGradient)):
            # Continue from autograd's input gradient, just compared with the estimate: the layers below
            # are then checked exactly, where an estimate would pass its finite-difference error on to them.
            return self.tape.resume_from(self.key, checked_entirely=grad_in.complete)
        _require_plain(grad_in, f"The input gradient from the reference for {self.name!r}")
        return grad_in


def _loss_head_by_autograd(
    loss_fn: Callable[[Tensor, Any], Tensor], output: Tensor, targets: Any
) -> tuple[Tensor, Tensor]:
    # Only for a loss_fn with no reference: autograd differentiates the loss alone, never the model.
    with torch.enable_grad():
        out = output.detach().requires_grad_(True)
        loss = loss_fn(out, targets)
        _check_scalar(loss)
        (grad,) = torch.autograd.grad(loss, out)
    return loss.detach(), grad


def _check_scalar(loss: object) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ConfigurationError(
            f"Expected loss_fn(model(inputs), targets) to return a 0-d tensor, but got {got}. Use "
            "reduction='mean' or 'sum'."
        )


def run_reference(
    model: nn.Module,
    inputs: Tensor,
    targets: Any,
    loss_fn: Callable[[Tensor, Any], Tensor],
    *,
    masks: Masks | None = None,
    on_unsupported: str = "error",
    finite_difference: FiniteDifferenceConfig | None = None,
    rng_states: Mapping[CallKey, RngState] | None = None,
    resume: Mapping[CallKey, Tensor] | None = None,
) -> BackpropResult:
    """Run the reference forward and backward of ``model`` on one batch (see :func:`manual_backward`).

    The extra arguments serve :func:`gradscope.verify`: the random states and input gradients it
    recorded from autograd let the finite-difference fallback replay dropout and continue upstream.
    """
    if not isinstance(inputs, Tensor):
        raise ConfigurationError(
            f"Expected `inputs` to be a single tensor (the model is called as model(inputs)), but got "
            f"{type(inputs).__name__}."
        )
    # The reference reads values only: a caller's input that requires grad must not pull autograd in.
    inputs = inputs.detach()
    targets = targets.detach() if isinstance(targets, Tensor) else targets
    loss_reference = resolve_loss(loss_fn)
    tape = Tape(
        model,
        masks=masks,
        on_unsupported=on_unsupported,
        finite_difference=finite_difference,
        rng_states=rng_states,
        resume=resume,
    )
    with torch.no_grad():
        root = tape.node(model, "")
        output = root.forward(inputs)
        if loss_reference is not None:
            loss = loss_reference.forward(output, targets)
            output_grad = loss_reference.backward()
            _require_plain(output_grad, f"The gradient from {type(loss_reference).__name__}")
    if loss_reference is None:
        loss, output_grad = _loss_head_by_autograd(loss_fn, output, targets)
    with torch.no_grad():
        root.backward(output_grad)
    return BackpropResult(
        loss=loss,
        output=output,
        output_grad=output_grad,
        param_grads=tape.param_grads,
        input_grads=tape.input_grads,
        outputs=tape.outputs,
        order=tape.order,
        forward_order=tape.forward_order,
        backward_order=tape.backward_order,
        owners=tape.owners,
        loss_method="reference" if loss_reference is not None else "autograd",
        notes=tape.notes,
        stopped=tape.stopped,
    )


def manual_backward(
    model: nn.Module,
    inputs: Tensor,
    targets: Any,
    loss_fn: Callable[[Tensor, Any], Tensor],
    *,
    masks: Masks | None = None,
) -> BackpropResult:
    """Backpropagate through ``model`` by hand: every gradient from the references, none from autograd.

    The model is not modified (no ``.grad`` is written, no running statistic is updated) and runs in
    whatever dtype and mode it is in.

    Args:
        model: built from ``nn.Sequential``, :class:`~gradscope.reference.Residual`, transformer layers and
            any module type with a registered reference.
        inputs: the batch's inputs, ``model(inputs)``.
        targets: the batch's targets, ``loss_fn(model(inputs), targets)``.
        loss_fn: a loss module with a reference (``nn.CrossEntropyLoss()``, ``nn.MSELoss(reduction="sum")``,
            ...), the matching ``torch.nn.functional`` function, or any callable; for a callable without
            a reference, d loss / d output comes from autograd applied to the loss alone.
        masks: the keep mask (bool, the input's shape) of each ``nn.Dropout`` in training mode, keyed by
            its path (``"2"``) or ``(path, call)``.

    Returns:
        A :class:`BackpropResult`; ``result.param_grads["0.weight"]`` is d loss / d ``0.weight``.

    Raises:
        UnsupportedLayerError: for a module type without a reference, naming its path and type.

    Example:
        >>> import torch, torch.nn as nn
        >>> from gradscope.reference import manual_backward
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> result = manual_backward(model, x, y, nn.CrossEntropyLoss())
        >>> result.param_grads["0.weight"].shape
        torch.Size([4, 3])
    """
    return run_reference(model, inputs, targets, loss_fn, masks=masks)
