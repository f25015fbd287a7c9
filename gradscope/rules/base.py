"""The Rule contract: host-side checks that turn statistics into findings.

A rule is a small class registered by name (the finding ``kind``) with
``@gradscope.register_rule``. It declares the statistics it needs (``requires``) and its thresholds
(``defaults``, overridable per scope with ``watch(..., thresholds={name: {...}})``). At each flush
the engine calls :meth:`Rule.check` with a :class:`RuleContext`; the rule returns findings. Rules see
NumPy arrays only, so they cannot synchronise with a device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import SEVERITIES, Finding

if TYPE_CHECKING:
    from gradscope.stats.frame import StatsFrame

__all__ = ["Rule", "RuleContext"]


@dataclass
class RuleContext:
    """What a rule sees at a flush.

    Attributes:
        frame: every recorded step so far (host arrays; see :class:`gradscope.stats.frame.StatsFrame`).
        new_from: index of the first row added since the previous flush (``frame.steps[new_from:]``).
        forward_order: layer indices in the order their modules first ran forward (earliest layer
            first); layers never seen running are appended in registration order. Backward order is
            the reverse.
        has_optimizer: whether the scope was given an optimizer.
        final: True at the last flush (``close()``) and in the provisional pass of ``report()`` (rules
            run on a copy of their state, with ``new_from == len(frame)``): windowed rules then judge
            the trailing rows that have not filled a window yet, above their ``min_steps``.
        every: one step in ``every`` is recorded (``watch(every=...)``).
        sample_every: the sampled statistics and activations are taken every this many steps.
        step_count: ``scope.step()`` calls so far (recorded or not).
        output_activations: indices (into ``frame.schema.act_modules``) of activation modules that run
            after every parameter layer: output activations, saturated by design in a confident model.
        nonfinite_counted: whether ``nonfinite_count`` counts entries on every row. False on the
            accelerators' paths, where an ordinary row holds 1 per tensor holding NaN/Inf (a flag
            from the sum of squares; docs/performance.md); 0 is exact either way.
        extra: free-form information for user rules (gradscope itself passes nothing here).
    """

    frame: StatsFrame
    new_from: int
    forward_order: list[int]
    has_optimizer: bool = False
    final: bool = False
    every: int = 1
    sample_every: int = 1
    step_count: int = 0
    output_activations: tuple[int, ...] = ()
    nonfinite_counted: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> np.ndarray:
        """Step numbers of all recorded rows."""
        return self.frame.steps

    @property
    def layers(self) -> list[str]:
        """Layer keys (module paths)."""
        return self.frame.schema.layers

    def layers_by_depth(self) -> list[str]:
        """Layer keys in forward order (input side first)."""
        return [self.frame.schema.layers[i] for i in self.forward_order]


class Rule(ABC):
    """Base class of diagnosis rules.

    Subclasses set ``name`` (through ``@register_rule``), ``severity``, ``requires`` (statistic names
    that must be collected), ``defaults`` (threshold name -> default value) and implement
    :meth:`check`; a rule that keeps state between flushes sets all of it in :meth:`reset`, which the
    constructor calls. The docstring of a subclass states the definition, the thresholds and where
    they come from. :meth:`check` reads statistics from ``ctx.frame`` by name
    (``ctx.frame.layer_values("rms", rows)``).

    Args:
        **thresholds: overrides of ``defaults``; unknown names raise ``ConfigurationError``.
    """

    name: ClassVar[str] = ""
    severity: ClassVar[str] = "warning"
    requires: ClassVar[tuple[str, ...]] = ()
    requires_activations: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **thresholds: Any) -> None:
        unknown = sorted(set(thresholds) - set(self.defaults))
        if unknown:
            raise ConfigurationError(
                f"Unknown threshold(s) {', '.join(map(repr, unknown))} for rule {self.name!r}. "
                f"Its thresholds are: {', '.join(sorted(self.defaults)) or '(none)'}."
            )
        values = dict(self.defaults)
        for key, value in thresholds.items():
            default = self.defaults[key]
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                    raise ConfigurationError(
                        f"Expected threshold {key!r} of rule {self.name!r} to be a number like {default!r}, but got {value!r}."
                    )
                if isinstance(default, float):
                    value = float(value)
                elif not float(value).is_integer():  # an int default is a count (steps, samples)
                    raise ConfigurationError(
                        f"Expected threshold {key!r} of rule {self.name!r} to be a whole number like {default!r} "
                        f"(a count), but got {value!r}. Pass {key}={int(value)} or {int(value) + 1}."
                    )
                else:
                    value = int(value)
            values[key] = value
        self.thresholds: dict[str, Any] = values
        self.validate()
        self.reset()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check threshold values (override to add range checks); raise ``ConfigurationError``."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Set the state kept between flushes to that of a new run (called by ``__init__``).

        A stateful rule overrides this and sets every attribute of its state here, so :meth:`check`
        never has to ask whether one exists yet.
        """

    @abstractmethod
    def check(self, ctx: RuleContext) -> list[Finding]:
        """Return the findings visible in ``ctx``.

        A finding of a (kind, layer) not reported before is new. Returning one whose (kind, layer)
        was reported before is an *episode update*: the engine copies its ``last_step`` (the last
        step the condition held, as of this judgement) and ``resolved_step`` (the first step from
        which it no longer held, once it has cleared; None while it holds) onto the finding it keeps,
        and ignores the rest, so a rule can return ``dataclasses.replace(first, last_step=...,
        resolved_step=...)`` of the finding it reported first. A rule that does not follow episodes
        never reports a (kind, layer) twice.
        """

    def finding(
        self,
        *,
        step: int,
        layer: str | None,
        message: str,
        suggestion: str,
        evidence: dict[str, Any],
        severity: str | None = None,
    ) -> Finding:
        """Build a finding of this rule's kind."""
        sev = severity or self.severity
        if sev not in SEVERITIES:
            raise ConfigurationError(f"Expected severity to be one of {SEVERITIES}, but got {sev!r}.")
        return Finding(
            kind=self.name,
            severity=sev,
            step=int(step),
            layer=layer,
            message=message,
            suggestion=suggestion,
            evidence=dict(evidence),
        )

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.thresholds.items() if self.defaults.get(k) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{type(self).__name__}({args})"
