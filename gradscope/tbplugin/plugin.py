"""The gradscope tab of TensorBoard: a dynamic plugin, its frontend served from this package.

Installed with the library (entry point ``tensorboard_plugins: gradscope``); ``tensorboard --logdir
runs`` shows a **gradscope** tab for runs written by ``gradscope.watch(..., log_dir=...)``. The
frontend is a plain ES module (``static/index.js``, no build step) that TensorBoard loads in an
iframe; it reads the routes below, all under ``/data/plugin/gradscope/``:

==================  ====================================================================================
``/runs``           the runs holding gradscope data: last step, layers, verdict, number of findings
``/run?run=R``      verdict, findings (live, provisional / resolved marked), layers input side first,
                    steps, statistics and scalars present, the run's facts
``/flow?run=R``     RMS and max |g| per layer at ``step`` (default: the last step with max |g|)
``/heatmap?run=R``  log10 of ``stat`` (default ``l2_norm``) per layer and step, binned to ``columns``
                    (default 400) columns between ``lo`` and ``hi``
``/curves?run=R``   every statistic of ``layer`` over steps
``/scalars?run=R``  the scalars passed to ``scope.step`` and the whole model's statistics over steps
==================  ====================================================================================

Everything comes from TensorBoard's data provider (see :mod:`gradscope.tbplugin.data`).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from gradscope.findings import Finding, verdict
from gradscope.sinks import tags as T
from gradscope.tbplugin import data as D

__all__ = ["GradscopePlugin"]

_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_TYPES = {"index.js": "text/javascript", "style.css": "text/css"}
#: Statistics drawn as a layer's curves, when the run has them.
_CURVE_STATS = ("l2_norm", "rms", "abs_max", "update_ratio", "zero_fraction", "nonfinite_count")


def _int_arg(request: Any, name: str, default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise errors.InvalidArgumentError(
            f"gradscope: query parameter {name!r} must be an integer, got {raw!r}"
        ) from None


def _run_arg(request: Any) -> str:
    run = request.args.get("run")
    if run is None:
        raise errors.InvalidArgumentError("gradscope: missing query parameter 'run' (a run name from /runs)")
    return str(run)


def _wsgi(handler: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    """A WSGI app around ``handler(request) -> response`` (werkzeug's decorator, typed for methods)."""

    def app(environ: Any, start_response: Any) -> Any:
        return handler(wrappers.Request(environ))(environ, start_response)

    return app


class GradscopePlugin(base_plugin.TBPlugin):
    """TensorBoard plugin serving the gradscope tab.

    Args:
        context: TensorBoard's ``TBContext`` (its ``data_provider`` is the only data source; its
            ``logdir`` is used only to read the records of runs written before they carried a data
            class, from local files).
    """

    plugin_name = T.PLUGIN_NAME

    def __init__(self, context: Any) -> None:
        self._provider = context.data_provider
        self._logdir = str(getattr(context, "logdir", "") or "")
        self._cache: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._local = D.LocalRecords()

    # -- TBPlugin -----------------------------------------------------------------------------------
    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        """The routes, relative to ``/data/plugin/gradscope``."""
        routes = {
            "/index.js": self._serve_static,
            "/style.css": self._serve_static,
            "/runs": self._serve_runs,
            "/run": self._serve_run,
            "/flow": self._serve_flow,
            "/heatmap": self._serve_heatmap,
            "/curves": self._serve_curves,
            "/scalars": self._serve_scalars,
        }
        return {path: _wsgi(handler) for path, handler in routes.items()}

    def data_plugin_names(self) -> tuple[str, ...]:
        """Active for runs with gradscope's JSON records (plugin name ``gradscope``)."""
        return (T.PLUGIN_NAME,)

    def is_active(self) -> bool:
        """Also active for runs whose records TensorBoard does not list: any ``gradscope/...`` scalar."""
        if self._provider is None:
            return False
        from tensorboard.context import RequestContext

        listing = self._provider.list_scalars(RequestContext(), experiment_id="", plugin_name="scalars")
        return any(tag.startswith(T.PREFIX + "/") for tags in listing.values() for tag in tags)

    def frontend_metadata(self) -> Any:
        """A dynamic plugin: TensorBoard imports ``index.js`` into the tab's iframe and calls ``render()``."""
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="gradscope")

    # -- helpers ------------------------------------------------------------------------------------
    def _source(self, request: Any) -> D.Source:
        return D.Source(
            self._provider,
            plugin_util.context(request.environ),
            plugin_util.experiment_id(request.environ),
            cache=self._cache,
            lock=self._lock,
            local=self._local,
            logdir=self._logdir,
        )

    @staticmethod
    def _json(request: Any, body: Any) -> Any:
        return http_util.Respond(request, json.dumps(body, allow_nan=False), "application/json")

    # -- routes -------------------------------------------------------------------------------------
    def _serve_static(self, request: Any) -> Any:
        name = os.path.basename(request.path)
        if name not in _STATIC_TYPES:
            raise errors.NotFoundError(f"gradscope: no static file {name!r}")
        with open(os.path.join(_STATIC, name), "rb") as fh:
            body = fh.read()
        return http_util.Respond(request, body, _STATIC_TYPES[name])

    def _serve_runs(self, request: Any) -> Any:
        source = self._source(request)
        listing = source.scalar_listing()
        records = source.records(list(listing))
        runs = []
        for run in sorted(listing):
            index = D.index_tags(listing[run])
            recs = records.get(run, {})
            findings, closed = D.merge_findings(D.findings_log(recs), recs.get(T.REPORT_JSON_TAG, []))
            counted = [f for f in findings if f["status"] != "provisional"]
            runs.append(
                {
                    "run": run,
                    "max_step": index.max_step,
                    "layers": len(index.grad_layers()),
                    "findings": len(findings),
                    "errors": sum(f["severity"] == "error" for f in counted),
                    "verdict": verdict(Finding.from_dict(f) for f in counted),
                    "closed": closed,
                }
            )
        return self._json(request, {"runs": runs})

    def _known_run(self, source: D.Source, run: str) -> D.RunIndex:
        index = source.index(run)
        if not index.stats and not index.scalars:
            raise errors.NotFoundError(f"gradscope: no gradscope data in run {run!r}")
        return index

    def _serve_run(self, request: Any) -> Any:
        source = self._source(request)
        run = _run_arg(request)
        self._known_run(source, run)
        return self._json(request, D.run_summary(source, run))

    def _serve_flow(self, request: Any) -> Any:
        source = self._source(request)
        run = _run_arg(request)
        index = self._known_run(source, run)
        summary_layers = self._layers(source, run, index)
        typical_stat = "rms" if "rms" in index.stats else "l2_norm"
        typical = source.layer_series(run, typical_stat, index)
        peak = source.layer_series(run, "abs_max", index) if "abs_max" in index.stats else {}
        out = D.flow_at(summary_layers, typical, peak, _int_arg(request, "step"))
        out["typical_stat"] = typical_stat
        out["run"] = run
        return self._json(request, out)

    def _layers(self, source: D.Source, run: str, index: D.RunIndex) -> list[str]:
        recs = source.records([run]).get(run, {})
        by_depth = None
        for tag in (T.META_JSON_TAG, T.REPORT_JSON_TAG):
            for _, rec in recs.get(tag, []):
                if isinstance(rec, dict):
                    found = rec.get("layers_by_depth") or (rec.get("meta") or {}).get("layers_by_depth")
                    by_depth = found or by_depth
        return D.depth_order(index.grad_layers(), by_depth)

    def _serve_heatmap(self, request: Any) -> Any:
        source = self._source(request)
        run = _run_arg(request)
        index = self._known_run(source, run)
        stat = request.args.get("stat", "l2_norm")
        if stat not in index.stats:
            raise errors.NotFoundError(f"gradscope: run {run!r} has no statistic {stat!r}")
        layers = self._layers(source, run, index)
        series = source.layer_series(run, stat, index)
        out = D.heatmap(
            layers,
            series,
            columns=_int_arg(request, "columns", 400) or 400,
            lo=_int_arg(request, "lo"),
            hi=_int_arg(request, "hi"),
        )
        out.update(run=run, stat=stat)
        return self._json(request, out)

    def _serve_curves(self, request: Any) -> Any:
        source = self._source(request)
        run = _run_arg(request)
        index = self._known_run(source, run)
        layer = request.args.get("layer")
        if layer is None:
            raise errors.InvalidArgumentError("gradscope: missing query parameter 'layer'")
        tags = {stat: layers[layer] for stat, layers in index.stats.items() if layer in layers}
        if not tags:
            raise errors.NotFoundError(f"gradscope: run {run!r} has no layer {layer!r}")
        order = [s for s in _CURVE_STATS if s in tags] + sorted(s for s in tags if s not in _CURVE_STATS)
        data = source.read_series(run, [tags[s] for s in order])
        series = {s: D.series_json(data[tags[s]]) for s in order if tags[s] in data}
        return self._json(request, {"run": run, "layer": layer, "series": series})

    def _serve_scalars(self, request: Any) -> Any:
        source = self._source(request)
        run = _run_arg(request)
        index = self._known_run(source, run)
        model = {stat: layers["*"] for stat, layers in index.stats.items() if "*" in layers}
        tags = list(index.scalars.values()) + list(model.values())
        data = source.read_series(run, tags)
        return self._json(
            request,
            {
                "run": run,
                "scalars": {n: D.series_json(data[t]) for n, t in index.scalars.items() if t in data},
                "model": {s: D.series_json(data[t]) for s, t in model.items() if t in data},
            },
        )
