"""The parts of a scope's lifecycle that are not its public API: building, re-layout, stopping.

:class:`gradscope.scope.GradScope` stays wiring and lifecycle; these functions take the scope and do
the work: :func:`build_parts` lays the model out and builds what depends on the layout (again when
the model changed before step 1, :func:`relayout_if_changed`), :func:`attach_parts` registers the
hooks and opens the sinks, :func:`warn_unwatched` names parameters added after the layout,
:func:`stop` and :func:`raise_nonfinite` end a run on request.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gradscope.capture.activations import ActivationMonitor
from gradscope.capture.distributed import DistributedContext
from gradscope.capture.follow import model_change
from gradscope.capture.guard import NonFiniteGuard
from gradscope.capture.live import Diagnosis, stop_message
from gradscope.capture.nonfinite import auto_locate
from gradscope.capture.order import ForwardOrder
from gradscope.capture.step import StepRecorder
from gradscope.capture.target import check_buffer_size, unwrap_optimizer, watchable_layout
from gradscope.capture.weakcall import WeakCall
from gradscope.errors import ConfigurationError, GradientHealthError, NonFiniteGradientError
from gradscope.sinks.base import ScopeInfo
from gradscope.stats.moments import MomentPlan

__all__ = [
    "attach_optimizer",
    "attach_parts",
    "build_parts",
    "nonfinite_in_step",
    "raise_nonfinite",
    "relayout_if_changed",
    "stop",
    "warn_unwatched",
]


def build_parts(scope: Any, *, first: bool) -> None:
    """Lay the model out and build the parts that depend on the layout (again after a re-layout)."""
    target, options = scope.module, scope.options
    layout = watchable_layout(target)
    plan = MomentPlan.for_statistics(scope.stat_names)
    check_buffer_size(scope.flush_every, len(layout.params), plan.n_cols)
    scope.layout = layout
    acts = ActivationMonitor(target, scope._hooks) if scope._want_acts else None
    if first:
        scope._unwatched_checks = 0  # flushes that looked for parameters added since (warn_unwatched)
        scope._dist = DistributedContext.detect(layout.tensors, options.distributed)
        # "noise_scale": the estimator's scalars, which the batch-size rules read (watch(noise_scale=...))
        collected = [*scope.stat_names, *(["noise_scale"] if options.noise_scale is not False else [])]
        scope.engine.check_requirements(collected, activations=bool(acts and acts.paths) or scope._want_acts)
    scope._order = ForwardOrder(layout, scope._hooks)
    scope.device = next(t.device for t in layout.tensors if t.requires_grad)
    scope._recorder = StepRecorder(
        layout=layout, plan=plan, options=options, stat_names=scope.stat_names, optimizer=scope.optimizer,
        device=scope.device, acts=acts, dist=scope._dist, hooks=scope._hooks,
        warn=WeakCall(scope, "_warn"), problem=WeakCall(scope, "_problem"),
    )  # fmt: skip
    scope.schema, scope.frame = scope._recorder.schema, scope._recorder.frame
    scope._diagnosis = Diagnosis(
        engine=scope.engine, recorder=scope._recorder, order=scope._order, options=options,
        has_optimizer=scope.optimizer is not None, dist=scope._dist, sinks=scope._sinks, problem=scope._problem,
    )  # fmt: skip


def attach_parts(scope: Any) -> None:
    """Register the recorder's hooks and the forward-order hook; open the sinks on the layout."""
    acts = scope._recorder.acts
    scope._recorder.attach(type(scope.module).__name__, scope._sinks)
    # The origin of the first NaN, found without being asked: no module hook until then (on a CPU, an
    # optimizer pre-hook after the recorder's own copies the weights before an update that writes NaN).
    auto_locate(scope)
    if not scope.compiled:
        # Learn the depth order of layers from the first forward pass (removed after it).
        scope._order.attach(scope.module, acts.entries if acts else [])
    info = ScopeInfo(
        layout=scope.layout,
        model_name=type(scope.module).__name__,
        stats=scope.stat_names,
        every=scope.every,
        activation_modules=acts.paths if acts else [],
    )
    for sink in scope._sinks:
        sink.open(info)


#: Flushes that look for parameters added after the layout, every one at first; then one flush in this many,
#: and the last (walking ``named_parameters()`` costs O(modules): 0.6 ms per flush on a 129-layer MLP).
UNWATCHED_CHECK_EVERY = 8


