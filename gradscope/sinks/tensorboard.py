"""TensorBoard output: per-layer scalars, the loss, and findings as text, in one run."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from gradscope.registry import register_sink
from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate

if TYPE_CHECKING:
    from gradscope.report import Report

__all__ = ["TensorBoardSink", "layer_tag"]

ROOT_TAG = "_root"
MODEL_TAG = "_model"


def layer_tag(stat: str, layer: str) -> str:
    """TensorBoard tag of a layer statistic: ``gradscope/<stat>/<layer>`` (``_root``, ``_model`` for the model)."""
    name = MODEL_TAG if layer == "*" else (layer or ROOT_TAG)
    return f"gradscope/{stat}/{name}"


def _summary_writer(log_dir: str | os.PathLike[str]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as exc:  # pragma: no cover - tensorboard is a dependency
        raise ModuleNotFoundError(
            "gradscope's TensorBoard output needs the `tensorboard` package: pip install tensorboard"
        ) from exc
    return SummaryWriter(log_dir=str(log_dir))


@register_sink("tensorboard")
class TensorBoardSink(Sink):
    """Writes per-layer statistics, the loss and the findings into one TensorBoard run.

    Tags: ``gradscope/<stat>/<layer>``, ``gradscope/scalar/<name>`` for the loss and user scalars, and
    findings as markdown text; ``add_scalar`` only (never ``add_scalars``, which makes a file per tag).

    Args:
        log_dir: folder of the run; or
        writer: the user's own ``SummaryWriter`` (gradscope writes into it and never closes it).
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardSink needs exactly one of `log_dir` or `writer`.")
        self._own = writer is None
        self._log_dir = log_dir
        self.writer = writer
        self._closed = False

    def open(self, info: ScopeInfo) -> None:
        """Create the writer (when given a folder)."""
        if self.writer is None:
            self.writer = _summary_writer(self._log_dir)  # type: ignore[arg-type]
        self._info = info

    def write(self, update: SinkUpdate) -> None:
        """Add the new rows' layer and model scalars, scalars passed to step, and new findings."""
        if self._closed or self.writer is None:
            return
        frame, start = update.frame, update.new_from
        steps = frame.steps[start:]
        keep = ~frame.skipped[start:]
        w = self.writer
        layers = frame.schema.layers
        for stat in frame.schema.stats:
            per_layer = frame.layer_values(stat)[start:]
            whole = frame.global_values(stat)[start:]
            for r, step in enumerate(steps):
                if not keep[r]:
                    continue
                s = int(step)
                for j, layer in enumerate(layers):
                    v = per_layer[r, j]
                    if not np.isnan(v):
                        w.add_scalar(layer_tag(stat, layer), float(v), s)
                if not np.isnan(whole[r]):
                    w.add_scalar(layer_tag(stat, "*"), float(whole[r]), s)
        for name in frame.scalar_names:
            vals = frame.scalar(name)[start:]
            for r, step in enumerate(steps):
                if not np.isnan(vals[r]):
                    w.add_scalar(f"gradscope/scalar/{name}", float(vals[r]), int(step))
        for f in update.findings:
            where = f"`{f.layer}`" if f.layer is not None else "the model"
            w.add_text(
                "gradscope/findings",
                f"**{f.severity}: {f.kind}** in {where} at step {f.step}\n\n{f.message}\n\n*Try:* {f.suggestion}",
                f.step,
            )
        w.flush()

    def flush(self) -> None:
        """Flush the writer."""
        if self.writer is not None and not self._closed:
            self.writer.flush()

    def close(self, report: Report) -> None:
        """Write the final verdict; close the writer if gradscope created it."""
        if self._closed or self.writer is None:
            return
        self._closed = True
        verdict = "healthy" if not report.findings else ("unhealthy" if not report.ok else "warnings")
        self.writer.add_text("gradscope/verdict", f"**{verdict}**\n\n```\n{report}\n```", report.steps)
        self.writer.flush()
        if self._own:
            self.writer.close()
