"""Weights & Biases output: the scalar records with ``run.log``, the findings as a table and in the summary.

::

    import wandb
    from gradscope.sinks.wandb import WandbSink

    run = wandb.init(project="my-project")
    with gradscope.watch(model, optimizer=opt, sinks=[WandbSink(run)]) as scope:   # or sinks=["wandb"]
        ...

Needs the ``wandb`` extra (``pip install 'gradscope-torch[wandb]'``).

Into which run: ``run`` when given; else the active run (``wandb.run``); else a new run started at
``open`` with ``wandb.init(**init)`` and finished at ``close``.

Steps: W&B keeps one step counter per run and drops a ``log`` whose ``step=`` is below the last one,
so logging at gradscope's step numbers with ``step=`` would fight your own ``wandb.log`` calls.
Instead every gradscope row carries its step as the metric ``gradscope/step``, declared with
``run.define_metric("gradscope/*", step_metric="gradscope/step")``: W&B charts gradscope's metrics
against gradscope's steps, whatever else the run logs.

What is written:

* at each flush, one ``run.log`` per new step with that step's records (:mod:`gradscope.sinks.records`)
  and ``gradscope/step``;
* when findings appear (or an episode ends), at the last step of that flush: a ``wandb.Table`` of
  every finding so far under ``gradscope/findings`` (columns
  :data:`gradscope.sinks.findings_text.FINDINGS_COLUMNS`), and the counts
  ``gradscope/findings/count``, ``.../errors``, ``.../warnings``;
* at ``close``: the summary keys ``gradscope/verdict`` (``healthy``, ``warnings`` or ``unhealthy``),
  ``gradscope/findings/count`` and ``gradscope/findings/errors``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradscope._validate import boolean
from gradscope.errors import ConfigurationError
from gradscope.findings import verdict
from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate
from gradscope.sinks.findings_text import FINDINGS_COLUMNS, FindingsLedger, finding_row, findings_counts
from gradscope.sinks.records import check_stat_selection, stat_selection
from gradscope.sinks.registry import register_sink

if TYPE_CHECKING:
    from gradscope.report import Report

__all__ = ["STEP_METRIC", "WandbSink"]

#: The metric holding gradscope's step in every row gradscope logs.
STEP_METRIC = "gradscope/step"


def _wandb() -> Any:
    try:
        import wandb
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "gradscope's W&B sink needs wandb: pip install 'gradscope-torch[wandb]' (or pip install wandb)."
        ) from exc
    return wandb


@register_sink("wandb")
class WandbSink(Sink):
    """Writes statistics, scalars and findings into a W&B run.

    Args:
        run: the ``wandb`` run to write into; None: ``wandb.run``, or a new one (finished at ``close``).
        init: keyword arguments of ``wandb.init`` when this sink starts the run (``project``...).
        stats: the statistics written (gradient and activation); None: every one the scope collects.
        per_param: also one metric per parameter (``gradscope/<stat>/<layer>/<param>``).
        findings: also the findings (table, counts, summary).

    Raises:
        ModuleNotFoundError: wandb is not installed (naming the extra), when the sink is built.
        ConfigurationError: for an invalid option; at ``open``, for a statistic the scope does not
            collect.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        init: Mapping[str, Any] | None = None,
        stats: Sequence[str] | None = None,
        per_param: bool = False,
        findings: bool = True,
    ) -> None:
        self._wandb = _wandb()
        if run is not None and not callable(getattr(run, "log", None)):
            raise ConfigurationError(
                f"Expected `run` of WandbSink to be a wandb run (from wandb.init()) or None, but got {type(run).__name__}."
            )
        if init is not None and not isinstance(init, Mapping):
            raise ConfigurationError(
                f"Expected `init` of WandbSink to be a dict of wandb.init arguments, but got {init!r}."
            )
        self.run = run
        self.init = dict(init or {})
        self.stats = stat_selection("WandbSink", stats)
        self.per_param = boolean("per_param", per_param)
        self.findings = boolean("findings", findings)
        self._started = False  # this sink started the run (and finishes it)
        self._closed = False
        self._ledger = FindingsLedger()
        self._last_step = 0

    def open(self, info: ScopeInfo) -> None:
        """Check ``stats``; find (or start) the run; declare gradscope's step metric."""
        check_stat_selection("WandbSink", self.stats, info.stats)
        if self.run is None:
            self.run = self._wandb.run
            if self.run is None:
                self.run = self._wandb.init(**self.init)
                self._started = True
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("gradscope/*", step_metric=STEP_METRIC)

    def write(self, update: SinkUpdate) -> None:
        """One ``run.log`` per new step; the findings when they changed."""
        if self._closed or self.run is None:
            return
        for group in update.records_by_step(stats=self.stats, per_param=self.per_param):
            self.run.log({**group.values, STEP_METRIC: group.step})
            self._last_step = max(self._last_step, group.step)
        if self.findings:
            last = int(update.frame.steps[-1]) if len(update.frame) else self._last_step
            self._write_findings(any(self._ledger.take(update.findings, update.updated)[:2]), max(last, 1))

    def _write_findings(self, changed: bool, step: int) -> None:
        if not changed:
            return
        everything = self._ledger.everything()
        table = self._wandb.Table(columns=list(FINDINGS_COLUMNS), data=[finding_row(f) for f in everything])
        self.run.log({"gradscope/findings": table, **findings_counts(everything), STEP_METRIC: step})

    def close(self, report: Report) -> None:
        """Findings no flush passed on, the verdict in the summary; finish the run if this sink started it."""
        if self._closed or self.run is None:
            return
        self._closed = True
        try:
            if self.findings:
                # new findings or ended episodes only: report.findings has the final details
                self._write_findings(any(self._ledger.take_report(report.findings)[:2]), max(self._last_step, 1))
                self.run.summary["gradscope/verdict"] = verdict(report.findings)
                self.run.summary["gradscope/findings/count"] = len(report.findings)
                self.run.summary["gradscope/findings/errors"] = sum(f.severity == "error" for f in report.findings)
        finally:
            if self._started:
                self.run.finish()