def warn_unwatched(scope: Any, *, final: bool = False) -> None:
    """Warn, once per set, naming parameters the model gained after its layout (they are not watched).

    Checked at each of the first :data:`UNWATCHED_CHECK_EVERY` flushes (a model is usually changed early:
    a head added, a lazy module materialised), then at one flush in that many, and at the last.
    """
    done = scope._unwatched_checks
    scope._unwatched_checks = done + 1
    if not final and done >= UNWATCHED_CHECK_EVERY and done % UNWATCHED_CHECK_EVERY:
        return
    change = model_change(scope.module, scope.layout)
    if change.unwatched:
        scope._warn(
            f"model-changed:{','.join(change.unwatched[:6])}",
            f"The {type(scope.module).__name__} changed after watch() ({change.describe()}): gradscope keeps "
            "watching the parameters it laid out at step 1. Watch the model after building it fully "
            "(and after .to(), fully_shard), or close this scope and watch it again.",
        )


def relayout_if_changed(scope: Any) -> None:
    """At step 1, before anything is recorded: lay out again a model whose parameters changed since watch()."""
    if scope.compiled or not model_change(scope.module, scope.layout):
        return
    old, opt_stepped = scope._recorder, bool(scope._recorder.pending and scope._recorder.pending.opt_stepped)
    old.close()
    for group in ("optimizer", ForwardOrder.GROUP, ActivationMonitor.GROUP):
        scope._hooks.remove(group)
    try:
        build_parts(scope, first=False)
        attach_parts(scope)
    except Exception as exc:  # monitoring must never stop training: keep the old layout
        scope._problem("relayout", f"laying out the changed model failed: {type(exc).__name__}: {exc}")
        return
    if scope._guard is not None:
        scope._guard = NonFiniteGuard(scope._recorder, scope._hooks, WeakCall(scope, "_nonfinite"))
        scope._guard.attach(scope.optimizer)
    scope._recorder.begin(1)
    if scope._recorder.pending is not None:
        scope._recorder.pending.opt_stepped = opt_stepped  # the optimizer stepped; gradients taken now


def stop(scope: Any, found: list) -> None:
    """Raise ``GradientHealthError`` for ``stop_on`` findings, after writing ``report_path``."""
    written = None
    if scope.report_path is not None and scope._dist.writes:
        try:  # confirmed findings only: the file never contradicts the one close() writes
            scope._make_report().to_json(scope.report_path)
            written = os.fspath(scope.report_path)
        except Exception as exc:
            scope._problem("report-path", f"writing the report to {scope.report_path!r} failed: {exc}")
    report = scope._make_report()
    raise GradientHealthError(stop_message(found, scope.options.stop_on, scope._step, written), report=report)


def nonfinite_in_step(scope: Any) -> None:
    """The guard saw a non-finite gradient in the optimizer's pre-hook: end the step and raise."""
    scope._step += 1
    recorder = scope._recorder
    recorder.finish({}, scope._step)
    recorder.end_step()
    recorder.begin(scope._step + 1)
    raise_nonfinite(
        scope, " Raised in optimizer.step() before the update: the weights are intact (this step changed nothing)."
    )


def raise_nonfinite(scope: Any, note: str = "") -> None:
    """Raise ``NonFiniteGradientError`` naming the finding (or the first bad layer), ``note`` appended."""
    new = scope._flush(final=False)
    found = [f for f in scope.engine.findings if f.kind == "nonfinite_gradients" and f.step == scope._step] or [
        f for f in new if f.severity == "error"
    ]
    if found:
        msg = "\n".join(str(f) for f in found)
    else:
        bad = scope._recorder.nonfinite_layer(scope._order.depth_order())
        msg = f"Non-finite gradient at step {scope._step}; first layer in backward order: {bad or '(unknown)'!r}."
    raise NonFiniteGradientError(msg + note, report=scope._make_report())


def attach_optimizer(scope: Any, optimizer: Any) -> None:
    """Move the scope's optimizer hooks (recorder, non-finite guard) to ``optimizer`` (see ``GradScope.attach_optimizer``)."""
    if optimizer is None or not isinstance(unwrap_optimizer(optimizer), torch.optim.Optimizer):
        raise ConfigurationError(
            f"Expected `optimizer` to be a torch.optim.Optimizer, but got {type(optimizer).__name__}. "
            "Pass the optimizer whose step() your loop now calls."
        )
    if scope._closed or scope.optimizer is None:
        why = "is closed" if scope._closed else "was watched without an optimizer (watch(model, optimizer=opt))"
        raise ConfigurationError(f"scope.attach_optimizer() cannot be used: this scope {why}.")
    optimizer = unwrap_optimizer(optimizer)
    if optimizer is None or optimizer is scope._recorder.optimizer:
        return
    scope._recorder.attach_optimizer(optimizer)
    auto_locate(scope)  # its pre-hook follows the recorder's to the new optimizer
    if scope._guard is not None:
        scope._guard.attach(optimizer)
    scope.optimizer = optimizer
