"""What the gradscope tab shows, built from TensorBoard's data provider: plain JSON-able structures.

Everything is read through ``context.data_provider`` (``list_scalars`` / ``read_scalars`` for the
statistics, ``list_tensors`` / ``read_tensors`` for gradscope's JSON records), so the tab works with
TensorBoard's default fast loader, remote log dirs and many runs. The provider already keeps a
bounded sample of each series (TensorBoard's reservoir: 1,000 scalars per tag by default), and every
read here asks for at most :data:`SERIES_POINTS` points per tag; the heat map is binned to at most
``columns`` columns on the server, so a 200-layer x 100k-step run is under a megabyte of JSON. With
the default fast loader, series are read from TensorBoard's data server as columns
(:meth:`Source._read_columns`), not as one Python object per point.

The records (tags in :mod:`gradscope.sinks.tags`):

* ``gradscope/_meta``: the run's facts, among them ``layers_by_depth`` (input side first);
* ``gradscope/_findings``: an append-only log; each record holds a list of findings (or an object
  with a ``findings`` list). The latest record of a finding (same ``id``, or same kind, layer and
  first step) wins, so status updates (provisional, resolved) written as new records replace the
  earlier ones;
* ``gradscope/_findings_state`` (when written): every finding so far with its current status, read
  as more entries of the log (TensorBoard keeps a sample of a tag's records, 100 by default, the
  latest always among them: a long log can lose records, a snapshot cannot);
* ``gradscope/_report``: the final record at ``close()``, whose findings are the run's final list.

Runs written before the records carried a data class (TensorBoard's loaders drop summaries without
one) are read from their local event files instead, incrementally (:class:`LocalRecords`).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradscope.findings import Finding, verdict
from gradscope.sinks import tags as T

__all__ = [
    "FINDINGS_STATE_TAG",
    "MAX_COLUMNS",
    "SERIES_POINTS",
    "LocalRecords",
    "RunIndex",
    "Series",
    "Source",
    "depth_order",
    "finding_status",
    "findings_log",
    "flow_at",
    "heatmap",
    "index_tags",
    "merge_findings",
    "run_summary",
    "series_json",
]

#: Points per series asked of the data provider (its own sample is 1,000 per tag by default).
SERIES_POINTS = 2000
#: Upper bound on heat-map columns a client may ask for.
MAX_COLUMNS = 2000
_SCALARS_PLUGIN = "scalars"
#: A snapshot of every finding so far with its current status, when the sink writes one: TensorBoard keeps
#: a sample of a tag's records (100 by default), always the latest, so a snapshot survives where a long
#: log of ``_findings`` records may lose some. Read as more entries of the log.
FINDINGS_STATE_TAG = f"{T.PREFIX}/_findings_state"
_RECORD_TAGS = (T.META_JSON_TAG, T.FINDINGS_JSON_TAG, FINDINGS_STATE_TAG, T.REPORT_JSON_TAG)


def findings_log(records: Mapping[str, Sequence[tuple[int, Any]]]) -> list[tuple[int, Any]]:
    """The ``_findings`` records and the snapshots of a run, in step order (the log :func:`merge_findings` reads)."""
    log = list(records.get(T.FINDINGS_JSON_TAG, [])) + list(records.get(FINDINGS_STATE_TAG, []))
    return sorted(log, key=lambda r: r[0])


@dataclass(frozen=True)
class Series:
    """One scalar series: ``steps [N]`` (int64, increasing) and ``values [N]`` (float64)."""

    steps: np.ndarray
    values: np.ndarray

    def at_or_before(self, step: int) -> tuple[int, float] | None:
        """The last ``(step, value)`` at or before ``step``; None if the series starts later."""
        i = int(np.searchsorted(self.steps, step, side="right")) - 1
        if i < 0:
            return None
        return int(self.steps[i]), float(self.values[i])


@dataclass(frozen=True)
class RunIndex:
    """The gradscope tags of one run, taken apart.

    Attributes:
        stats: ``{stat: {layer: tag}}`` for layer aggregates (``"*"`` is the whole model).
        scalars: ``{name: tag}`` for the scalars passed to ``scope.step``.
        max_step: the largest step of any gradscope scalar.
    """

    stats: dict[str, dict[str, str]]
    scalars: dict[str, str]
    max_step: int

    def grad_layers(self) -> set[str]:
        """Layers with gradient statistics (activation modules have only ``act_*`` ones)."""
        out: set[str] = set()
        for stat, layers in self.stats.items():
            if not stat.startswith("act_"):
                out.update(layer for layer in layers if layer != "*")
        return out


def index_tags(tags: Mapping[str, Any]) -> RunIndex:
    """Take a run's scalar tags apart (``tags``: the ``{tag: ScalarTimeSeries}`` of ``list_scalars``)."""
    stats: dict[str, dict[str, str]] = {}
    scalars: dict[str, str] = {}
    max_step = 0
    for tag, meta in tags.items():
        parsed = T.parse_tag(tag)
        if parsed is None:
            continue
        max_step = max(max_step, int(getattr(meta, "max_step", 0)))
        if parsed.kind == "scalar":
            scalars[parsed.name] = tag
        elif parsed.param == "*":
            stats.setdefault(parsed.stat, {})[parsed.layer] = tag
    return RunIndex(stats=stats, scalars=scalars, max_step=max_step)


