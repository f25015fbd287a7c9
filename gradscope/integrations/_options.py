"""The ``watch`` options that the trainer callbacks accept, validated when the callback is built.

A callback attaches ``watch`` only when training starts; a typo in its options should fail where the
callback is constructed, not minutes later inside ``trainer.fit()``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from gradscope.errors import ConfigurationError
from gradscope.rules.engine import RuleSpec, build_rules
from gradscope.sinks.base import Sink

__all__ = ["WatchOptions"]

_ON_NONFINITE = ("record", "raise")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigurationError(f"Expected `{name}` to be a positive int, but got {value!r}.")
    return int(value)


@dataclass
class WatchOptions:
    """Everything :func:`gradscope.watch` takes besides the model, the optimizer and the TensorBoard target.

    See :func:`gradscope.watch` for the meaning of each field.
    """

    every: int = 1
    flush_every: int = 50
    stats: Union[str, Iterable[str], None] = None
    rules: RuleSpec = "all"
    thresholds: Mapping[str, Mapping[str, Any]] | None = None
    activations: bool = True
    sample_every: int = 10
    on_nonfinite: str = "record"
    sinks: Sequence[Union[Sink, str]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.every = _positive_int("every", self.every)
        self.flush_every = _positive_int("flush_every", self.flush_every)
        self.sample_every = _positive_int("sample_every", self.sample_every)
        if self.sample_every % self.every:
            raise ConfigurationError(
                f"Expected `sample_every` to be a multiple of `every` ({self.every}), but got {self.sample_every}."
            )
        if self.on_nonfinite not in _ON_NONFINITE:
            raise ConfigurationError(
                f"Expected `on_nonfinite` to be one of {_ON_NONFINITE}, but got {self.on_nonfinite!r}."
            )
        if not isinstance(self.activations, bool):
            raise ConfigurationError(f"Expected `activations` to be True or False, but got {self.activations!r}.")
        build_rules(self.rules, self.thresholds)  # unknown rule names or thresholds raise here, with the choices

    def recorded(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1) is recorded under ``every``."""
        return (step - 1) % self.every == 0

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`gradscope.watch`."""
        return {
            "every": self.every,
            "flush_every": self.flush_every,
            "stats": self.stats,
            "rules": self.rules,
            "thresholds": self.thresholds,
            "activations": self.activations,
            "sample_every": self.sample_every,
            "on_nonfinite": self.on_nonfinite,
            "sinks": self.sinks,
        }
