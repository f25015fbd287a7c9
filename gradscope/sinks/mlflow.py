"""MLflow output: the scalar records as metrics (batched), the findings as artifacts, the verdict as tags.

::

    import mlflow
    from gradscope.sinks.mlflow import MLflowSink

    with mlflow.start_run():
        with gradscope.watch(model, optimizer=opt, sinks=[MLflowSink()]) as scope:   # or sinks=["mlflow"]
            ...

Needs the ``mlflow`` extra (``pip install 'gradscope-torch[mlflow]'``, which installs
``mlflow-skinny``: the client, the tracking stores and ``MlflowClient``, without the server and UI).
Only the client API is used: ``MlflowClient.log_batch``, ``log_text``, ``log_dict`` and
``set_tag``.

Into which run: ``run_id`` when given; else the active run (``mlflow.start_run()``); else a new run
started at ``open`` in the current experiment and ended at ``close`` (status FINISHED whatever the
verdict: the verdict is the ``gradscope.verdict`` tag).

What is written:

* at each flush, every new step's records (:mod:`gradscope.sinks.records`) with ``log_batch``, at
  gradscope's step numbers, at most 1000 metrics per call (MLflow's limit), under the names of
  :func:`metric_name`: MLflow accepts only letters, digits, ``_ - . / :`` and spaces, so any other
  character (the ``+`` of a tied layer ``wte+head``) becomes ``_``, and a parameter's metric is
  ``gradscope/<stat>/<layer>.<param>``;
* when findings appear (or an episode ends), at the last step of that flush: the counts
  ``gradscope/findings/count``, ``.../errors``, ``.../warnings`` as metrics, and the artifacts
  ``gradscope/findings.md`` (a table) and ``gradscope/findings.json`` (``Finding.to_dict()`` of every
  finding so far; ``Finding.from_dict`` reads them back), rewritten each time;
* at ``close``: the tags ``gradscope.verdict`` (``healthy``, ``warnings`` or ``unhealthy``), ``gradscope.findings`` (the
  count) and ``gradscope.errors``, and ``gradscope/report.json`` (``Report.to_json``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradscope._validate import boolean
from gradscope.errors import ConfigurationError
from gradscope.findings import verdict
from gradscope.sinks import tags as T
from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate
from gradscope.sinks.findings_text import FindingsLedger, findings_counts, findings_table
from gradscope.sinks.records import check_stat_selection, stat_selection
from gradscope.sinks.registry import register_sink

if TYPE_CHECKING:
    from gradscope.findings import Finding
    from gradscope.report import Report

__all__ = ["MAX_BATCH", "MLflowSink", "metric_name"]

#: Metrics per ``log_batch`` call: MLflow's limit.
MAX_BATCH = 1000
_INVALID = re.compile(r"[^A-Za-z0-9_\-./: ]")


def metric_name(tag: str) -> str:
    """``tag`` as an MLflow metric name.

    Characters MLflow refuses become ``_``; a parameter's tag ``gradscope/<stat>/<layer>/<param>`` becomes ``gradscope/<stat>/<layer>.<param>`` (the parameter's
    own name in the model), since MLflow's file store keeps a metric in a file named by its path,
    where ``gradscope/<stat>/<layer>`` cannot be both a file and a folder.

    Example:
        >>> metric_name("gradscope/l2_norm/wte+head")
        'gradscope/l2_norm/wte_head'
        >>> metric_name("gradscope/l2_norm/blocks.0.fc/weight")
        'gradscope/l2_norm/blocks.0.fc.weight'
    """
    parsed = T.parse_tag(tag)
    if parsed is not None and parsed.kind == "stat" and parsed.param != "*":
        head, _, param = tag.rpartition("/")
        tag = f"{head}.{param}"
    return _INVALID.sub("_", tag)


def _mlflow() -> Any:
    try:
        import mlflow
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "gradscope's MLflow sink needs MLflow: pip install 'gradscope-torch[mlflow]' (or pip install mlflow-skinny)."
        ) from exc
    return mlflow


@register_sink("mlflow")
class MLflowSink(Sink):
    """Writes statistics, scalars and findings into an MLflow run.

    Args:
        run_id: the run to write into; None: the active run, or a new one (ended at ``close``).
        stats: the statistics written (gradient and activation); None: every one the scope collects.
            Each is one metric per layer; MLflow stores every value as a row, so a deep model may want
            fewer (``stats=["l2_norm"]``).
        per_param: also one metric per parameter (``gradscope/<stat>/<layer>/<param>``).
        findings: also the findings (counts, artifacts, tags).

    Raises:
        ModuleNotFoundError: MLflow is not installed (naming the extra), when the sink is built.
        ConfigurationError: for an invalid option; at ``open``, for a statistic the scope does not
            collect.
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        stats: Sequence[str] | None = None,
        per_param: bool = False,
        findings: bool = True,
    ) -> None:
        self._mlflow = _mlflow()
        if run_id is not None and not isinstance(run_id, str):
            raise ConfigurationError(
                f"Expected `run_id` of MLflowSink to be a run id (str) or None, but got {run_id!r}."
            )
        self.run_id = run_id
        self.stats = stat_selection("MLflowSink", stats)
        self.per_param = boolean("per_param", per_param)
        self.findings = boolean("findings", findings)
        self._client: Any = None
        self._started = False  # this sink started the run (and ends it)
        self._closed = False
        self._ledger = FindingsLedger()
        self._last_step = 0
        self._names: dict[str, str] = {}  # tag -> metric name

    def open(self, info: ScopeInfo) -> None:
        """Check ``stats``; find (or start) the run."""
        check_stat_selection("MLflowSink", self.stats, info.stats)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient()
        if self.run_id is None:
            active = self._mlflow.active_run()
            if active is None:
                active = self._mlflow.start_run()
                self._started = True
            self.run_id = active.info.run_id

    def _log(self, calls: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        names = self._names
        metrics = []
        for step, values in calls:
            for tag, value in values.items():
                name = names.get(tag)
                if name is None:
                    name = names[tag] = metric_name(tag)
                metrics.append(Metric(name, value, now, step))
        for i in range(0, len(metrics), MAX_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + MAX_BATCH])

    def write(self, update: SinkUpdate) -> None:
        """The new steps' records in batches; the findings when they changed."""
        if self._closed or self._client is None:
            return
        calls = [(g.step, g.values) for g in update.records_by_step(stats=self.stats, per_param=self.per_param)]
        if calls:
            self._last_step = max(self._last_step, calls[-1][0])
        self._log(calls)
        if self.findings:
            last = int(update.frame.steps[-1]) if len(update.frame) else self._last_step
            self._write_findings(any(self._ledger.take(update.findings, update.updated)[:2]), max(last, 1))

    def _write_findings(self, changed: bool, step: int) -> None:
        if not changed:
            return
        everything = self._ledger.everything()
        self._log([(step, findings_counts(everything))])
        self._client.log_text(self.run_id, _markdown(everything), "gradscope/findings.md")
        self._client.log_dict(self.run_id, [f.to_dict() for f in everything], "gradscope/findings.json")

    def close(self, report: Report) -> None:
        """Findings no flush passed on, the verdict tags and the report; end the run if this sink started it."""
        if self._closed or self._client is None:
            return
        self._closed = True
        try:
            if self.findings:
                # new findings or ended episodes only: the report artifact has the final details
                self._write_findings(any(self._ledger.take_report(report.findings)[:2]), max(self._last_step, 1))
                self._client.set_tag(self.run_id, "gradscope.verdict", verdict(report.findings))
                self._client.set_tag(self.run_id, "gradscope.findings", str(len(report.findings)))
                self._client.set_tag(
                    self.run_id, "gradscope.errors", str(sum(f.severity == "error" for f in report.findings))
                )
                self._client.log_text(self.run_id, report.to_json(), "gradscope/report.json")
        finally:
            if self._started:
                self._mlflow.end_run()


def _markdown(findings: Sequence[Finding]) -> str:
    lines = ["# gradscope findings", "", *findings_table(findings), ""]
    for f in findings:
        lines += [f"- **{f.kind}** at step {f.step}: {f.message} *Try:* {f.suggestion}"]
    return "\n".join(lines) + "\n"