_NUM = re.compile(r"(\d+)")


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in _NUM.split(name)]


def depth_order(layers: Iterable[str], layers_by_depth: Sequence[str] | None) -> list[str]:
    """``layers`` input side first: the run's recorded depth order, then the rest in natural order."""
    present = set(layers)
    order = [layer for layer in (layers_by_depth or []) if layer in present]
    placed = set(order)
    return order + sorted((layer for layer in present if layer not in placed), key=_natural)


def _identity(d: Mapping[str, Any]) -> tuple[Any, ...]:
    if d.get("id") is not None:
        return ("id", d["id"])
    return (d.get("kind"), d.get("layer"), d.get("step"))


def _finding_list(payload: Any) -> list[dict[str, Any]]:
    if isinstance(payload, dict):
        payload = payload.get("findings", [])
    return [d for d in payload if isinstance(d, dict)] if isinstance(payload, list) else []


def _first_step(d: Mapping[str, Any]) -> int:
    step = d.get("step")
    return step if isinstance(step, int) else 0


def finding_status(d: Mapping[str, Any]) -> str:
    """``"resolved"``, ``"provisional"`` or ``"active"``."""
    if d.get("resolved_step") is not None:
        return "resolved"
    if d.get("provisional"):
        return "provisional"
    return "active"


def merge_findings(
    log: Sequence[tuple[int, Any]], final: Sequence[tuple[int, Any]] = ()
) -> tuple[list[dict[str, Any]], bool]:
    """The run's findings from its records: ``(findings, closed)``.

    Args:
        log: the ``gradscope/_findings`` records as ``(step, payload)``, in the order written.
        final: the ``gradscope/_report`` records as ``(step, payload)``; the last one, when there is
            one, holds the final list.

    Returns:
        One dict per finding (``Finding.to_dict`` keys, plus ``status`` and ``seen_step``: the step
        of the record that first showed it), by first step then in the order seen (the final
        record's order when there is one); ``closed`` is True when the final record is there.
    """
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}  # insertion order: first appearance
    first_seen: dict[tuple[Any, ...], int] = {}
    for step, payload in sorted(log, key=lambda r: r[0]):  # stable: same-step records keep their order
        for d in _finding_list(payload):
            key = _identity(d)
            first_seen.setdefault(key, int(step))
            seen[key] = d  # the latest record of a finding wins
    # by first step (a record lost to TensorBoard's sampling must not move a finding to the end), then as seen
    findings = sorted(seen.values(), key=_first_step)
    closed = bool(final)
    if final:
        last = final[-1][1]
        findings = _finding_list(last.get("findings", []) if isinstance(last, dict) else [])
    out = []
    for d in findings:
        try:
            f = Finding.from_dict(d).to_dict()
        except (ValueError, TypeError, KeyError):
            continue  # a record of a newer schema this version cannot read: shown by the text dashboard
        f.update({k: v for k, v in d.items() if k not in f})
        f["status"] = finding_status(f)
        f["seen_step"] = first_seen.get(_identity(d), f["step"])
        out.append(f)
    return out, closed


