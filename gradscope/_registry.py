"""The generic :class:`Registry` that every extension point is built on.

Every extension point (statistics, rules, sinks, reference layers, plots) is a :class:`Registry`
filled by a decorator, and lives beside the base class it validates: ``gradscope.stats.registry``,
``gradscope.rules.registry``, ``gradscope.sinks.registry``, ``gradscope.reference.registry``
(``gradscope.registry`` re-exports them all). The key is the name users see in outputs
(``"l2_norm"``, ``"vanishing_gradients"``) or, for reference layers, the ``nn.Module`` type. Registering a key twice raises unless ``overwrite=True``;
an unknown key raises with the list of registered ones, so error messages never go stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from gradscope.errors import RegistryError

__all__ = ["Registry"]

T = TypeVar("T")


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
