"""What a composite reference sees of the reference pass: a module call it can run forward and backward.

A composite reference (a container, a transformer block) reaches its submodules through
:meth:`~gradscope.reference.ReferenceLayer.child`, which asks the pass for a node of the submodule's
call. These two protocols are all that :mod:`gradscope.reference.base` needs to know of the pass (with the
dropout masks it was given); the
pass itself (:class:`~gradscope.reference.backprop.Tape` and :class:`~gradscope.reference.backprop.Node`)
sits above the layer references, because it looks them up in the registry.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

__all__ = ["CallRecorder", "ModuleCall"]


class ModuleCall(Protocol):
    """One call of a submodule inside a composite reference: its forward, then its backward."""

    @property
    def reference(self) -> object:
        """The reference layer computing this call (a composite may configure it, as attention's causal flag)."""
        ...

    def forward(self, x: Tensor) -> Tensor:
        """The submodule's output, computed by its reference."""
        ...

    def backward(self, grad_out: Tensor | None) -> Tensor | None:
        """D loss / d input from d loss / d output (``None`` in or out when no gradient flows)."""
        ...


class CallRecorder(Protocol):
    """The reference pass, as a reference layer sees it: nodes for submodule calls, and dropout masks."""

    def node(self, module: nn.Module, path: str) -> ModuleCall:
        """A new node for the next call of ``module`` at ``path``."""
        ...

    def mask(self, path: str, call: int, x: Tensor) -> Tensor | None:
        """The dropout keep mask given for call ``call`` of the module at ``path``, if any."""
        ...
