"""Rules: turn statistics into findings. Importing this package registers the built-in rules."""

from __future__ import annotations

from gradscope.rules.base import Rule, RuleContext

__all__ = ["Rule", "RuleContext"]
