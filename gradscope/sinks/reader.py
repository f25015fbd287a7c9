"""Read a finished run back into a :class:`gradscope.Report`: from TensorBoard event files or JSON.

Event files are read with TensorBoard's own record reader
(``tensorboard.backend.event_processing.event_file_loader``) and run discovery
(``io_wrapper.GetLogdirSubdirectories``), so whatever TensorBoard can read, this can; those modules
are the ones ``EventAccumulator`` is built on, not a public API, so when they are missing gradscope
reads the TFRecord framing itself (:func:`tfrecords`). What comes back:

* ``report.stats`` from the ``gradscope/<stat>/<layer>[/<param>]`` scalars (float32, as stored);
* ``report.scalars`` from ``gradscope/scalar/<name>``;
* findings, run facts, skipped steps, frozen parameters from gradscope's JSON records (written by
  the TensorBoard sink: the final ``gradscope/_report`` at ``close()``, and ``gradscope/_findings``
  at each flush). A run that never closed (a killed process) still gives every finding flushed
  before it stopped, and says so in ``report.errors``.

Damaged input never raises a raw error: an event that does not decode, a JSON record that is not
JSON or not the shape gradscope writes, a scalar tensor that is not one number, or the unreadable
tail of a file (bad checksum) is skipped and named in ``report.errors`` ("damaged <tag> record at
step N skipped: ..."). Only a damaged *final* ``gradscope/_report`` record is a :class:`RunReadError`:
it holds the run's verdict, which no other record can stand in for.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from gradscope.sinks import tags as T

if TYPE_CHECKING:
    from gradscope.findings import Finding
    from gradscope.report import Report
    from gradscope.sinks.progress import Progress

__all__ = ["RunReadError", "event_files", "find_runs", "read_report", "read_run", "tfrecords"]

_EVENTS = "events.out.tfevents"


class RunReadError(ValueError):
    """The input is not a readable gradscope run (nothing there, several runs, no gradscope data...)."""


def event_files(run_dir: Union[str, os.PathLike[str]]) -> list[Path]:
    """The event files directly inside ``run_dir``, oldest first (their names start with a timestamp)."""
    d = Path(run_dir)
    return sorted((p for p in d.iterdir() if p.is_file() and _EVENTS in p.name), key=lambda p: p.name)


def find_runs(logdir: Union[str, os.PathLike[str]]) -> list[Path]:
    """Every run (a folder holding event files) at or below ``logdir``, as TensorBoard finds them."""
    try:
        from tensorboard.backend.event_processing import io_wrapper
    except ImportError:  # a TensorBoard that moved its loader: walk the folders ourselves
        return sorted({Path(d) for d, _, files in os.walk(logdir) if any(_EVENTS in f for f in files)})
    return sorted(Path(p) for p in io_wrapper.GetLogdirSubdirectories(str(logdir)))


def tfrecords(path: Union[str, os.PathLike[str]], *, verify: bool = False) -> Iterator[bytes]:
    """The records of an event file, read by gradscope itself (TFRecord framing).

    Each record is ``uint64 length, uint32 masked CRC of the length, data, uint32 masked CRC of the
    data``, little-endian. A truncated last record (a file still being written) ends the iteration.
    With ``verify``, so does a record whose checksums do not match, as TensorBoard's loader stops at
    it (checksums from the C CRC-32C when it is installed, else NumPy's).
    """
    import struct

    from gradscope.sinks.tensorboard_events import masked_crc32c

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while True:
            header = fh.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            if length > size - fh.tell():  # a damaged length: reading it would ask for up to 2**64 bytes
                return
            data = fh.read(length)
            footer = fh.read(4)
            if len(data) < length or len(footer) < 4:
                return
            if verify:
                crcs = masked_crc32c([header[:8], data])
                if struct.unpack("<I", header[8:])[0] != crcs[0] or struct.unpack("<I", footer)[0] != crcs[1]:
                    return
            yield data


def _records(path: Path) -> Iterator[bytes]:
    # With the C CRC-32C, gradscope's reader verifies every checksum at C speed and stops where
    # TensorBoard's loader would (a bad checksum, a partial record). Without it, TensorBoard's own loader
    # (its pure-Python CRC: about a second per 4 MB); it is the module EventAccumulator is built on,
    # not a public API, so the reader is the fallback if it moved.
    from gradscope.sinks.tensorboard_events import _c_implementation

    if _c_implementation() is not None:
        yield from tfrecords(path, verify=True)
        return
    try:
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    except ImportError:
        yield from tfrecords(path, verify=True)
        return
    yield from RawEventFileLoader(str(path)).Load()


_UNPARSED = object()


def _plugin(value: Any) -> str:
    return value.metadata.plugin_data.plugin_name if value.HasField("metadata") else ""


class _Damaged(Exception):
    """A record that cannot be read; the reader skips it and says so in ``report.errors``."""


#: At most this many damaged-record notes in ``report.errors``; the rest are counted.
_MAX_NOTES = 20


class _Notes:
    """The reader's notes on damaged records: the first few in full, then a count."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.more = 0

    def add(self, note: str) -> None:
        if len(self.notes) < _MAX_NOTES:
            self.notes.append(note)
        else:
            self.more += 1

    def all(self) -> list[str]:
        return self.notes + ([f"... and {self.more} more damaged record(s) skipped."] if self.more else [])


def _scalar_of(value: Any, plugin: str) -> float | None:
    """The value of a scalar summary; None when it is not a scalar (a histogram...).

    Raises:
        _Damaged: a scalar whose tensor is not one number (a hand-made or damaged file).
    """
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor" and plugin == "scalars":  # "new style" scalars
        from tensorboard.util import tensor_util

        try:
            array = tensor_util.make_ndarray(value.tensor)
            if array.size != 1:
                raise _Damaged(f"a scalar holding {array.size} values")
            return float(array.reshape(()))
        except (TypeError, ValueError, KeyError, IndexError) as exc:  # unknown dtype, bytes, wrong shape
            raise _Damaged(f"an unreadable scalar tensor ({type(exc).__name__})") from None
    return None


def _json_payload(value: Any) -> Any:
    """The JSON a gradscope record carries (:func:`gradscope.sinks.protos.json_summary`), parsed.

    Raises:
        _Damaged: no payload, not UTF-8, not JSON, or nested beyond the parser's recursion limit.
    """
    try:
        return json.loads(value.tensor.string_val[0].decode("utf-8"))
    except IndexError:
        raise _Damaged("no payload") from None
    except UnicodeDecodeError:
        raise _Damaged("not UTF-8 text") from None
    except RecursionError:
        raise _Damaged("JSON nested too deeply") from None
    except ValueError as exc:
        raise _Damaged(f"not JSON ({exc})") from None


def _findings_of(payload: Any) -> list[Finding]:
    """The findings of a ``gradscope/_findings`` record: a list of findings, or ``{"findings": [...]}``.

    Raises:
        _Damaged: another shape, or a finding that :meth:`Finding.from_dict` refuses.
    """
    from gradscope.findings import Finding

    items = payload.get("findings") if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        raise _Damaged(f"expected a list of findings, got {type(payload).__name__}")
    try:
        return [Finding.from_dict(d) for d in items]
    except ValueError as exc:
        raise _Damaged(str(exc)) from None


def _meta_of(payload: Any) -> dict[str, Any]:
    """The run facts of a ``gradscope/_meta`` record, the keys the report computes with checked.

    Raises:
        _Damaged: not a JSON object, or ``steps`` / ``layers_by_depth`` of the wrong type.
    """
    if not isinstance(payload, dict):
        raise _Damaged(f"expected a JSON object, got {type(payload).__name__}")
    steps = payload.get("steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 2**63:
        raise _Damaged("'steps' is not an int step")
    depth = payload.get("layers_by_depth")
    if depth is not None and not (isinstance(depth, list) and all(isinstance(x, str) for x in depth)):
        raise _Damaged("'layers_by_depth' is not a list of strings")
    return {k: v for k, v in payload.items() if k not in ("schema", "version")}


def _final_of(payload: Any) -> Report:
    """The final ``gradscope/_report`` record, checked as a JSON report is (findings, meta, steps...).

    Raises:
        _Damaged: the record is not a report's JSON object or a key holds the wrong type.
    """
    from gradscope.report import JSON_SCHEMA, Report, ReportFormatError, _report_from_data

    if not isinstance(payload, dict):
        raise _Damaged(f"expected a JSON object, got {type(payload).__name__}")
    keys = ("version", "findings", "meta", "skipped_steps", "frozen", "errors")
    try:
        return _report_from_data(Report, {"schema": JSON_SCHEMA, **{k: payload[k] for k in keys if k in payload}})
    except ReportFormatError as exc:
        raise _Damaged(str(exc).replace("Malformed gradscope report: ", "").rstrip(".")) from None


def read_run(
    run_dir: Union[str, os.PathLike[str]],
    *,
    progress: Progress | None = None,
) -> Report:
    """Rebuild the report of a run from its TensorBoard event files.

    Args:
        run_dir: the run's folder (the ``log_dir`` given to ``watch``, or your writer's).
        progress: a :class:`~gradscope.sinks.progress.Progress` counting the bytes read, or None.

    Returns:
        A :class:`gradscope.Report` with stats, scalars, findings and meta.

    Raises:
        RunReadError: no event files there, no gradscope data in them, or a damaged final record.
            Other damaged records (undecodable events, JSON records that are not what gradscope
            writes, scalars that are not one number) are skipped, each named in ``report.errors``.
    """
    import pandas as pd
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # reason: protobuf ships no type stubs
    from tensorboard.compat.proto.event_pb2 import Event

    from gradscope.report import Report

    if not Path(run_dir).is_dir():
        raise RunReadError(f"{str(run_dir)!r} is not a folder: pass a run's folder (its log_dir).")
    files = event_files(run_dir)
    if not files:
        raise RunReadError(f"No TensorBoard event files in {str(run_dir)!r}.")
    stats: dict[tuple[int, str], tuple[int, str, str, str, float]] = {}
    scalars: dict[str, dict[int, float]] = {}
    metas: list[dict[str, Any]] = []
    flushed: list[tuple[int, list[Finding]]] = []
    finals: list[tuple[int, Any]] = []  # (step, payload or _Damaged): only the last one is read
    plugins: dict[str, str] = {}  # TensorBoard may write a tag's metadata only once
    parsed_tags: dict[str, Any] = {}
    notes = _Notes()
    for path in files:
        read = 0
        for raw in _records(path):
            read += len(raw) + 16  # + the record's length, and the two checksums
            if progress is not None:
                progress.update(len(raw) + 16)
            try:
                event = Event.FromString(raw)
            except DecodeError:
                notes.add(f"damaged event record ({len(raw)} bytes) in {path.name} skipped: not a TensorBoard event")
                continue
            if not event.HasField("summary"):
                continue
            step = int(event.step)
            for value in event.summary.value:
                tag = value.tag
                if not tag.startswith(T.PREFIX + "/"):
                    continue
                plugin = _plugin(value) or plugins.get(tag, "")
                plugins.setdefault(tag, plugin)
                try:
                    if plugin == T.PLUGIN_NAME:
                        payload = _json_payload(value)
                        if tag == T.REPORT_JSON_TAG:
                            finals.append((step, payload))
                        elif tag == T.META_JSON_TAG:
                            metas.append(_meta_of(payload))
                        elif tag == T.FINDINGS_JSON_TAG:
                            flushed.append((step, _findings_of(payload)))
                        continue
                    parsed = parsed_tags.get(tag, _UNPARSED)
                    if parsed is _UNPARSED:  # (every step repeats the tags: each is taken apart once)
                        parsed = parsed_tags[tag] = T.parse_tag(tag)
                    if parsed is None:
                        continue
                    v = _scalar_of(value, plugin)
                except _Damaged as exc:
                    if tag == T.REPORT_JSON_TAG:
                        finals.append((step, exc))
                    else:
                        notes.add(f"damaged {tag} record at step {step} skipped: {exc}")
                    continue
                if v is None:
                    continue
                if parsed.kind == "scalar":
                    scalars.setdefault(parsed.name, {})[step] = v
                else:
                    # a step written twice (a resumed run) keeps its last value, as TensorBoard shows
                    stats[(step, tag)] = (step, parsed.layer, parsed.param, parsed.stat, v)
        unread = path.stat().st_size - read
        if unread > 0:
            # TensorBoard's loader stops at a record it cannot read (a bad checksum, a cut-off write)
            notes.add(f"the last {unread} bytes of {path.name} could not be read (a damaged or unfinished record)")
    if not stats and not finals and not metas and not flushed and not scalars:
        raise RunReadError(
            f"No gradscope data in the event files of {str(run_dir)!r}: was it written by "
            "gradscope.watch(model, log_dir=...) or watch(model, writer=...)?"
        )
    table = pd.DataFrame(list(stats.values()), columns=["step", "layer", "param", "stat", "value"])
    table["step"] = table["step"].astype("int64")
    table["value"] = table["value"].astype("float64")
    table = table.sort_values("step", kind="stable").reset_index(drop=True)
    names = sorted(scalars)
    all_steps = sorted({s for series in scalars.values() for s in series})
    scal = pd.DataFrame(
        {n: [scalars[n].get(s, math.nan) for s in all_steps] for n in names},
        index=pd.Index(all_steps, name="step", dtype="int64"),
    )

    meta: dict[str, Any] = {}
    for m in metas:
        meta = m
    for step, payload in finals[:-1]:
        if isinstance(payload, _Damaged):  # superseded by a later final record: noted, not needed
            notes.add(f"damaged {T.REPORT_JSON_TAG} record at step {step} skipped: {payload}")
    errors: list[str] = []
    if finals:
        step, payload = finals[-1]
        try:
            if isinstance(payload, _Damaged):
                raise payload
            final = _final_of(payload)
        except _Damaged as exc:
            # The last final record holds the run's verdict: reading an older one, or the flushed
            # findings, would give a verdict that may not be the run's. Say so instead.
            raise RunReadError(
                f"The final {T.REPORT_JSON_TAG} record (step {step}) in {str(run_dir)!r} is damaged: {exc}. "
                "The run's verdict cannot be read from it."
            ) from None
        meta.update(final.meta)
        findings = list(final.findings)
        skipped, frozen = list(final.skipped_steps), list(final.frozen)
        errors = list(final.errors)
    else:
        # Each record holds the findings known at its step in their latest state (older runs: the new
        # ones only): the union, the latest state of each (kind, layer) winning.
        seen: dict[tuple[str, str | None], Finding] = {}
        for _, batch in sorted(flushed, key=lambda r: r[0]):
            for f in batch:
                seen[(f.kind, f.layer)] = f
        findings = sorted(seen.values(), key=lambda f: f.step)
        skipped, frozen = [], []
        last = int(table["step"].max()) if len(table) else (all_steps[-1] if all_steps else 0)
        meta.setdefault("steps", last)
        errors.append(
            f"The run did not close (no final record): this report covers what was flushed up to step {last}; "
            "later findings, if any, were lost with the process."
        )
    errors += notes.all()
    meta["source"] = str(run_dir)
    return Report(
        findings=findings,
        stats=table,
        scalars=scal,
        skipped_steps=skipped,
        frozen=frozen,
        meta=meta,
        errors=errors,
    )


def _total_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def read_report(
    source: Union[str, os.PathLike[str]],
    *,
    run: str | None = None,
    progress: bool | None = None,
) -> Report:
    """Read a report from a JSON file (``Report.to_json``) or a TensorBoard log dir or run dir.

    Args:
        source: a ``.json`` report, a run folder, a log dir holding exactly one run, or an event file.
        run: with a log dir holding several runs, the one to read (its path relative to ``source``).
        progress: show a progress bar on stderr while reading event files (None: when stderr is a
            terminal).

    Raises:
        RunReadError: the input does not exist, is not a gradscope report, or is ambiguous.
    """
    from gradscope.report import Report
    from gradscope.sinks.progress import Progress

    path = Path(source)
    if not path.exists():
        raise RunReadError(f"{str(source)!r} does not exist: pass a JSON report or a TensorBoard log dir.")
    if path.is_file() and _EVENTS not in path.name:
        try:
            return Report.from_json(path)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise RunReadError(f"{str(source)!r} is not a gradscope JSON report: {exc}") from None
    run_dir = path.parent if path.is_file() else path
    if path.is_dir() and run is not None:
        run_dir = path / run
        if not run_dir.is_dir():
            raise RunReadError(f"No run {run!r} in {str(source)!r}.")
    elif path.is_dir() and not event_files(path):
        runs = find_runs(path)
        if not runs:
            raise RunReadError(f"No TensorBoard event files in {str(source)!r} or below.")
        if len(runs) > 1:
            listed = ", ".join(str(r.relative_to(path)) for r in runs[:10]) + (" ..." if len(runs) > 10 else "")
            raise RunReadError(
                f"{str(source)!r} holds {len(runs)} runs ({listed}); pass one of them, e.g. "
                f"`gradscope report {runs[0]}`, or `--run {runs[0].relative_to(path)}`."
            )
        run_dir = runs[0]
    with Progress(_total_bytes(event_files(run_dir)), label=f"reading {run_dir}", enabled=progress) as bar:
        return read_run(run_dir, progress=bar)
