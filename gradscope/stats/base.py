"""What a statistic is: one object that says what it needs, how it is computed, when, and how it aggregates.

A *built-in* statistic is computed from a few fused *moments* of each gradient (see
:mod:`gradscope.stats.moments`): it names the moments it needs and derives its value from them on the
host. Because moments aggregate exactly (sums, minima, maxima), the same derivation gives the value
of a parameter, of a layer and of the whole model. Its plain definition, a function of one gradient,
is kept beside it as the reference the test suite holds the fused path to.

A *custom* statistic (``@gradscope.register_statistic``) is a function of ``(grad, param)`` computed
per parameter at every recorded step; its layer and model values combine the per-parameter values
as its ``reduce`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

__all__ = ["EXACT", "REDUCTIONS", "MomentView", "Statistic"]

#: How per-parameter values of a custom statistic combine into the layer aggregate (``param == "*"``).
REDUCTIONS = ("mean", "sum", "max", "min", "norm")

#: The aggregation of a built-in statistic: the statistic of all the group's entries together,
#: derived from the group's aggregated moments (not a combination of per-parameter values).
EXACT = "concat"


class MomentView:
    """The moments a derivation may read, by name: ``m.sumsq``, ``m.sum``..., and ``m.numel``.

    Each attribute is an array of the same shape (one value per parameter, or per group of parameters,
    per row). Only the moments the statistic declares are present, so a derivation that reads an
    undeclared moment fails at once instead of reading a column the capture did not fill.

    Args:
        columns: moment name -> ``[...]`` array.
        numel: element counts broadcastable to the columns (NaN for a group with no gradient).
    """

    __slots__ = ("_columns", "numel")

    def __init__(self, columns: Mapping[str, np.ndarray], numel: np.ndarray) -> None:
        self._columns = columns
        self.numel = numel

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self._columns[name]
        except KeyError:
            raise AttributeError(
                f"The derivation reads moment {name!r}, which its statistic does not declare; "
                f"declared: {', '.join(self._columns) or '(none)'}. Add it to the statistic's `moments`."
            ) from None


@dataclass(frozen=True)
class Statistic:
    """A registered statistic: everything gradscope knows about it, in one object.

    Attributes:
        name: the key users see (``report.stats["stat"]``, TensorBoard tags).
        fn: the definition, ``(grad, param) -> 0-d tensor`` on the gradient's device, never syncing with
            the host. For a custom statistic this is what the capture computes; for a built-in it is the
            plain reference definition (the capture derives the value from moments instead, and the
            tests hold both to agree). A statistic that ``needs_optimizer`` takes the weights before and
            after the optimizer's step instead, ``(before, after)``.
        reduce: how values combine into a layer or model aggregate: one of :data:`REDUCTIONS` for a
            custom statistic; :data:`EXACT` for a built-in.
        moments: built-ins only: the moments (:data:`gradscope.stats.moments.MOMENTS`) it is derived from.
        derive: built-ins only: ``MomentView -> array``, the value from (aggregated) moments, on the host.
            It runs with NumPy's floating-point warnings off (an empty layer gives NaN, not a warning).
        sampled: taken on sampled steps only (``sample_every``): it needs a moment that costs a pass of
            its own over the gradients or weights (beyond :data:`gradscope.stats.moments.CORE_MOMENTS`).
        needs_optimizer: the value only exists for a step the optimizer took (``update_ratio``).
    """

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    reduce: str = "mean"
    moments: tuple[str, ...] = ()
    derive: Callable[[MomentView], np.ndarray] | None = None
    sampled: bool = False
    needs_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.builtin and (not self.moments or self.reduce != EXACT):
            raise ValueError(
                f"Built-in statistic {self.name!r} must name the moments it is derived from and aggregate "
                f"exactly (reduce={EXACT!r}); got moments={self.moments!r}, reduce={self.reduce!r}."
            )
        if not self.builtin and (self.moments or self.sampled):
            raise ValueError(
                f"Statistic {self.name!r} has moments or is sampled but has no `derive`: only statistics "
                "derived from the fused moments can be."
            )

    @property
    def builtin(self) -> bool:
        """True for the statistics derived from the fused moments (the ones gradscope ships)."""
        return self.derive is not None
