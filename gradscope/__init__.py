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

import importlib
from typing import TYPE_CHECKING, Any

from gradscope._version import __version__
from gradscope.errors import (
    ConfigurationError,
    GradientHealthError,
    GradscopeError,
    GradscopeWarning,
    NonFiniteGradientError,
    UnsupportedLayerError,
)

if TYPE_CHECKING:
    from gradscope.baseline import assert_matches_baseline, snapshot
    from gradscope.health import assert_healthy, check
    from gradscope.reference import VerificationReport, verify
    from gradscope.registry import register_reference, register_rule, register_sink, register_statistic
    from gradscope.report import Finding, Report
    from gradscope.rules.base import Rule, RuleContext
    from gradscope.scope import GradScope, watch

# The rest of the API loads on first use, so that `import gradscope` (and the pytest plugin, which
# every pytest session in an environment with gradscope loads) does not import torch until needed.
_LAZY = {
    "assert_matches_baseline": "gradscope.baseline",
    "snapshot": "gradscope.baseline",
    "assert_healthy": "gradscope.health",
    "check": "gradscope.health",
    "VerificationReport": "gradscope.reference",
    "verify": "gradscope.reference",
    "register_reference": "gradscope.registry",
    "register_rule": "gradscope.registry",
    "register_sink": "gradscope.registry",
    "register_statistic": "gradscope.registry",
    "Finding": "gradscope.report",
    "Report": "gradscope.report",
    "Rule": "gradscope.rules.base",
    "RuleContext": "gradscope.rules.base",
    "GradScope": "gradscope.scope",
    "watch": "gradscope.scope",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradscope' has no attribute {name!r}")
    # Built-in statistics and rules register themselves when their packages are imported.
    importlib.import_module("gradscope.stats")
    importlib.import_module("gradscope.rules")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "assert_healthy",
    "assert_matches_baseline",
    "check",
    "register_reference",
    "register_rule",
    "register_sink",
    "register_statistic",
    "snapshot",
    "verify",
    "watch",
]
