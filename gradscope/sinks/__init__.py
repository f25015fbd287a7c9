"""Sinks: where statistics and findings are written (TensorBoard, CSV, any ``log_metrics`` logger, ...)."""

from __future__ import annotations

from gradscope.sinks.base import Record, ScopeInfo, Sink, SinkUpdate, StepRecords
from gradscope.sinks.csv import CSVSink
from gradscope.sinks.metrics import MetricsLoggerSink
from gradscope.sinks.mlflow import MLflowSink
from gradscope.sinks.tensorboard import TensorBoardSink
from gradscope.sinks.wandb import WandbSink

__all__ = [
    "CSVSink",
    "MLflowSink",
    "MetricsLoggerSink",
    "Record",
    "ScopeInfo",
    "Sink",
    "SinkUpdate",
    "StepRecords",
    "TensorBoardSink",
    "WandbSink",
]
