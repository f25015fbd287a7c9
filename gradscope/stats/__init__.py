"""Statistics: what is measured about each gradient, and where the numbers are kept.

One :class:`Statistic` object per statistic (:mod:`gradscope.stats.base`), registered by name
(:mod:`gradscope.stats.registry`); importing this package registers the built-in ones
(:mod:`gradscope.stats.builtin`). The fused pass that feeds them is :mod:`gradscope.stats.moments`,
the host-side history they are read from :mod:`gradscope.stats.frame`.
"""

from __future__ import annotations

from gradscope.stats.base import REDUCTIONS, Statistic
from gradscope.stats.builtin import BUILTIN_STATISTICS, DEFAULT_STATISTICS

__all__ = ["BUILTIN_STATISTICS", "DEFAULT_STATISTICS", "REDUCTIONS", "Statistic"]
