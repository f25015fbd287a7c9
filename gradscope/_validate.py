"""Checks of configuration values, with errors that say what was expected and what came."""

from __future__ import annotations

import numbers
from typing import Any

from gradscope.errors import ConfigurationError

__all__ = ["boolean", "optional_positive_int", "positive_int"]


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else ``ConfigurationError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigurationError(f"Expected `{name}` to be a positive int, but got {value!r}.")
    return int(value)


def optional_positive_int(name: str, value: Any) -> int | None:
    """None (off), or ``value`` as a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigurationError(f"Expected `{name}` to be a positive int or None (off), but got {value!r}.")
    return int(value)


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is True or False, else ``ConfigurationError``."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"Expected `{name}` to be True or False, but got {value!r}.")
    return value
