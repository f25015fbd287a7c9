"""``on_nonfinite="raise"``: stop in the optimizer's step pre-hook, before a NaN or Inf reaches the weights.

The recorder's pre-hook (:mod:`gradscope.capture.step`) takes the step's gradient moments and a 0-d
device flag "every captured gradient is finite". The guard's pre-hook, registered after it, reads
that flag (one host sync per recorded step, which ``on_nonfinite="raise"`` asks for) and, when a
gradient is not finite, raises before ``optimizer.step()`` updates anything: the weights are
exactly those before the step. It is registered by the scope only with ``on_nonfinite="raise"``.

``optimizer.step(closure)`` (LBFGS, Lightning) computes its gradients inside the step, after every
pre-hook: there the guard cannot see them, and ``scope.step()`` raises after the update as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from gradscope.capture.hooks import HookManager
from gradscope.capture.weakcall import WeakCall

if TYPE_CHECKING:
    from gradscope.capture.step import StepRecorder

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """Raises from the optimizer's step pre-hook when the step's captured gradients are not finite.

    Args:
        recorder: the scope's step recorder (its step in progress holds the finite flag).
        hooks: the scope's hook manager (owns the handle, under :attr:`GROUP`).
        on_bad: called when a gradient is not finite; it raises (the scope's ``NonFiniteGradientError``).
    """

    GROUP = "nonfinite-guard"

    def __init__(self, recorder: StepRecorder, hooks: HookManager, on_bad: Callable[[], None]) -> None:
        self._recorder = recorder
        self._hooks = hooks
        self._on_bad = on_bad

    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Register the pre-hook on ``optimizer`` (after the recorder's), replacing one on a previous optimizer."""
        self._hooks.remove(self.GROUP)
        if optimizer is not None:
            hook = WeakCall(self, "_on_optimizer_pre")
            self._hooks.add(self.GROUP, optimizer.register_step_pre_hook(hook))

    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending = self._recorder.pending
        if pending is None or pending.finite is None or not pending.opt_stepped:
            return  # nothing captured yet (a closure step captures later; scope.step() checks then)
        finite = pending.finite
        # sync point: on_nonfinite="raise" reads one flag per recorded step, by request, before the update.
        if bool(finite):
            pending.finite = None  # checked: scope.step() need not read it again
            return
        self._on_bad()
