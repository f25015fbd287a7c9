"""Register the built-in statistics under the names users see in outputs."""

from __future__ import annotations

from gradscope.stats import functional as F
from gradscope.stats.base import Statistic
from gradscope.stats.registry import STATISTICS

__all__ = ["BUILTIN_STATISTICS", "DEFAULT_STATISTICS"]

#: name -> (reference function, needs an optimizer step)
_BUILTINS = {
    "l2_norm": (F.l2_norm, False),
    "rms": (F.rms, False),
    "mean": (F.mean, False),
    "std": (F.std, False),
    "abs_max": (F.abs_max, False),
    "zero_fraction": (F.zero_fraction, False),
    "nonfinite_count": (F.nonfinite_count, False),
    "param_norm": (F.param_norm, False),
    "update_ratio": (F.update_ratio, True),
}

for _name, (_fn, _needs_opt) in _BUILTINS.items():
    if _name not in STATISTICS:
        # Built-ins aggregate per layer exactly: the statistic of all the layer's entries together.
        STATISTICS.register(
            _name, Statistic(name=_name, fn=_fn, reduce="concat", builtin=True, needs_optimizer=_needs_opt)
        )

BUILTIN_STATISTICS: tuple[str, ...] = tuple(_BUILTINS)
#: Collected when ``watch(stats=None)``; ``update_ratio`` only when an optimizer is given.
DEFAULT_STATISTICS: tuple[str, ...] = BUILTIN_STATISTICS
