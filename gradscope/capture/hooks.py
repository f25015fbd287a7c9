"""Every hook a scope registers goes through one HookManager, which owns the handles."""

from __future__ import annotations

from typing import Any

__all__ = ["HookManager"]


class HookManager:
    """Owns ``RemovableHandle``s by group, so a scope can remove some (sampled-step hooks) or all.

    Nothing is ever set on the user's modules, parameters or optimizer: removing the handles
    restores them exactly.
    """

    def __init__(self) -> None:
        self._groups: dict[str, list[Any]] = {}

    def add(self, group: str, handle: Any) -> None:
        """Keep ``handle`` (anything with ``.remove()``) under ``group``."""
        self._groups.setdefault(group, []).append(handle)

    def count(self, group: str | None = None) -> int:
        """Number of live handles, in one group or in all."""
        if group is not None:
            return len(self._groups.get(group, ()))
        return sum(len(v) for v in self._groups.values())

    def remove(self, group: str) -> None:
        """Remove every handle of ``group`` (idempotent)."""
        for handle in self._groups.pop(group, ()):
            handle.remove()

    def remove_all(self) -> None:
        """Remove every handle (idempotent)."""
        for group in list(self._groups):
            self.remove(group)
