"""The ``meta`` block of a scope's :class:`~gradscope.report.Report`: what was watched, and how."""

from __future__ import annotations

from typing import Any

__all__ = ["report_meta"]


def report_meta(scope: Any, live: dict | None = None) -> dict[str, Any]:
    """``report.meta`` of ``scope`` now (``live``: the provisional judgement of ``report()``, if any)."""
    recorder, layout = scope._recorder, scope.layout
    meta: dict[str, Any] = {
        "model": type(scope.module).__name__,
        "parameters": int(sum(p.numel for p in layout.params)),
        "trainable_parameters": int(sum(t.numel() for t in layout.tensors if t.requires_grad)),
        "tensors": len(layout.params),
        "layers": len(layout.layers),
        "layers_by_depth": scope.layers_by_depth(),
        "device": str(scope.device),
        "steps": scope._step,
        "recorded_steps": len(scope.frame) + recorder.waiting,
        "every": scope.every,
        "sample_every": scope.sample_every,
        "stats": list(scope.stat_names),
        "rules": [r.name for r in scope.engine.rules],
        "optimizer": type(scope.optimizer).__name__ if scope.optimizer is not None else None,
        "history": scope.frame.history_info(),
        "compiled": scope.compiled,
        "activations": recorder.acts is not None and bool(recorder.acts.entries),
    }
    dist = scope._dist
    if dist.world_size > 1:
        meta["distributed"] = {**dist.describe(), "unreduced_rows_dropped": recorder.unreduced_rows}
    if scope._ended_by is not None:
        meta["ended_by"] = scope._ended_by
    if live is not None:
        meta["live"] = live
    return meta
