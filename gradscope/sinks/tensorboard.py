"""TensorBoard output: everything in one run, written at flushes, computed on the device.

What lands in the run (tags in :mod:`gradscope.sinks.tags`):

* **scalars**: every collected statistic per layer (``gradscope/<stat>/<layer>``) and for the whole
  model (``gradscope/<stat>/_model``; ``gradscope/l2_norm/_model`` is the global gradient norm), the
  activation statistics per activation module, and the scalars passed to ``scope.step``
  (``gradscope/scalar/loss``...): the records of :mod:`gradscope.sinks.records`, whose steps and
  values are those of ``report.stats`` (stored as float32, TensorBoard's scalar type) but for NaN
  values, which are not written; skipped optimizer steps are left out, as in ``report.stats``.
  Per-parameter tags (``gradscope/<stat>/<layer>/<param>``) with ``per_param=True``. All the values
  of a step go into one event (see :mod:`gradscope.sinks.tensorboard_events`); never ``add_scalars``.
* a **custom-scalars layout** (:mod:`gradscope.sinks.layout`), written at the first flush.
* **histograms** of each layer's gradients (and weights with ``histogram_weights=True``) on the
  first recorded step of every ``histogram_every`` steps (1, 101, 201... by default), computed on
  the device (:mod:`gradscope.sinks.histograms`) and written at the next flush, one event per
  histogram as ``add_histogram_raw`` writes it; a layer holding NaN or Inf is not written at that
  step, nor are sharded (FSDP2 / DTensor) parameters.
* **findings** as markdown text (``gradscope/findings``) at the step each was first seen, and the
  final verdict (``gradscope/verdict``) at ``close()``.
* the **gradient-flow figure** (``gradscope/figures/gradient_flow``) at the first flush after
  every ``figure_every`` steps and at ``close()``, plus the layer x step heat map at ``close()``.
* machine-readable JSON records (plugin ``gradscope``, not displayed) from which
  ``gradscope report LOGDIR`` rebuilds the findings and the run's facts.

Where it goes: with ``log_dir``, an event file gradscope writes itself
(:class:`~gradscope.sinks.tensorboard_events.EventFile`: scalar events encoded in bulk, checksums in
one pass, one ``write`` per flush); with ``writer``, your ``SummaryWriter``'s own file, through its
``file_writer``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradscope._validate import boolean, optional_positive_int
from gradscope.errors import ConfigurationError
from gradscope.findings import Finding, count_errors, jsonable, verdict
from gradscope.sinks import tags as T
from gradscope.sinks.base import ScopeInfo, Sink, SinkUpdate
from gradscope.sinks.findings_text import FindingsLedger, finding_markdown, findings_table, update_markdown
from gradscope.sinks.histograms import HistogramRows, histogram_rows
from gradscope.sinks.records import check_stat_selection, stat_selection
from gradscope.sinks.registry import register_sink
from gradscope.sinks.tensorboard_events import EventFile, ScalarEvents, summary_event
from gradscope.stats.frame import ACTIVATION_STATISTICS

if TYPE_CHECKING:
    from torch import Tensor

    from gradscope.capture.layout import ParamInfo
    from gradscope.report import Report
    from gradscope.stats.frame import StatsFrame

__all__ = ["FIRST_FIGURE_SECONDS", "TensorBoardSink", "check_writer", "layer_tag", "verdict_markdown"]

layer_tag = T.layer_tag

#: Schema of the ``gradscope/_meta`` and ``gradscope/_report`` records.
RUN_SCHEMA = "gradscope.run"
RUN_SCHEMA_VERSION = 1

#: What the first regular gradient-flow figure is taken to cost before one was drawn (seconds), for
#: ``figure_budget``: matplotlib's import and a first drawing measured 0.2-0.85 s. At the default 2 %,
#: the first regular figure waits until the run has trained 25 s (at ``figure_every=1000``: a 100 ms
#: step still gets it at step 1000, a 20 ms step at step 2000; the figure at ``close()`` is always drawn).
FIRST_FIGURE_SECONDS = 0.5


def check_writer(writer: Any) -> None:
    """Raise ``ConfigurationError`` unless ``writer`` is a ``torch.utils.tensorboard.SummaryWriter``."""
    from torch.utils.tensorboard import SummaryWriter

    if not isinstance(writer, SummaryWriter):
        raise ConfigurationError(
            f"Expected `writer` to be a torch.utils.tensorboard.SummaryWriter, but got {type(writer).__name__}. "
            "Pass log_dir=... instead, or create the writer with torch.utils.tensorboard.SummaryWriter(log_dir)."
        )


# the names the tests and older code use
_finding_markdown = finding_markdown
_update_markdown = update_markdown
_findings_table = findings_table


def verdict_markdown(report: Report) -> str:
    """The final verdict as markdown: a headline, the findings table and the text report."""
    n_err = count_errors(report.findings)
    n_warn = len(report.findings) - n_err
    lines = [
        f"## gradscope: {verdict(report.findings).upper()}",
        "",
        f"{report.meta.get('model', 'model')}, {report.steps} steps: {n_err} error(s), {n_warn} warning(s).",
        "",
    ]
    if report.findings:
        lines += [*_findings_table(report.findings), ""]
    lines += ["```", str(report), "```"]
    return "\n".join(lines)


@register_sink("tensorboard")
class TensorBoardSink(Sink):
    """Writes statistics, histograms, findings and figures into one TensorBoard run.

    ``watch(model, log_dir=...)`` or ``watch(model, writer=...)`` builds one; build it yourself (and
    pass it in ``watch(sinks=[...])``) for the options ``watch`` does not expose.

    Args:
        log_dir: folder of the run: gradscope writes one event file there itself, the fast way; or
        writer: your own ``torch.utils.tensorboard.SummaryWriter``: gradscope writes into its run and
            flushes it, but never closes it. Closed before ``scope.close()``, it is replaced by an
            event file of gradscope's own on the same folder (a second event file of the same run).
        histogram_every: histograms of gradients on the first recorded step of every this many steps;
            None: no histograms.
        histogram_weights: also histograms of the weights, on the same steps.
        histogram_bins: equal-width buckets per histogram, between the layer's min and max.
        figure_every: the gradient-flow figure at the first flush after every this many steps (and
            always at ``close()``); None: only at ``close()``.
        figure_budget: the most of the run's wall time the regular figures may take (default 0.02:
            2 %): drawing one takes 0.2-0.8 s of matplotlib, so a due figure is
            skipped while the previous one took more than this share of the time since it was drawn
            (the first: :data:`FIRST_FIGURE_SECONDS` against the time since the scope opened), so a
            1 ms toy step gets one every few thousand steps; a 100 ms step one every
            ``figure_every``. None: every due figure. The figure at ``close()`` is always drawn.
        per_param: also one scalar tag per parameter (``gradscope/<stat>/<layer>/<param>``); layer
            aggregates only by default, since each tag costs writing time at every step.
        stats: the statistics written as scalars (gradient and activation statistics); None: every one
            the scope collects. Each value written costs about half a microsecond with ``log_dir``
            (gradscope's own event file), about 5 with your ``writer`` (TensorBoard's writer checksums
            every byte in Python), so a deep model with a short step may want fewer.
        layout: write the custom-scalars layout. TensorBoard shows the last layout written to a run:
            pass False if you write your own into the same writer.

    Raises:
        ConfigurationError: for an invalid option, or a writer that is not a ``SummaryWriter``.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        histogram_every: int | None = 100,
        histogram_weights: bool = False,
        histogram_bins: int = 64,
        figure_every: int | None = 1000,
        figure_budget: float | None = 0.02,
        per_param: bool = False,
        stats: Sequence[str] | None = None,
        layout: bool = True,
    ) -> None:
        if (log_dir is None) == (writer is None):
            raise ConfigurationError("TensorBoardSink needs exactly one of `log_dir` or `writer`.")
        if writer is not None:
            check_writer(writer)
        self.histogram_every = optional_positive_int("histogram_every", histogram_every)
        self.histogram_weights = boolean("histogram_weights", histogram_weights)
        bins = optional_positive_int("histogram_bins", histogram_bins)
        if bins is None or bins < 2:
            raise ConfigurationError(
                f"Expected `histogram_bins` to be an int of at least 2, but got {histogram_bins!r}."
            )
        self.histogram_bins = bins
        self.figure_every = optional_positive_int("figure_every", figure_every)
        if figure_budget is not None and not (
            isinstance(figure_budget, (int, float)) and not isinstance(figure_budget, bool) and 0 < figure_budget <= 1
        ):
            raise ConfigurationError(
                f"Expected `figure_budget` to be a share of the run's time in (0, 1] or None (every figure), "
                f"but got {figure_budget!r}."
            )
        self.figure_budget = None if figure_budget is None else float(figure_budget)
        self.per_param = boolean("per_param", per_param)
        self.stats = stat_selection("TensorBoardSink", stats)
        self.layout = boolean("layout", layout)
        self._own = writer is None
        self._log_dir = log_dir
        self.writer = writer
        self._closed = False
        self._info: ScopeInfo | None = None
        self._walltime: dict[int, float] = {}
        self._hist_window = -1
        # (step, kind, layer indices, [G, width] device tensor) kept on the device until a flush
        self._pending_hist: list[tuple[int, str, list[int], Tensor]] = []
        self._started = False
        self._flagged: list[str] = []
        self._fig_window = 0
        self._fig_step = -1
        self._fig_cost = 0.0  # wall seconds the last regular figure took to draw
        self._fig_done: float | None = None  # clock() when it was drawn
        self._opened: float | None = None  # clock() when the scope opened the sink
        #: Wall-clock seconds (monotonic) for the figure budget; tests may replace it.
        self.clock = time.perf_counter
        self._last_frame: StatsFrame | None = None
        self._layers_by_depth: list[str] = []
        self._layout_key: tuple[Any, ...] | None = None  # what the last layout written was built from
        self._ledger = FindingsLedger()  # findings written, in their last written state
        self._findings_step = 0  # step of the last findings record (their steps must increase)
        self._scalar_events = ScalarEvents()

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def log_dir(self) -> str | None:
        """The run's folder (the writer's, when you passed one)."""
        if self.writer is not None:
            return str(self.writer.get_logdir())
        return None if self._log_dir is None else str(self._log_dir)

    def open(self, info: ScopeInfo) -> None:
        """Check ``stats`` against what the scope collects; create the writer (when given a folder)."""
        check_stat_selection("TensorBoardSink", self.stats, info.stats)
        if self.writer is None:
            assert self._log_dir is not None  # __init__ takes exactly one of log_dir and writer
            self.writer = EventFile(self._log_dir)
        self._info = info
        self._opened = self.clock()

    def _file_writer(self) -> Any:
        """Your writer's own event file writer, or None when gradscope writes its own event file.

        ``SummaryWriter`` has no method that takes a ``Summary`` or an ``Event``; its ``file_writer``
        attribute (a ``torch.utils.tensorboard.writer.FileWriter``, created with the writer, None once it
        is closed) has ``add_summary`` and ``add_event``, which every ``add_*`` method of the writer ends in.
        """
        if isinstance(self.writer, EventFile):
            return None
        if not hasattr(self.writer, "file_writer"):
            raise RuntimeError(
                "torch.utils.tensorboard.SummaryWriter has no `file_writer` in this version of torch; gradscope "
                "writes each step's values as one event through it. Please report this with your torch version."
            )
        file_writer = self.writer.file_writer
        if file_writer is None:
            # Your writer was closed before gradscope's last write (the Hugging Face Trainer closes its own
            # when training ends): go on in an event file of gradscope's own on the same folder, a second
            # event file of the same run, closed at close().
            self.writer = EventFile(self.writer.get_logdir())
            self._own = True
        return file_writer

    def _add(self, summary: Any, step: int, walltime: float | None = None) -> None:
        file_writer = self._file_writer()
        if file_writer is None:
            self.writer.add(summary_event(summary, step, walltime))
        else:
            file_writer.add_summary(summary, step, walltime)

    def _add_events(self, events: list[bytes]) -> None:
        """Serialized events: straight into gradscope's own file, or through your writer's ``add_event``."""
        file_writer = self._file_writer()
        if file_writer is None:
            self.writer.extend(events)
            return
        from tensorboard.compat.proto.event_pb2 import Event

        for data in events:
            event = Event.FromString(data)  # parsed in C: cheap next to the writer's own checksum of it
            file_writer.add_event(event, event.step, event.wall_time)

    # -- hot path ----------------------------------------------------------------------------------
    def wants_grads(self, step: int) -> bool:
        """The gradients are read at the first recorded step of each ``histogram_every`` window only."""
        every = self.histogram_every
        return every is not None and not self._closed and (step - 1) // every != self._hist_window

    def on_step(self, step: int, grads: list[tuple[ParamInfo, Tensor]]) -> None:
        """Note the step's time; on histogram steps, bin each layer's gradients on the device."""
        self._walltime[step] = time.time()
        if self.histogram_every is None or self._closed or not grads:
            return
        window = (step - 1) // self.histogram_every
        if window == self._hist_window:
            return
        self._hist_window = window
        info = self._info
        assert info is not None
        layer_of = info.layout.layer_of_param
        grouped: dict[int, list[int]] = {}
        for p, g in grads:
            # A sharded (DTensor, FSDP2) gradient: only this rank writes, so a histogram would be one
            # shard's, and any DTensor reduction here a collective the other ranks never join. Skipped.
            if not callable(getattr(g, "to_local", None)):
                grouped.setdefault(layer_of[p.index], []).append(p.index)
        if not grouped:
            return
        layers = list(grouped)
        by_index = {p.index: g for p, g in grads}
        rows = histogram_rows([[by_index[i] for i in grouped[li]] for li in layers], self.histogram_bins)
        self._pending_hist.append((step, "grad", layers, rows))
        if self.histogram_weights:
            tensors = info.layout.tensors
            rows = histogram_rows([[tensors[i] for i in grouped[li]] for li in layers], self.histogram_bins)
            self._pending_hist.append((step, "weight", layers, rows))

    # -- flush ---------------------------------------------------------------------------------------
    def write(self, update: SinkUpdate) -> None:
        """Write the new rows' scalars, the histograms taken since the last flush, findings, figures."""
        if self._closed or self.writer is None:
            return
        self._file_writer()  # before add_histogram_raw: a writer of gradscope's own if yours was closed
        frame = update.frame
        self._last_frame = frame
        self._layers_by_depth = list(update.layers_by_depth)
        if not self._started and len(frame):
            self._started = True
            self._write_meta(update)
        self._write_scalars(update)
        self._write_histograms(frame, final=update.final)
        self._write_findings(update.findings, update.updated, int(frame.steps[-1]) if len(frame) else None)
        self._write_figures(frame, final=update.final)
        self.writer.flush()
        if len(frame):
            last = int(frame.steps[-1])
            waiting = {h[0] for h in self._pending_hist}
            for step in [s for s in self._walltime if s <= last and s not in waiting]:
                del self._walltime[step]

    def _write_meta(self, update: SinkUpdate) -> None:
        info = self._info
        assert info is not None
        sch = update.frame.schema
        meta = {
            "schema": RUN_SCHEMA,
            "version": RUN_SCHEMA_VERSION,
            "model": info.model_name,
            "parameters": int(sum(p.numel for p in info.layout.params)),
            "tensors": len(info.layout.params),
            "layers": len(info.layout.layers),
            "layers_by_depth": list(update.layers_by_depth),
            "stats": list(info.stats),
            "every": info.every,
            "activation_modules": list(sch.act_modules),
        }
        from gradscope.sinks.protos import json_summary

        first = int(update.frame.steps[0])
        self._add(json_summary(T.META_JSON_TAG, T.PLUGIN_NAME, json.dumps(meta)), first)
        self._write_layout(update.frame, first)

    def _write_layout(self, frame: StatsFrame, step: int) -> None:
        """The custom-scalars layout; rewritten when new scalars appeared (TensorBoard shows the last one)."""
        if not self.layout:
            return
        sch = frame.schema
        act_stats = [s for s in ACTIVATION_STATISTICS if self.stats is None or s in self.stats]
        # a chart per module only for the statistics it has (a ReLU has no saturated fraction: all NaN)
        acts = {
            s: tuple(m for j, m in enumerate(sch.act_modules) if not np.isnan(frame.act_values(s)[:, j]).all())
            for s in (act_stats if sch.act_modules else ())
        }
        key = (tuple(frame.scalar_names), tuple(acts.items()))
        if key == self._layout_key:
            return
        from gradscope.sinks.layout import build_layout, layout_summary

        self._layout_key = key
        stats = [s for s in sch.stats if self.stats is None or s in self.stats]
        categories = build_layout(
            stats,
            self._layers_by_depth,
            act_stats=list(acts),
            act_modules=acts,
            scalars=frame.scalar_names,
        )
        self._add(layout_summary(categories), step)

    def _write_scalars(self, update: SinkUpdate) -> None:
        # All the values of a step in one event: the same tags and steps for every reader, a fraction
        # of the cost of one add_scalar event per value; encoded in bulk (gradscope.sinks.tensorboard_events).
        rows = update.rows_by_step(stats=self.stats, per_param=self.per_param)
        if rows:
            walltimes = [self._walltime.get(r.step) for r in rows]
            self._add_events(self._scalar_events.encode_rows(rows, walltimes))

    def _write_histograms(self, frame: StatsFrame, *, final: bool) -> None:
        if not self._pending_hist:
            return
        last = int(frame.steps[-1]) if len(frame) else 0
        ready = [h for h in self._pending_hist if final or h[0] <= last]
        self._pending_hist = [h for h in self._pending_hist if not (final or h[0] <= last)]
        if not ready:
            return
        import torch
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        skipped = set(frame.steps[frame.skipped].tolist())
        # sync point: one device-to-host copy per flush of every histogram taken since the last one.
        host = torch.cat([rows for *_, rows in ready]).cpu().numpy()
        offset = 0
        layers = self._info.layout.layers if self._info is not None else []
        for step, kind, layer_idx, _rows in ready:
            block = HistogramRows(host[offset : offset + len(layer_idx)], self.histogram_bins)
            offset += len(layer_idx)
            if step in skipped:
                continue
            wall = self._walltime.get(step)
            for j, li in enumerate(layer_idx):
                if not block.finite[j]:
                    continue
                edges, counts = block.edges[j], block.counts[j]
                # what SummaryWriter.add_histogram_raw writes: one event per histogram
                histo = HistogramProto(
                    min=float(edges[0]),
                    max=float(edges[-1]),
                    num=float(counts.sum()),
                    sum=float(block.sums[j]),
                    sum_squares=float(block.sum_squares[j]),
                    bucket_limit=edges[1:].tolist(),
                    bucket=counts.tolist(),
                )
                self._add(Summary(value=[Summary.Value(tag=T.hist_tag(kind, layers[li]), histo=histo)]), step, wall)

    def _write_findings(
        self, new: Sequence[Finding], updated: Sequence[Finding], visible: int | None, *, final: bool = False
    ) -> None:
        """Findings first reported now, and episodes that changed, at the step they became visible.

        TensorBoard's default loader (its data server) keeps a time series' events only while their
        steps increase: an event at a step at or below the last one read replaces those after it. So
        every text and JSON record goes at a step above the previous one (the last recorded step at
        this flush), and the finding's own first step is stated in the text. The JSON record holds
        every finding known so far in its latest state: the last record is the whole truth, also when
        TensorBoard keeps only a sample of the records. Text says when an episode ends (or starts again);
        with ``final``, any other change (a later ``last_step``) gets a last JSON record too.
        """
        fresh, changed, anything = self._ledger.take(new, updated, final=final)
        for f in fresh:
            if f.layer and f.layer not in self._flagged:
                self._flagged.append(f.layer)
        if not anything:
            return
        from gradscope.sinks.protos import json_summary, text_summary

        step = max(visible or 0, self._findings_step + 1)
        self._findings_step = step
        parts = [_finding_markdown(f, step) for f in sorted(fresh, key=lambda f: f.step)]
        parts += [_update_markdown(f) for f in changed]
        everything = self._ledger.everything()
        if len(everything) > len(fresh):
            # the latest entry lists every finding: TensorBoard keeps only a sample of older text entries
            parts.append("\n".join([f"All findings so far ({len(everything)}):", "", *_findings_table(everything)]))
        if fresh or changed:
            self._add(text_summary(T.FINDINGS_TAG, "\n\n---\n\n".join(parts)), step)
        payload = json.dumps([f.to_dict() for f in everything], allow_nan=False)
        self._add(json_summary(T.FINDINGS_JSON_TAG, T.PLUGIN_NAME, payload), step)

    def _write_figures(self, frame: StatsFrame, *, final: bool) -> None:
        if not len(frame):
            return
        last = int(frame.steps[-1])
        due = final
        if self.figure_every is not None and last // self.figure_every > self._fig_window:
            self._fig_window = last // self.figure_every
            due = self._within_budget()
        if not due:
            return
        if last != self._fig_step:  # the last regular flush may have drawn this very step
            self._fig_step = last
            t0 = self.clock()
            self._add_figure(T.FIGURE_TAG, self._flow_figure(frame), last)
            self._fig_done = self.clock()
            self._fig_cost = self._fig_done - t0
        if final:
            self._add_figure(T.HEATMAP_TAG, self._heatmap_figure(frame), last)

    def _within_budget(self) -> bool:
        """Whether a due regular figure may be drawn: the last one took at most ``figure_budget`` of the time since.

        Before the first, its cost is taken as :data:`FIRST_FIGURE_SECONDS` against the time since the
        sink opened (a 1 ms toy step would otherwise pay matplotlib's import and a first drawing, 0.8 s,
        at its step 1000: nearly as much as the 1000 steps).
        """
        if self.figure_budget is None:
            return True
        if self._fig_done is None:
            since = self.clock() - (self._opened if self._opened is not None else self.clock())
            return FIRST_FIGURE_SECONDS <= self.figure_budget * since
        return self._fig_cost <= self.figure_budget * (self.clock() - self._fig_done)

    def _add_figure(self, tag: str, fig: Any, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        from gradscope.views.plots import render_png

        png, h, w = render_png(fig)
        image = Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=png)
        self._add(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def _depth_layers(self, frame: StatsFrame) -> tuple[list[str], list[int]]:
        layers = frame.schema.layers
        index = {layer: i for i, layer in enumerate(layers)}
        order = [index[layer] for layer in self._layers_by_depth if layer in index]
        order += [i for i in range(len(layers)) if i not in set(order)]
        return [layers[i] for i in order], order

    def _flow_figure(self, frame: StatsFrame) -> Any:
        from gradscope.views.plots import gradient_flow

        sch = frame.schema
        layers, order = self._depth_layers(frame)
        ok = ~frame.skipped
        if "abs_max" in sch.stats:
            ok = ok & frame.sampled
        rows = np.nonzero(ok)[0]
        typical_stat = "rms" if "rms" in sch.stats else sch.stats[0]
        if not len(rows):
            return gradient_flow(layers, np.full(len(layers), np.nan), flagged=self._flagged)
        r = slice(int(rows[-1]), int(rows[-1]) + 1)
        typical = frame.layer_values(typical_stat, r)[0][order]
        peak = frame.layer_values("abs_max", r)[0][order] if "abs_max" in sch.stats else None
        label = "RMS |g|" if typical_stat == "rms" else typical_stat
        return gradient_flow(
            layers, typical, peak, flagged=self._flagged, step=int(frame.steps[r][0]), typical_label=label
        )

    def _heatmap_figure(self, frame: StatsFrame) -> Any:
        from gradscope.views.plots import norm_heatmap

        layers, order = self._depth_layers(frame)
        stat = "l2_norm" if "l2_norm" in frame.schema.stats else frame.schema.stats[0]
        keep = ~frame.skipped
        values = frame.layer_values(stat)[keep][:, order]
        return norm_heatmap(layers, frame.steps[keep], values, stat=stat, flagged=self._flagged)

    def close(self, report: Report) -> None:
        """Write the final verdict and the run's record; close the writer if gradscope created it."""
        if self._closed or self.writer is None:
            return
        self._closed = True
        self._pending_hist.clear()
        from gradscope.report import JSON_SCHEMA, JSON_SCHEMA_VERSION
        from gradscope.sinks.protos import json_summary, text_summary

        # Episodes that ended since the last write (and anything a flush did not pass on): recorded
        # before the verdict, so that the last findings record agrees with the final report.
        confirmed = [f for f in report.findings if not f.provisional]
        known = self._ledger.known
        self._write_findings(
            [f for f in confirmed if (f.kind, f.layer) not in known],
            [f for f in confirmed if (f.kind, f.layer) in known],
            max(report.steps, 1),
            final=True,
        )
        step = max(report.steps, 1, self._findings_step)
        if self._last_frame is not None and self._started:
            self._write_layout(self._last_frame, step)
        self._add(text_summary(T.VERDICT_TAG, verdict_markdown(report)), step)
        record = {
            "schema": JSON_SCHEMA,
            "version": JSON_SCHEMA_VERSION,
            "ok": report.ok,
            "meta": jsonable(report.meta),
            "findings": [f.to_dict() for f in report.findings],
            "skipped_steps": list(report.skipped_steps),
            "frozen": list(report.frozen),
            "errors": list(report.errors),
        }
        self._add(json_summary(T.REPORT_JSON_TAG, T.PLUGIN_NAME, json.dumps(record, allow_nan=False)), step)
        self.writer.flush()
        if self._own:
            self.writer.close()
