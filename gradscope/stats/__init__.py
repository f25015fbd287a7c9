"""Statistics: what is measured about each gradient, and where the numbers are kept."""

from __future__ import annotations

from gradscope.stats import builtin as _builtin  # noqa: F401  (registers the built-in statistics)
from gradscope.stats.base import REDUCTIONS, Statistic
from gradscope.stats.builtin import BUILTIN_STATISTICS, DEFAULT_STATISTICS

__all__ = ["BUILTIN_STATISTICS", "DEFAULT_STATISTICS", "REDUCTIONS", "Statistic"]
