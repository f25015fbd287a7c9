"""Rules: turn statistics into findings. Importing this package registers the built-in rules.

One file per family: :mod:`~gradscope.rules.gradients` (vanishing, exploding, non-finite),
:mod:`~gradscope.rules.activations` (dead units, saturated activations),
:mod:`~gradscope.rules.coverage` (no gradient), :mod:`~gradscope.rules.loss` (loss not decreasing,
overfitting), :mod:`~gradscope.rules.learning_rate` (learning rate too high / too low),
:mod:`~gradscope.rules.spike` (loss spikes), :mod:`~gradscope.rules.batch_size` (the batch against the
gradient noise scale). docs/rules.md states every definition and threshold.
"""

from __future__ import annotations

from gradscope.rules import activations as _activations  # noqa: F401  (registers the rules)
from gradscope.rules import coverage as _coverage  # noqa: F401
from gradscope.rules import gradients as _gradients  # noqa: F401
from gradscope.rules import learning_rate as _learning_rate  # noqa: F401
from gradscope.rules import loss as _loss  # noqa: F401
from gradscope.rules import spike as _spike  # noqa: F401

# isort: split
# Registered last, so the built-in rules keep their order ("all" runs and lists rules in registration order).
from gradscope.rules import batch_size as _batch_size  # noqa: F401
from gradscope.rules.activations import DeadUnits, SaturatedActivations
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.batch_size import BatchSizeTooLarge, BatchSizeTooSmall
from gradscope.rules.coverage import NoGradient
from gradscope.rules.gradients import ExplodingGradients, NonfiniteGradients, VanishingGradients
from gradscope.rules.learning_rate import LearningRateTooHigh, LearningRateTooLow
from gradscope.rules.loss import LossNotDecreasing, Overfitting
from gradscope.rules.spike import LossSpike

__all__ = [
    "BatchSizeTooLarge",
    "BatchSizeTooSmall",
    "DeadUnits",
    "ExplodingGradients",
    "LearningRateTooHigh",
    "LearningRateTooLow",
    "LossNotDecreasing",
    "LossSpike",
    "NoGradient",
    "NonfiniteGradients",
    "Overfitting",
    "Rule",
    "RuleContext",
    "SaturatedActivations",
    "VanishingGradients",
]
