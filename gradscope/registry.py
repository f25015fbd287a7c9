"""Every registry and decorator that extends gradscope, in one place to import them from.

Each registry lives beside the base class it validates (statistics in :mod:`gradscope.stats.registry`,
rules in :mod:`gradscope.rules.registry`, sinks in :mod:`gradscope.sinks.registry`, reference layers
in :mod:`gradscope.reference.registry`), all built on the generic :class:`Registry`. This module only
re-exports them, so the documented names (``gradscope.registry.STATISTICS``...) keep working; nothing
inside gradscope imports it. Importing it loads the four packages, and with them the built-ins.
"""

from __future__ import annotations

from gradscope._registry import Registry
from gradscope.reference.registry import REFERENCES, register_reference
from gradscope.rules.registry import RULES, register_rule
from gradscope.sinks.registry import SINKS, register_sink
from gradscope.stats.registry import STATISTICS, register_statistic

__all__ = [
    "REFERENCES",
    "RULES",
    "SINKS",
    "STATISTICS",
    "Registry",
    "register_reference",
    "register_rule",
    "register_sink",
    "register_statistic",
]
