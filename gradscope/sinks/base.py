"""The Sink contract: where statistics and findings go at each flush."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from gradscope.capture.layout import ParamInfo, ParamLayout
    from gradscope.findings import Finding
    from gradscope.report import Report
    from gradscope.stats.frame import StatsFrame

__all__ = ["ScopeInfo", "Sink", "SinkUpdate"]


@dataclass
class ScopeInfo:
    """What a sink learns when the scope opens."""

    layout: ParamLayout
    model_name: str
    stats: tuple[str, ...]
    every: int
    activation_modules: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SinkUpdate:
    """One flush: rows ``frame.steps[new_from:]`` are new, and so are ``findings``.

    Attributes:
        frame: all recorded rows (host arrays).
        new_from: first new row.
        findings: findings first reported at this flush.
        layers_by_depth: layer keys in forward order (input side first).
        final: True at ``close()``.
    """

    frame: StatsFrame
    new_from: int
    findings: list[Finding]
    layers_by_depth: list[str]
    final: bool = False


class Sink(ABC):
    """Base class of outputs. Register subclasses with ``@gradscope.register_sink(name)``.

    Optional dependencies are imported inside the sink, with an error naming the package to install.
    ``close()`` must be safe to call twice.
    """

    def open(self, info: ScopeInfo) -> None:  # noqa: B027 - optional hook
        """Called once when the scope is built."""

    def on_step(self, step: int, grads: list[tuple[ParamInfo, Tensor]]) -> None:  # noqa: B027 - optional hook
        """Called at each recorded step with the gradients the optimizer uses.

        Runs on the hot path: device work only, never a host sync (see DESIGN section 8).
        """

    @abstractmethod
    def write(self, update: SinkUpdate) -> None:
        """Write what is new at a flush."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Push buffered output to disk."""

    def close(self, report: Report) -> None:  # noqa: B027 - optional hook
        """Write the final verdict and release files (idempotent)."""