def _jsonable_float(v: float, digits: int | None = None) -> float | None:
    if not math.isfinite(v):
        return None
    return round(v, digits) if digits is not None else v


def flow_at(
    layers: Sequence[str],
    typical: Mapping[str, Series],
    peak: Mapping[str, Series],
    step: int | None,
) -> dict[str, Any]:
    """The gradient flow at ``step``: per layer (in the order given), the typical and largest |g|.

    Each layer's value is its last one at or before ``step`` (TensorBoard may keep a sample of the
    steps of a long run). ``step=None``: the last step with a largest-magnitude value (it is taken on
    sampled steps only), else the last step of the typical magnitude.

    Returns:
        ``{"step", "layers", "typical", "peak", "typical_steps", "peak_steps"}``; values are None where
        a layer has no finite value.
    """
    if step is None:
        last_peak = max((int(s.steps[-1]) for s in peak.values() if len(s.steps)), default=None)
        last_typ = max((int(s.steps[-1]) for s in typical.values() if len(s.steps)), default=None)
        step = last_peak if last_peak is not None else last_typ
    out: dict[str, Any] = {"step": step, "layers": list(layers)}
    for name, source in (("typical", typical), ("peak", peak)):
        values: list[float | None] = []
        steps: list[int | None] = []
        for layer in layers:
            s = source.get(layer)
            hit = s.at_or_before(step) if s is not None and step is not None else None
            values.append(None if hit is None else _jsonable_float(hit[1]))
            steps.append(None if hit is None else hit[0])
        out[name] = values
        out[f"{name}_steps"] = steps
    return out


