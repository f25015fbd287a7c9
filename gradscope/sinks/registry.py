"""The sinks registry: ``SINKS``, ``@gradscope.register_sink``, and building a sink from a spec."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from gradscope._registry import Registry
from gradscope.errors import ConfigurationError, RegistryError
from gradscope.sinks.base import Sink

__all__ = ["SINKS", "build_sink", "register_sink"]

C = TypeVar("C", bound=type)

SINKS: Registry[type[Sink]] = Registry("sink", "@gradscope.register_sink")


def register_sink(name: str, *, overwrite: bool = False) -> Callable[[C], C]:
    """Register a :class:`gradscope.sinks.Sink` subclass under ``name``."""

    def decorator(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Sink)):
            raise RegistryError(
                f"@register_sink({name!r}) must decorate a subclass of gradscope.sinks.Sink, got {cls!r}."
            )
        SINKS.register(name, cls, overwrite=overwrite)
        return cls

    return decorator


def build_sink(spec: Any) -> Sink:
    """A sink from an entry of ``watch(sinks=...)``: a :class:`Sink` instance, or a registered name.

    Raises:
        ConfigurationError: for an unknown name (listing the registered ones), a sink that needs
            arguments, or anything else.
    """
    if isinstance(spec, Sink):
        return spec
    if isinstance(spec, str):
        try:
            cls = SINKS.get(spec)
        except RegistryError as exc:
            raise ConfigurationError(str(exc)) from None
        try:
            return cls()
        except TypeError as exc:
            # sinks that need arguments are built from instances; a missing extra raises its own error
            raise ConfigurationError(
                f"Sink {spec!r} needs arguments; pass an instance in `sinks` instead ({exc})."
            ) from None
    raise ConfigurationError(
        f"Expected each entry of `sinks` to be a Sink instance or a registered name, but got {spec!r}."
    )
