"""The reference-layer registry: ``REFERENCES`` and ``@gradscope.register_reference``.

Keys are ``nn.Module`` types, looked up exactly (BackPACK-style explicit module-to-implementation
table), so a subclass of ``nn.Linear`` with its own ``forward`` is not mistaken for ``nn.Linear``.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.nn as nn

from gradscope._registry import Registry
from gradscope.errors import RegistryError
from gradscope.reference.base import LossReference, ReferenceLayer

__all__ = ["REFERENCES", "register_reference"]

C = TypeVar("C", bound=type)

REFERENCES: Registry[type] = Registry("reference layer", "@gradscope.register_reference")


def register_reference(module_type: type, *, overwrite: bool = False) -> Callable[[C], C]:
    """Register a manual-backprop reference class for ``module_type`` (an ``nn.Module`` subclass).

    The class subclasses :class:`gradscope.reference.ReferenceLayer` (a layer or block: ``forward(x)``
    and ``backward(grad_out) -> (grad_in, {param_name: grad})``) or
    :class:`gradscope.reference.LossReference` (a loss). Lookups use the exact module type, so a subclass
    of ``nn.Linear`` with its own ``forward`` is not mistaken for ``nn.Linear``.

    Example:
        >>> import torch, torch.nn as nn, gradscope
        >>> from gradscope.reference import ReferenceLayer
        >>> class Square(nn.Module):
        ...     def forward(self, x):
        ...         return x * x
        >>> @gradscope.register_reference(Square)
        ... class SquareReference(ReferenceLayer):
        ...     def forward(self, x):
        ...         self.x = x
        ...         return x * x
        ...     def backward(self, grad_out):
        ...         return grad_out * 2 * self.x, {}  # d(x²)/dx = 2x
        >>> _ = gradscope.registry.REFERENCES.unregister(Square)

    Returns:
        The decorator, which registers and returns the class unchanged.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise RegistryError(
            f"@register_reference expects an nn.Module subclass such as nn.Linear, but got {module_type!r}. "
            "Pass the class, not an instance."
        )

    def decorator(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, (ReferenceLayer, LossReference))):
            raise RegistryError(
                f"@register_reference({module_type.__name__}) must decorate a subclass of "
                f"gradscope.reference.ReferenceLayer (or LossReference for a loss), got {cls!r}."
            )
        REFERENCES.register(module_type, cls, overwrite=overwrite)
        return cls

    return decorator
