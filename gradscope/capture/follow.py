"""Following the model and the optimizer after ``watch()``: what changed, and what the scope does about it.

* **A new optimizer.** Resuming from a checkpoint, an LR finder or a new training phase builds a new
  optimizer over the same parameters; the one given to ``watch()`` then never steps again, and every
  step would read as skipped. One global optimizer step pre-hook (weakly bound, nothing on the
  user's optimizers) sees any optimizer step; when an optimizer that is not the watched one updates
  watched parameters, the scope warns once and follows it (:meth:`GradScope.attach_optimizer` is the
  explicit way). Its cost per step: one identity comparison.
* **``scope.step()`` twice per optimizer step.** A step with neither an optimizer step nor a backward
  pass since the previous ``scope.step()`` is a repeated call, not a step GradScaler skipped: warned once.
* **Parameters added, replaced or converted** (``model.to()`` under
  ``torch.__future__.set_overwrite_module_params_on_conversion(True)``, a new head, ``fully_shard``
  after ``watch()``). Compared at the first step (the scope then lays the model out again, so a module
  replaced before step 1 is watched, not reported as receiving no gradient) and at every flush (an
  O(parameters) walk on the host, never per step): parameters no longer watched are named in a warning.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from gradscope.capture.hooks import HookManager
from gradscope.capture.step import GradMarker, grad_marker, same_marker
from gradscope.capture.weakcall import WeakCall

if TYPE_CHECKING:
    from gradscope.capture.layout import ParamLayout
    from gradscope.capture.step import StepRecorder

__all__ = ["REPEATED_STEP", "ModelChange", "OptimizerFollower", "RepeatDetector", "model_change"]

#: The warning for ``scope.step()`` called twice for one optimizer step.
REPEATED_STEP = (
    "scope.step() was called again with no optimizer.step() and no backward pass since the previous call: "
    "call it once per optimizer step (after opt.step()). The repeated call is recorded as a skipped step."
)


class ModelChange:
    """How the model's parameters differ from the watched layout.

    Attributes:
        unwatched: names of parameters the model has now that the layout does not watch.
        gone: names of watched parameters the model no longer has.
    """

    def __init__(self, unwatched: list[str], gone: list[str]) -> None:
        self.unwatched = unwatched
        self.gone = gone

    def __bool__(self) -> bool:
        return bool(self.unwatched or self.gone)

    def describe(self, limit: int = 6) -> str:
        """One sentence naming the parameters (the first ``limit`` of each list)."""

        def names(xs: list[str]) -> str:
            return ", ".join(xs[:limit]) + (f" and {len(xs) - limit} more" if len(xs) > limit else "")

        parts = []
        if self.unwatched:
            parts.append(f"not watched: {names(self.unwatched)}")
        if self.gone:
            parts.append(f"watched but no longer in the model: {names(self.gone)}")
        return "; ".join(parts)


def model_change(module: nn.Module, layout: ParamLayout) -> ModelChange:
    """Compare ``module``'s parameters (by identity) with those ``layout`` watches. O(parameters), host only."""
    watched = {id(t) for t in layout.tensors}
    now: dict[int, str] = {}
    for name, p in module.named_parameters():
        now.setdefault(id(p), name)
    unwatched = [name for key, name in now.items() if key not in watched]
    gone = [info.name for info, t in zip(layout.params, layout.tensors) if id(t) not in now]
    return ModelChange(unwatched, gone)


class OptimizerFollower:
    """Notices an optimizer other than the watched one stepping the watched parameters, and follows it.

    Args:
        layout: the watched parameters (read through ``get_layout``, which changes on a re-layout).
        recorder: the step recorder whose ``optimizer`` is the watched one.
        hooks: the scope's hook manager (owns the global hook's handle, under :attr:`GROUP`).
        follow: called with the new optimizer (the scope's ``attach_optimizer``).
        warn: the scope's warn-once function.
    """

    GROUP = "optimizer-follow"

    def __init__(
        self,
        get_layout: Callable[[], ParamLayout],
        get_recorder: Callable[[], StepRecorder],
        hooks: HookManager,
        follow: Callable[[torch.optim.Optimizer], None],
        warn: Callable[[str, str], None],
    ) -> None:
        self._get_layout = get_layout
        self._get_recorder = get_recorder
        self._hooks = hooks
        self._follow = follow
        self._warn = warn
        self._others: weakref.WeakSet[Any] = weakref.WeakSet()  # optimizers seen holding none of ours

    def attach(self) -> None:
        """Register the global optimizer step pre-hook (weakly bound)."""
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._hooks.remove(self.GROUP)
        self._hooks.add(self.GROUP, register_optimizer_step_pre_hook(WeakCall(self, "_on_any_step")))

    def _on_any_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        recorder = self._get_recorder()
        if optimizer is recorder.optimizer or optimizer in self._others:
            return
        try:
            watched = {id(t) for t in self._get_layout().tensors}
            ours = any(id(p) in watched for group in optimizer.param_groups for p in group["params"])
        except Exception:  # an optimizer-like object without param_groups: not ours to follow
            ours = False
        if not ours:
            self._others.add(optimizer)
            return
        old = recorder.optimizer
        self._warn(
            "optimizer-followed",
            f"A {type(optimizer).__name__} that is not the optimizer passed to watch() ({type(old).__name__}) "
            "is stepping the watched parameters (re-created after a resume, an LR finder or a new phase): "
            "gradscope follows it from this step. Call scope.attach_optimizer(new_optimizer) when you "
            "create one, to say so explicitly.",
        )
        # Its step pre-hooks run after this global one, so the hooks attached now capture this step.
        try:
            self._follow(optimizer)
        except Exception as exc:  # a hook inside the user's optimizer.step() must never raise
            self._others.add(optimizer)
            self._warn("optimizer-follow-failed", f"gradscope could not follow the new optimizer: {exc}")


class RepeatDetector:
    """Tells a repeated ``scope.step()`` (no optimizer step and no backward since the previous one) apart.

    A step whose optimizer pre-hook did not run is a step GradScaler skipped, unless no gradient was
    written since the previous ``scope.step()`` either: then ``scope.step()`` was called twice for one
    optimizer step.
    """

    def __init__(self) -> None:
        self._marker: GradMarker | None = None

    def repeated(self, recorder: StepRecorder, layout: ParamLayout) -> bool:
        """Whether the step ending now repeats the previous one (call before ``recorder.finish``)."""
        pending = recorder.pending
        if pending is None or recorder.optimizer is None or pending.opt_stepped or pending.grads_done:
            return False
        marker = grad_marker(layout.tensors)
        if marker is None:
            return True
        return same_marker(self._marker, marker)

    def ended(self, layout: ParamLayout, recorder: StepRecorder, step: int) -> None:
        """Note the gradients as they are at the end of step ``step`` (call after ``recorder.finish``).

        The marker ``recorder.finish`` read for this step is reused (one scan of the gradients per step).
        """
        known = recorder.end_marker
        self._marker = known[1] if known[0] == step else grad_marker(layout.tensors)
