"""The exceptions and warnings gradscope raises, one class per situation.

Every error message names the object, the place and the fix. Catch :class:`GradscopeError` to catch
them all; each subclass also derives from the builtin exception a caller would naturally expect
(``ValueError`` for bad configuration, ``KeyError`` for registry misses, and so on).
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "GradientHealthError",
    "GradscopeError",
    "GradscopeWarning",
    "NonFiniteGradientError",
    "RegistryError",
    "UnsupportedLayerError",
]


class GradscopeError(Exception):
    """Base class of every error gradscope raises on purpose."""


class ConfigurationError(GradscopeError, ValueError):
    """Raised when an argument to a gradscope function or class is invalid.

    Raised at construction time (``watch``, ``check``, a rule's thresholds), never in the middle of a
    training loop.
    """


class RegistryError(GradscopeError, KeyError):
    """Raised when a registry lookup misses, or when a key is registered twice without ``overwrite=True``."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a sentence reads better unquoted.
        return str(self.args[0]) if self.args else ""


class UnsupportedLayerError(GradscopeError, NotImplementedError):
    """Raised by the reference backprop when it meets a module type it has no reference for."""


class GradientHealthError(GradscopeError, AssertionError):
    """Raised by ``Report.raise_for_status()`` and ``assert_healthy`` when a run has findings.

    Attributes:
        report: the :class:`gradscope.Report` whose findings caused the error.
    """

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class NonFiniteGradientError(GradientHealthError, FloatingPointError):
    """Raised at ``scope.step()`` when ``on_nonfinite="raise"`` and a gradient holds NaN or Inf."""


class GradscopeWarning(UserWarning):
    """Warns about a monitoring problem that does not stop training (monitoring never crashes a run)."""
