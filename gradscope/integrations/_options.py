"""The ``watch`` options that the trainer callbacks accept, validated when the callback is built.

A callback attaches ``watch`` only when training starts; a typo in its options should fail where the
callback is constructed, not minutes later inside ``trainer.fit()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from gradscope.rules.engine import RuleSpec, build_rules
from gradscope.scope import _DEFAULT_HISTORY, check_options
from gradscope.sinks.base import Sink

__all__ = ["WatchOptions"]


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
    history: int | None = _DEFAULT_HISTORY
    report_path: Any = None
    histogram_every: int | None = 100
    histogram_weights: bool = False
    figure_every: int | None = 1000

    def __post_init__(self) -> None:
        checked = check_options(
            every=self.every,
            flush_every=self.flush_every,
            sample_every=self.sample_every,
            on_nonfinite=self.on_nonfinite,
            activations=self.activations,
            history=self.history,
            report_path=self.report_path,
            histogram_every=self.histogram_every,
            histogram_weights=self.histogram_weights,
            figure_every=self.figure_every,
        )
        for name in _CHECKED:
            setattr(self, name, checked[name])
        build_rules(self.rules, self.thresholds)  # unknown rule names or thresholds raise here, with the choices

    def recorded(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1) is recorded under ``every``."""
        return (step - 1) % self.every == 0

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`gradscope.watch`."""
        return {name: getattr(self, name) for name in (*_CHECKED, "stats", "rules", "thresholds", "sinks")}


_CHECKED = (
    "every",
    "flush_every",
    "sample_every",
    "on_nonfinite",
    "activations",
    "history",
    "report_path",
    "histogram_every",
    "histogram_weights",
    "figure_every",
)
