"""gradscope: gradient diagnostics and debugging for PyTorch.

Watch a model's gradients on the device, turn the statistics into findings, and export them::

    with gradscope.watch(model, optimizer=opt, log_dir="runs/exp1") as scope:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    print(scope.report())
"""

from __future__ import annotations

from gradscope import rules as _rules  # noqa: F401  (registers the built-in rules)
from gradscope import stats as _stats  # noqa: F401  (registers the built-in statistics)
from gradscope._version import __version__
from gradscope.errors import (
    ConfigurationError,
    GradientHealthError,
    GradscopeError,
    GradscopeWarning,
    NonFiniteGradientError,
    UnsupportedLayerError,
)
from gradscope.reference import VerificationReport, verify
from gradscope.registry import register_reference, register_rule, register_sink, register_statistic
from gradscope.report import Finding, Report
from gradscope.rules.base import Rule, RuleContext
from gradscope.scope import GradScope, watch

__all__ = [
    "ConfigurationError",
    "Finding",
    "GradScope",
    "GradientHealthError",
    "GradscopeError",
    "GradscopeWarning",
    "NonFiniteGradientError",
    "Report",
    "Rule",
    "RuleContext",
    "UnsupportedLayerError",
    "VerificationReport",
    "__version__",
    "register_reference",
    "register_rule",
    "register_sink",
    "register_statistic",
    "verify",
    "watch",
]
