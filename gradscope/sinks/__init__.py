"""Sinks: where statistics and findings are written (TensorBoard, CSV, any ``log_metrics`` logger, ...)."""

from __future__ import annotations

from gradscope.sinks.base import Record, ScopeInfo, Sink, SinkUpdate, StepRecords
from gradscope.sinks.csv import CSVSink
from gradscope.sinks.metrics import MetricsLoggerSink
from gradscope.sinks.tensorboard import TensorBoardSink

__all__ = [
    "CSVSink",
    "MetricsLoggerSink",
    "Record",
    "ScopeInfo",
    "Sink",
    "SinkUpdate",
    "StepRecords",
    "TensorBoardSink",
]
