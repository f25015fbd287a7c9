"""gradscope: gradient diagnostics and debugging for PyTorch."""

from __future__ import annotations

from gradscope._version import __version__
from gradscope.errors import (
    ConfigurationError,
    GradientHealthError,
    GradscopeError,
    UnsupportedLayerError,
)
from gradscope.reference import VerificationReport, verify
from gradscope.registry import register_reference, register_rule, register_sink, register_statistic

__all__ = [
    "ConfigurationError",
    "GradientHealthError",
    "GradscopeError",
    "UnsupportedLayerError",
    "VerificationReport",
    "__version__",
    "register_reference",
    "register_rule",
    "register_sink",
    "register_statistic",
    "verify",
]
