"""Any tracker with a ``log_metrics(metrics, step=...)`` method: Lightning loggers, MLflow.

::

    from lightning.pytorch.loggers import CSVLogger      # or MLFlowLogger, WandbLogger, TensorBoardLogger
    scope = gradscope.watch(model, optimizer=opt, sinks=[MetricsLoggerSink(CSVLogger("logs"))])

    import mlflow                                         # mlflow.log_metrics(metrics, step=...) too
    scope = gradscope.watch(model, optimizer=opt, sinks=[MetricsLoggerSink(mlflow)])

MLflow accepts only letters, digits and ``_ / . -`` and spaces in a metric name: a tied layer
(``wte+head``) makes ``mlflow.log_metrics`` raise, where Lightning's ``MLFlowLogger`` drops the ``+``
with a warning.

At each flush, ``logger.log_metrics({tag: value, ...}, step=step)`` is called once per new step with
that step's records (:mod:`gradscope.sinks.records`): the statistics per layer and for the model,
the activation statistics and the scalars passed to ``scope.step``, under gradscope's tags
(``gradscope/l2_norm/_model``...). Findings are not metrics: they stay in the report (and in the
other sinks, such as TensorBoard's text). gradscope never closes or finalises the logger.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradscope._validate import boolean
from gradscope.errors import ConfigurationError
from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate
from gradscope.sinks.records import check_stat_selection, stat_selection
from gradscope.sinks.registry import register_sink

if TYPE_CHECKING:
    from gradscope.report import Report

__all__ = ["MetricsLoggerSink"]


@register_sink("metrics_logger")
class MetricsLoggerSink(Sink):
    """Writes each step's records through ``logger.log_metrics(metrics: dict[str, float], step=int)``.

    That is the interface of every Lightning logger (``CSVLogger``, ``MLFlowLogger``,
    ``WandbLogger``, ``TensorBoardLogger``...) and of ``mlflow.log_metrics``. The dict passed is a
    fresh one at each call, so a logger may keep or change it.

    Args:
        logger: the object whose ``log_metrics`` is called.
        stats: the statistics written (gradient and activation); None: every one the scope collects.
            Each is one metric per layer and step; trackers that charge per metric may want fewer.
        per_param: also one metric per parameter (``gradscope/<stat>/<layer>/<param>``).

    Raises:
        ConfigurationError: when ``logger`` has no callable ``log_metrics``, or for an invalid option.
    """

    def __init__(self, logger: Any, *, stats: Sequence[str] | None = None, per_param: bool = False) -> None:
        log_metrics = getattr(logger, "log_metrics", None)
        if not callable(log_metrics):
            raise ConfigurationError(
                f"MetricsLoggerSink needs an object with a log_metrics(metrics, step=...) method, but "
                f"{type(logger).__name__} has none. Pass a Lightning logger (CSVLogger, MLFlowLogger, WandbLogger...) "
                "or the mlflow module; for wandb itself, use lightning's WandbLogger or write a Sink that calls "
                "wandb.log(metrics, step=step)."
            )
        self.logger = logger
        self.stats = stat_selection("MetricsLoggerSink", stats)
        self.per_param = boolean("per_param", per_param)
        self._log_metrics = log_metrics
        self._closed = False

    def open(self, info: ScopeInfo) -> None:
        """Check ``stats`` against what the scope collects."""
        check_stat_selection("MetricsLoggerSink", self.stats, info.stats)

    def write(self, update: SinkUpdate) -> None:
        """One ``log_metrics`` call per new step, in step order."""
        if self._closed:
            return
        for group in update.records_by_step(stats=self.stats, per_param=self.per_param):
            # a copy: the groups are shared by every sink of the flush
            self._log_metrics(dict(group.values), step=group.step)

    def close(self, report: Report) -> None:
        """Stop writing (the logger stays open: it is yours)."""
        self._closed = True
