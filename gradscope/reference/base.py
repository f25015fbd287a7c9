"""What a reference layer is: one module type's forward and backward, written out by hand.

A reference layer is the micrograd idea applied to ``nn.Module`` types: the forward computes the
module's output with plain tensor algebra, and the backward, right beside it, applies the local
derivative to the gradient that arrives from above. No autograd is involved: the reference pass runs
under ``torch.no_grad()`` and checks that it stays off.

Two kinds exist:

- :class:`ReferenceLayer` for layers and blocks (``nn.Linear``, ``nn.LayerNorm``, a residual block).
  A composite layer (a container, a transformer block) calls the references of its submodules through
  :meth:`ReferenceLayer.child`, so their gradients are recorded under their own module paths.
- :class:`LossReference` for loss modules (``nn.CrossEntropyLoss``): the loss value and its gradient
  with respect to the model output.

Both are registered with ``@gradscope.register_reference(ModuleType)``, keyed by the exact module type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Union

import torch.nn as nn
from torch import Tensor

from gradscope.reference.calls import CallRecorder, ModuleCall
from gradscope.reference.sampled import DirectionalGradient, SampledGradient

__all__ = ["GradientOrSample", "LossReference", "ParamGrads", "ReferenceLayer"]

#: What a backward may return for one tensor: the full gradient, or a finite-difference estimate of
#: some of its entries or of its directional derivatives (only the finite-difference fallback returns those).
GradientOrSample = Union[Tensor, SampledGradient, DirectionalGradient]

#: Gradients of a module's own parameters, keyed by the parameter's name relative to the module
#: (``"weight"``, or ``"out_proj.weight"`` for a parameter the reference handles itself).
ParamGrads = dict[str, GradientOrSample]


class ReferenceLayer(ABC):
    """Forward and backward of one module type, with the local derivative beside its forward.

    The reference pass creates one instance per call of a module. :meth:`forward` may keep on
    ``self`` whatever :meth:`backward` needs, as ``ctx.save_for_backward`` does in a custom
    ``torch.autograd.Function``. Read the module's parameters; never modify the module.

    Subclass it and register the subclass for your module type::

        @gradscope.register_reference(nn.Tanh)
        class TanhReference(ReferenceLayer):
            def forward(self, x):
                self.y = torch.tanh(x)
                return self.y

            def backward(self, grad_out):
                return grad_out * (1 - self.y**2), {}  # d tanh(x)/dx = 1 - tanh(x)**2

    A subclass may narrow ``module`` with a class-level annotation (``module: nn.Linear``), so that a type
    checker knows what it reads: ``self.module.weight`` is then a ``Tensor``, where a plain ``nn.Module``
    types every attribute as ``Tensor | Module``.

    Args:
        module: the module being computed.
        path: its module path in the model (``"encoder.2"``; ``""`` for the model itself).
        tape: the reference pass this call belongs to; composite references reach their submodules
            through it with :meth:`child`. ``None`` when a reference is used on its own.
        call: which call of this module the instance computes (0 for the first; a module used twice
            in one forward has two calls).
    """

    def __init__(self, module: nn.Module, *, path: str = "", tape: CallRecorder | None = None, call: int = 0) -> None:
        self.module = module
        self.path = path
        self.call = call
        self._tape = tape

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """Compute the module's output from its input, as ``module(x)`` would.

        Args:
            x: the module's input, any shape the module accepts.

        Returns:
            The output, equal to ``module(x)`` up to rounding.
        """

    @abstractmethod
    def backward(self, grad_out: Tensor) -> tuple[GradientOrSample | None, ParamGrads]:
        """Apply the chain rule through the module.

        Args:
            grad_out: d loss / d output, the shape of the output of :meth:`forward`.

        Returns:
            ``(grad_in, param_grads)``: d loss / d input (the shape of the input; ``None`` when the
            input is not differentiable, such as token indices) and d loss / d parameter for each of
            the module's own parameters, by name. Parameters of submodules reached through
            :meth:`child` are recorded by their own references and must not appear here.
        """

    def child(self, name: str) -> ModuleCall:
        """The reference node of submodule ``name``, for composite references.

        Call ``node.forward(x)`` in :meth:`forward` and ``node.backward(grad)`` in :meth:`backward`;
        the node records the submodule's gradients under its own path (``"<path>.<name>"``).

        Args:
            name: the submodule's name relative to this module (``"body"``, ``"layers.0"``).

        Raises:
            RuntimeError: if this reference runs outside a reference pass (``tape`` is ``None``).
        """
        if self._tape is None:
            raise RuntimeError(
                f"{type(self).__name__}.child({name!r}) needs a reference pass to record into. Run the "
                "model through gradscope.reference.manual_backward or gradscope.verify."
            )
        submodule = self.module.get_submodule(name)
        return self._tape.node(submodule, _join(self.path, name))


class LossReference(ABC):
    """A loss's value and its gradient with respect to the model output, without autograd.

    Args:
        loss: the loss module (``nn.MSELoss(reduction="sum")``); read its settings, never modify it.
    """

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    @abstractmethod
    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Compute the scalar loss, as ``loss(output, target)`` would.

        Args:
            output: the model output (``[N, C]`` logits for classification, any shape for MSE).
            target: the targets, in the form the loss module accepts.

        Returns:
            The 0-d loss.
        """

    @abstractmethod
    def backward(self) -> Tensor:
        """Return d loss / d output, the shape of ``output``."""


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
