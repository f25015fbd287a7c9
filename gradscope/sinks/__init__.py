"""Sinks: where statistics and findings are written (TensorBoard, ...)."""

from __future__ import annotations

from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate
from gradscope.sinks.tensorboard import TensorBoardSink

__all__ = ["ScopeInfo", "Sink", "SinkUpdate", "TensorBoardSink"]
