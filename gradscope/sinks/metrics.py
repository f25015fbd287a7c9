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
(``gradscope/l2_norm/_model``...). gradscope never closes or finalises the logger.

Findings, when a flush reports new ones (or an episode ends), at the last step of that flush:

* as metrics, for every logger: ``gradscope/findings/count``, ``.../errors``, ``.../warnings``
  (how many findings so far), so a CSV file or a tracker's chart shows when they appeared;
* as text where the logger takes text: Lightning's ``WandbLogger`` (``log_text``: a table of every
  finding so far, under ``gradscope/findings``), Lightning's ``MLFlowLogger`` and the ``mlflow``
  module (``log_text``: the artifact ``gradscope/findings.md``, rewritten with every finding so
  far). Other loggers (``CSVLogger``...) get the counts only; the findings are in the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gradscope._validate import boolean
from gradscope.errors import ConfigurationError
from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate
from gradscope.sinks.findings_text import FINDINGS_COLUMNS, FindingsLedger, finding_row, findings_counts, findings_table
from gradscope.sinks.records import check_stat_selection, stat_selection
from gradscope.sinks.registry import register_sink

if TYPE_CHECKING:
    from gradscope.findings import Finding
    from gradscope.report import Report

__all__ = ["FINDINGS_ARTIFACT", "FINDINGS_TEXT_KEY", "MetricsLoggerSink", "text_writer"]

#: Where the findings go as text: the W&B table's key, the MLflow artifact's path.
FINDINGS_TEXT_KEY = "gradscope/findings"
FINDINGS_ARTIFACT = "gradscope/findings.md"


def _markdown(findings: Sequence[Finding]) -> str:
    return "\n".join(["# gradscope findings", "", *findings_table(findings), ""])


def text_writer(logger: Any) -> Callable[[Sequence[Finding], int], None] | None:
    """How ``logger`` takes the findings as text: ``write(findings so far, step)``, or None (counts only).

    Recognised by name, so that no tracker is imported here: Lightning's ``WandbLogger``
    (``log_text``, a table) and ``MLFlowLogger`` (its client's ``log_text``, an artifact), and the
    ``mlflow`` module (``mlflow.log_text``, an artifact of the active run).
    """
    kind = type(logger).__name__
    if kind == "WandbLogger" and callable(getattr(logger, "log_text", None)):

        def wandb_table(findings: Sequence[Finding], step: int) -> None:
            logger.log_text(
                key=FINDINGS_TEXT_KEY,
                columns=list(FINDINGS_COLUMNS),
                data=[finding_row(f) for f in findings],
                step=step,
            )

        return wandb_table
    if kind == "MLFlowLogger":

        def mlflow_logger_artifact(findings: Sequence[Finding], step: int) -> None:
            logger.experiment.log_text(logger.run_id, _markdown(findings), FINDINGS_ARTIFACT)

        return mlflow_logger_artifact
    if getattr(logger, "__name__", None) == "mlflow" and callable(getattr(logger, "log_text", None)):

        def mlflow_artifact(findings: Sequence[Finding], step: int) -> None:
            logger.log_text(_markdown(findings), FINDINGS_ARTIFACT)

        return mlflow_artifact
    return None


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
        findings: also the findings: counts as metrics, and text where the logger takes it (see
            :func:`text_writer`).

    Raises:
        ConfigurationError: when ``logger`` has no callable ``log_metrics``, or for an invalid option.
    """

    def __init__(
        self, logger: Any, *, stats: Sequence[str] | None = None, per_param: bool = False, findings: bool = True
    ) -> None:
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
        self.findings = boolean("findings", findings)
        self._log_metrics = log_metrics
        self._closed = False
        self._ledger = FindingsLedger()
        self._text = text_writer(logger) if self.findings else None
        self._last_step = 0

    def open(self, info: ScopeInfo) -> None:
        """Check ``stats`` against what the scope collects."""
        check_stat_selection("MetricsLoggerSink", self.stats, info.stats)

    def write(self, update: SinkUpdate) -> None:
        """One ``log_metrics`` call per new step, in step order; the findings' counts join the last one."""
        if self._closed:
            return
        groups = update.records_by_step(stats=self.stats, per_param=self.per_param)
        # a copy: the groups are shared by every sink of the flush
        calls = [(group.step, dict(group.values)) for group in groups]
        if self.findings:
            last = int(update.frame.steps[-1]) if len(update.frame) else self._last_step
            self._add_findings(calls, update.findings, update.updated, last, final=False)
        for step, metrics in calls:
            self._log_metrics(metrics, step=step)
            self._last_step = max(self._last_step, step)

    def _add_findings(
        self,
        calls: list[tuple[int, dict[str, float]]],
        new: Sequence[Finding],
        updated: Sequence[Finding],
        step: int,
        *,
        final: bool,
    ) -> None:
        fresh, changed, _ = self._ledger.take(new, updated, final=final)
        if not (fresh or changed):  # a later last_step alone changes no count
            return
        everything = self._ledger.everything()
        counts = findings_counts(everything)
        if calls and calls[-1][0] == step:
            calls[-1][1].update(counts)
        else:
            calls.append((step, counts))
        if self._text is not None:
            self._text(everything, step)

    def close(self, report: Report) -> None:
        """Findings no flush passed on (an episode that ended); then stop writing (the logger is yours)."""
        if self._closed:
            return
        self._closed = True
        if self.findings:
            calls: list[tuple[int, dict[str, float]]] = []
            confirmed = [f for f in report.findings if not f.provisional]
            known = self._ledger.known
            self._add_findings(
                calls,
                [f for f in confirmed if (f.kind, f.layer) not in known],
                [f for f in confirmed if (f.kind, f.layer) in known],
                max(self._last_step, 1),
                final=True,
            )
            for step, metrics in calls:
                self._log_metrics(metrics, step=step)