def heatmap(
    layers: Sequence[str],
    series: Mapping[str, Series],
    *,
    columns: int = 400,
    lo: int | None = None,
    hi: int | None = None,
) -> dict[str, Any]:
    """log10 of a statistic per layer and step, binned to at most ``columns`` columns.

    The steps are those of any layer in ``[lo, hi]``; when there are more than ``columns`` of them,
    consecutive steps are grouped into columns of (nearly) equal count and each cell is the mean of
    the log10 values in it. Zero, negative and non-finite values are left out (None when a cell has
    nothing else).

    Returns:
        ``{"layers", "steps" [C] (last step of each column), "step_lo" [C], "step_hi" [C],
        "values" [L][C] (log10, 6 decimals, or None), "vmin", "vmax", "binned"}``.
    """
    all_steps = np.unique(np.concatenate([s.steps for s in series.values()] or [np.zeros(0, np.int64)]))
    if lo is not None:
        all_steps = all_steps[all_steps >= lo]
    if hi is not None:
        all_steps = all_steps[all_steps <= hi]
    n = len(all_steps)
    columns = max(1, min(int(columns), MAX_COLUMNS))
    ncol = min(n, columns)
    # column of each step: equal-count groups of consecutive steps
    col_of = (np.arange(n) * ncol // max(n, 1)).astype(np.int64) if n else np.zeros(0, np.int64)
    values = np.full((len(layers), ncol), np.nan)
    for i, layer in enumerate(layers):
        s = series.get(layer)
        if s is None or not len(s.steps):
            continue
        pos = np.searchsorted(all_steps, s.steps)
        inside = (pos < n) & (all_steps[np.minimum(pos, max(n - 1, 0))] == s.steps) if n else pos < 0
        v = s.values[inside]
        c = col_of[pos[inside]]
        with np.errstate(divide="ignore", invalid="ignore"):
            logv = np.where(np.isfinite(v) & (v > 0), np.log10(np.where(v > 0, v, 1.0)), np.nan)
        ok = np.isfinite(logv)
        sums = np.bincount(c[ok], weights=logv[ok], minlength=ncol)
        counts = np.bincount(c[ok], minlength=ncol)
        with np.errstate(invalid="ignore", divide="ignore"):
            values[i] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    starts = np.searchsorted(col_of, np.arange(ncol), side="left") if n else np.zeros(0, np.int64)
    ends = np.searchsorted(col_of, np.arange(ncol), side="right") - 1 if n else np.zeros(0, np.int64)
    finite = values[np.isfinite(values)]
    return {
        "layers": list(layers),
        "steps": [int(all_steps[e]) for e in ends],
        "step_lo": [int(all_steps[s]) for s in starts],
        "step_hi": [int(all_steps[e]) for e in ends],
        # NaN is not JSON: None; rounding in NumPy, one list per layer
        "values": [[None if v != v else v for v in row] for row in np.round(values, 6).tolist()],
        "vmin": float(finite.min()) if finite.size else None,
        "vmax": float(finite.max()) if finite.size else None,
        "binned": bool(n > ncol),
    }


def series_json(s: Series, digits: int | None = None) -> dict[str, list[Any]]:
    """``{"steps": [...], "values": [...]}`` with None for non-finite values."""
    return {
        "steps": [int(x) for x in s.steps],
        "values": [_jsonable_float(float(v), digits) for v in s.values],
    }


class LocalRecords:
    """gradscope's JSON records read from a local run's event files, incrementally.

    For runs written before the records carried a data class (TensorBoard's loaders drop them then).
    Each event file keeps its reader open between calls, so a call reads only what was appended.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # run dir -> {file name -> (loader, {tag: [(step, payload)]})}
        self._files: dict[str, dict[str, tuple[Any, dict[str, list[tuple[int, Any]]]]]] = {}

    def read(self, run_dir: str) -> dict[str, list[tuple[int, Any]]]:
        """``{tag: [(step, payload), ...]}`` of the records in ``run_dir``'s event files, oldest file first."""
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event

        if not os.path.isdir(run_dir):
            return {}
        names = sorted(n for n in os.listdir(run_dir) if "tfevents" in n)
        out: dict[str, list[tuple[int, Any]]] = {}
        with self._lock:
            files = self._files.setdefault(run_dir, {})
            for name in names:
                if name not in files:
                    files[name] = (RawEventFileLoader(os.path.join(run_dir, name)), {})
                loader, found = files[name]
                for raw in loader.Load():
                    if b"gradscope/_" not in raw:  # skip the parse of every other event
                        continue
                    event = Event.FromString(raw)
                    for value in event.summary.value:
                        if value.tag in _RECORD_TAGS and value.tensor.string_val:
                            try:
                                payload = json.loads(value.tensor.string_val[0].decode("utf-8"))
                            except ValueError:
                                continue
                            found.setdefault(value.tag, []).append((int(event.step), payload))
                for tag, items in found.items():
                    out.setdefault(tag, []).extend(items)
        return out


class Source:
    """Reads one experiment through a TensorBoard data provider, with a cache per series.

    Args:
        provider: ``context.data_provider``.
        ctx: the request's ``RequestContext``.
        experiment_id: from ``plugin_util.experiment_id(environ)``.
        cache: a dict shared between requests (the plugin's): series are re-read only when their
            ``max_step`` or ``max_wall_time`` changed.
        lock: guards ``cache``.
        local: reader of records from local event files (old runs), or None.
        logdir: the server's log dir, for ``local``.
    """

    def __init__(
        self,
        provider: Any,
        ctx: Any,
        experiment_id: str,
        *,
        cache: dict[Any, Any],
        lock: threading.Lock,
        local: LocalRecords | None = None,
        logdir: str = "",
    ) -> None:
        self.provider = provider
        self.ctx = ctx
        self.eid = experiment_id
        self._cache = cache
        self._lock = lock
        self._local = local
        self._logdir = logdir
        self._listings: dict[tuple[str, ...] | None, dict[str, dict[str, Any]]] = {}

    # -- scalars ------------------------------------------------------------------------------------
    def scalar_listing(self, runs: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """``{run: {tag: ScalarTimeSeries}}`` of the gradscope scalars (all runs when ``runs`` is None)."""
        from tensorboard.data import provider as P

        key = None if runs is None else tuple(runs)
        if key in self._listings:  # once per request: every route reads it several times
            return self._listings[key]
        listing = self.provider.list_scalars(
            self.ctx,
            experiment_id=self.eid,
            plugin_name=_SCALARS_PLUGIN,
            run_tag_filter=None if runs is None else P.RunTagFilter(runs=list(runs)),
        )
        out = {
            run: {tag: m for tag, m in tags.items() if tag.startswith(T.PREFIX + "/")} for run, tags in listing.items()
        }
        out = {run: tags for run, tags in out.items() if tags}
        self._listings[key] = out
        return out

    def index(self, run: str) -> RunIndex:
        """The gradscope tags of ``run`` (empty when it has none)."""
        return index_tags(self.scalar_listing([run]).get(run, {}))

    def read_series(self, run: str, tags: Sequence[str]) -> dict[str, Series]:
        """``{tag: Series}`` for ``tags`` of ``run``, at most :data:`SERIES_POINTS` points each."""
        from tensorboard.data import provider as P

        listing = self.scalar_listing([run]).get(run, {})
        out: dict[str, Series] = {}
        missing: list[str] = []
        with self._lock:
            for tag in tags:
                meta = listing.get(tag)
                if meta is None:
                    continue
                key = (self.eid, run, tag)
                hit = self._cache.get(key)
                if hit is not None and hit[0] == (meta.max_step, meta.max_wall_time):
                    out[tag] = hit[1]
                else:
                    missing.append(tag)
        if missing:
            columns = self._read_columns(run, missing)
            if columns is None:
                data = self.provider.read_scalars(
                    self.ctx,
                    experiment_id=self.eid,
                    plugin_name=_SCALARS_PLUGIN,
                    downsample=SERIES_POINTS,
                    run_tag_filter=P.RunTagFilter(runs=[run], tags=missing),
                ).get(run, {})
                columns = {
                    tag: (
                        np.fromiter((p.step for p in points), dtype=np.int64, count=len(points)),
                        np.fromiter((p.value for p in points), dtype=np.float64, count=len(points)),
                    )
                    for tag, points in data.items()
                }
            empty = (np.zeros(0, np.int64), np.zeros(0, np.float64))
            with self._lock:
                for tag in missing:
                    steps, values = columns.get(tag, empty)
                    order = np.argsort(steps, kind="stable")
                    s = Series(steps[order], values[order])
                    meta = listing[tag]
                    self._cache[(self.eid, run, tag)] = ((meta.max_step, meta.max_wall_time), s)
                    out[tag] = s
        return out

    def _read_columns(self, run: str, tags: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """``read_scalars`` of TensorBoard's data server, kept columnar; None where that is not the provider.

        TensorBoard's gRPC provider turns every point into a Python object (about 1 s per 200 tags of
        1,000 points); the same request read as columns takes a few milliseconds. Any other provider
        (the multiplexer of ``--load_fast=false``, a future API) goes through ``read_scalars``.
        """
        stub = getattr(self.provider, "_stub", None)
        if stub is None or not hasattr(stub, "ReadScalars"):
            return None
        try:
            from tensorboard.data.proto import data_provider_pb2

            req = data_provider_pb2.ReadScalarsRequest()
            req.experiment_id = self.eid
            req.plugin_filter.plugin_name = _SCALARS_PLUGIN
            req.run_tag_filter.runs.names[:] = [run]
            req.run_tag_filter.tags.names[:] = sorted(tags)
            req.downsample.num_points = SERIES_POINTS
            res = stub.ReadScalars(req)
        except Exception:  # any change of TensorBoard's internals: take the public API
            return None
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for run_entry in res.runs:
            if run_entry.run_name != run:
                continue
            for tag_entry in run_entry.tags:
                d = tag_entry.data
                out[tag_entry.tag_name] = (np.array(d.step, dtype=np.int64), np.array(d.value, dtype=np.float64))
        return out

    def layer_series(self, run: str, stat: str, index: RunIndex | None = None) -> dict[str, Series]:
        """``{layer: Series}`` of one statistic of ``run`` (layer ``"*"`` is the whole model)."""
        index = index or self.index(run)
        tags = index.stats.get(stat, {})
        data = self.read_series(run, list(tags.values()))
        return {layer: data[tag] for layer, tag in tags.items() if tag in data}

    # -- records ------------------------------------------------------------------------------------
    def records(self, runs: Sequence[str] | None = None) -> dict[str, dict[str, list[tuple[int, Any]]]]:
        """``{run: {tag: [(step, payload)]}}`` of gradscope's JSON records, in step order."""
        from tensorboard.data import provider as P

        listing = self.provider.list_tensors(
            self.ctx,
            experiment_id=self.eid,
            plugin_name=T.PLUGIN_NAME,
            run_tag_filter=P.RunTagFilter(runs=None if runs is None else list(runs), tags=list(_RECORD_TAGS)),
        )
        out: dict[str, dict[str, list[tuple[int, Any]]]] = {}
        if listing:
            data = self.provider.read_tensors(
                self.ctx,
                experiment_id=self.eid,
                plugin_name=T.PLUGIN_NAME,
                downsample=100_000,
                run_tag_filter=P.RunTagFilter(runs=list(listing), tags=list(_RECORD_TAGS)),
            )
            for run, tags in data.items():
                for tag, points in tags.items():
                    items = []
                    for p in sorted(points, key=lambda p: (p.step, p.wall_time)):
                        try:
                            raw = p.numpy.reshape(-1)[0]
                            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                            items.append((int(p.step), json.loads(text)))
                        except (ValueError, IndexError, UnicodeDecodeError):
                            continue
                    out.setdefault(run, {})[tag] = items
        if self._local is not None and self._logdir:
            wanted = list(runs) if runs is not None else list(self.scalar_listing())
            for run in wanted:
                if run in out:
                    continue
                path = self._logdir if run == "." else os.path.join(self._logdir, run)
                found = self._local.read(path)
                if found:
                    out[run] = found
        return out


def run_summary(source: Source, run: str) -> dict[str, Any]:
    """The header of a run: verdict, findings, layers (input side first), steps, statistics present."""
    index = source.index(run)
    recs = source.records([run]).get(run, {})
    meta: dict[str, Any] = {}
    for _, m in recs.get(T.META_JSON_TAG, []):
        if isinstance(m, dict):
            meta = {k: v for k, v in m.items() if k not in ("schema", "version")}
    final = recs.get(T.REPORT_JSON_TAG, [])
    if final and isinstance(final[-1][1], dict):
        meta.update(final[-1][1].get("meta", {}) or {})
    findings, closed = merge_findings(findings_log(recs), final)
    counted = [f for f in findings if f["status"] != "provisional"]
    layers = depth_order(index.grad_layers(), meta.get("layers_by_depth"))
    flagged = list(dict.fromkeys(f["layer"] for f in findings if f.get("layer")))
    typical = "rms" if "rms" in index.stats else "l2_norm"
    # the steps of the flow's slider: those of the whole model's series (one tag, not one per layer)
    tags = index.stats.get(typical, {})
    wanted = [tags["*"]] if "*" in tags else list(tags.values())
    steps = source.read_series(run, wanted)
    step_list = np.unique(np.concatenate([s.steps for s in steps.values()] or [np.zeros(0, np.int64)]))
    errors: list[str] = []
    if final and isinstance(final[-1][1], dict):
        errors = [str(e) for e in final[-1][1].get("errors", [])]
    return {
        "run": run,
        "closed": closed,
        "verdict": verdict(Finding.from_dict(f) for f in counted),
        "findings": findings,
        "meta": meta,
        "errors": errors,
        "layers": layers,
        "flagged": flagged,
        "stats": sorted(index.stats),
        "scalars": sorted(index.scalars),
        "max_step": index.max_step,
        "steps": [int(s) for s in step_list],
        "typical_stat": typical,
        "has_records": bool(recs),
    }
