"""The rules registry: ``RULES`` and ``@gradscope.register_rule``."""

from __future__ import annotations

from typing import Callable, TypeVar

from gradscope._registry import Registry
from gradscope.errors import RegistryError
from gradscope.rules.base import Rule

__all__ = ["RULES", "register_rule"]

C = TypeVar("C", bound=type)

RULES: Registry[type[Rule]] = Registry("rule", "@gradscope.register_rule")


def register_rule(name: str, *, overwrite: bool = False) -> Callable[[C], C]:
    """Register a :class:`gradscope.rules.Rule` subclass under ``name`` (the finding ``kind``)."""

    def decorator(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise RegistryError(f"@register_rule({name!r}) must decorate a subclass of gradscope.Rule, got {cls!r}.")
        cls.name = name  # the class's own attribute: the key users see in findings
        RULES.register(name, cls, overwrite=overwrite)
        return cls

    return decorator
