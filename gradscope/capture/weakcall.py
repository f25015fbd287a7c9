"""Callables that reach their owner through a weak reference, so nothing gradscope registers keeps a scope alive.

A hook registered on a torch object (a global module hook, an optimizer step hook) or a callback the
scope hands to its parts would otherwise hold the scope: the scope, the model and the optimizer then
sit in one reference cycle, an unclosed scope is never collected, and its report is never written.
A :class:`WeakCall` calls its owner's method while the owner lives and does nothing afterwards.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["WeakCall"]


class WeakCall:
    """``owner.<method>(*args)`` while ``owner`` lives; ``None`` (a no-op) once it is collected.

    It also copies and pickles as an inert no-op, so a deep copy or a pickle of whatever holds it
    never reaches the owner.

    Args:
        owner: the object whose method is called (held weakly).
        method: the method's name.
        default: what a call returns once the owner is gone.
    """

    __slots__ = ("_default", "_method", "_ref")

    def __init__(self, owner: object, method: str, default: Any = None) -> None:
        self._ref: weakref.ref[Any] | None = weakref.ref(owner)
        self._method = method
        self._default = default

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the owner's method, or return ``default`` once the owner is gone."""
        owner = self._ref() if self._ref is not None else None
        if owner is None:
            return self._default
        return getattr(owner, self._method)(*args, **kwargs)

    @property
    def alive(self) -> bool:
        """Whether the owner still lives."""
        return self._ref is not None and self._ref() is not None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inert, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> WeakCall:
        return _inert()

    def __copy__(self) -> WeakCall:
        return _inert()


def _inert() -> WeakCall:
    call = WeakCall.__new__(WeakCall)
    call._ref = None
    call._method = ""
    call._default = None
    return call
