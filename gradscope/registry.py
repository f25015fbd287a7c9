"""One typed registry and the four decorators that extend gradscope.

Every extension point (statistics, rules, sinks, reference layers) is a :class:`Registry` filled by a
decorator. The key is the name users see in outputs (``"l2_norm"``, ``"vanishing_gradients"``) or, for
reference layers, the ``nn.Module`` type. Registering a key twice raises unless ``overwrite=True``;
an unknown key raises with the list of registered ones, so error messages never go stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from gradscope.errors import RegistryError

if TYPE_CHECKING:
    from torch import Tensor

    from gradscope.stats.base import Statistic

__all__ = [
    "REFERENCES",
    "RULES",
    "SINKS",
    "STATISTICS",
    "Registry",
    "register_reference",
    "register_rule",
    "register_sink",
    "register_statistic",
]

T = TypeVar("T")
C = TypeVar("C", bound=type)


def _key_name(key: object) -> str:
    return key.__name__ if isinstance(key, type) else str(key)


class Registry(Generic[T]):
    """A mapping from keys to extensions, with strict duplicate handling and helpful misses.

    Args:
        kind: what the registry holds, in words ("statistic"), used in error messages.
        decorator: the decorator that adds entries, named in error messages.
    """

    def __init__(self, kind: str, decorator: str) -> None:
        self.kind = kind
        self.decorator = decorator
        self._entries: dict[Any, T] = {}

    def register(self, key: Any, value: T, *, overwrite: bool = False) -> T:
        """Add ``value`` under ``key`` and return it unchanged.

        Raises:
            RegistryError: if ``key`` is already registered and ``overwrite`` is False.
        """
        if key in self._entries and not overwrite:
            raise RegistryError(
                f"A {self.kind} named {_key_name(key)!r} is already registered. Pass overwrite=True to "
                f"{self.decorator}(...) to replace it, or choose another name."
            )
        self._entries[key] = value
        return value

    def unregister(self, key: Any) -> T:
        """Remove and return the entry under ``key`` (used by tests and by plugins that unload)."""
        self.get(key)
        return self._entries.pop(key)

    def get(self, key: Any) -> T:
        """Return the entry under ``key``.

        Raises:
            RegistryError: if ``key`` is unknown; the message lists every registered key.
        """
        try:
            return self._entries[key]
        except (KeyError, TypeError):
            raise RegistryError(
                f"Unknown {self.kind} {_key_name(key)!r}. Registered {self.kind}s: "
                f"{', '.join(self.names()) or '(none)'}. Add your own with {self.decorator}."
            ) from None

    def names(self) -> list[str]:
        """The registered keys as sorted display names."""
        return sorted(_key_name(k) for k in self._entries)

    def keys(self) -> list[Any]:
        """The registered keys, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[Any, T]]:
        """``(key, entry)`` pairs in registration order."""
        return list(self._entries.items())

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


STATISTICS: Registry[Statistic] = Registry("statistic", "@gradscope.register_statistic")
RULES: Registry[type] = Registry("rule", "@gradscope.register_rule")
SINKS: Registry[type] = Registry("sink", "@gradscope.register_sink")
REFERENCES: Registry[type] = Registry("reference layer", "@gradscope.register_reference")


def register_statistic(
    name: str, *, reduce: str = "mean", overwrite: bool = False
) -> Callable[[Callable[[Tensor, Tensor], Tensor]], Callable[[Tensor, Tensor], Tensor]]:
    """Register a per-parameter gradient statistic under ``name``.

    The function receives ``(grad, param)`` (same shape, same device) and returns a 0-d tensor on that
    device. It must not synchronise with the host (no ``.item()``, no ``if tensor:``) and must not
    modify its arguments. ``reduce`` says how per-parameter values combine into the layer aggregate
    (``param == "*"`` in ``report.stats``): ``"mean"`` (weighted by element count), ``"sum"``,
    ``"max"``, ``"min"`` or ``"norm"`` (square root of the sum of squares).

    Example:
        >>> import torch, gradscope
        >>> @gradscope.register_statistic("frac_positive", reduce="mean")
        ... def frac_positive(grad, param):
        ...     return (grad > 0).float().mean()
        >>> _ = gradscope.registry.STATISTICS.unregister("frac_positive")

    Returns:
        The decorator, which registers and returns the function unchanged.
    """
    from gradscope.stats.base import REDUCTIONS, Statistic

    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(
            f"Expected the statistic name to be a Python identifier such as 'grad_p99', but got {name!r}."
        )
    if reduce not in REDUCTIONS:
        raise RegistryError(
            f"Expected `reduce` for statistic {name!r} to be one of {', '.join(REDUCTIONS)}, but got {reduce!r}."
        )

    def decorator(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        if not callable(fn):
            raise RegistryError(f"@register_statistic({name!r}) must decorate a function, got {fn!r}.")
        STATISTICS.register(name, Statistic(name=name, fn=fn, reduce=reduce), overwrite=overwrite)
        return fn

    return decorator


def register_rule(name: str, *, overwrite: bool = False) -> Callable[[C], C]:
    """Register a :class:`gradscope.rules.Rule` subclass under ``name`` (the finding ``kind``)."""

    def decorator(cls: C) -> C:
        from gradscope.rules.base import Rule

        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise RegistryError(f"@register_rule({name!r}) must decorate a subclass of gradscope.Rule, got {cls!r}.")
        cls.name = name  # the class's own attribute: the key users see in findings
        RULES.register(name, cls, overwrite=overwrite)
        return cls

    return decorator


def register_sink(name: str, *, overwrite: bool = False) -> Callable[[C], C]:
    """Register a :class:`gradscope.sinks.Sink` subclass under ``name``."""

    def decorator(cls: C) -> C:
        from gradscope.sinks.base import Sink

        if not (isinstance(cls, type) and issubclass(cls, Sink)):
            raise RegistryError(
                f"@register_sink({name!r}) must decorate a subclass of gradscope.sinks.Sink, got {cls!r}."
            )
        SINKS.register(name, cls, overwrite=overwrite)
        return cls

    return decorator


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
    import torch.nn as nn

    # Load the built-in references first, so that overwrite=True on a built-in type is not undone
    # later when gradscope.reference is first imported.
    from gradscope.reference.base import LossReference, ReferenceLayer

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
