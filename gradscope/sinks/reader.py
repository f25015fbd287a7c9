"""Read a finished run back into a :class:`gradscope.Report`: from TensorBoard event files or JSON.

Event files are read with TensorBoard's own record reader
(``tensorboard.backend.event_processing.event_file_loader``) and run discovery
(``io_wrapper.GetLogdirSubdirectories``), so whatever TensorBoard can read, this can. What comes back:

* ``report.stats`` from the ``gradscope/<stat>/<layer>[/<param>]`` scalars (float32, as stored);
* ``report.scalars`` from ``gradscope/scalar/<name>``;
* findings, run facts, skipped steps, frozen parameters from gradscope's JSON records (written by
  the TensorBoard sink: the final ``gradscope/_report`` at ``close()``, and ``gradscope/_findings``
  at each flush). A run that never closed (a killed process) still gives every finding flushed
  before it stopped, and says so in ``report.errors``.
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
    from gradscope.report import Report
    from gradscope.sinks.progress import Progress

__all__ = ["RunReadError", "event_files", "find_runs", "read_report", "read_run"]

_EVENTS = "events.out.tfevents"


class RunReadError(ValueError):
    """The input is not a readable gradscope run (nothing there, several runs, no gradscope data...)."""


def event_files(run_dir: Union[str, os.PathLike[str]]) -> list[Path]:
    """The event files directly inside ``run_dir``, oldest first (their names start with a timestamp)."""
    d = Path(run_dir)
    return sorted((p for p in d.iterdir() if p.is_file() and _EVENTS in p.name), key=lambda p: p.name)


def find_runs(logdir: Union[str, os.PathLike[str]]) -> list[Path]:
    """Every run (a folder holding event files) at or below ``logdir``, as TensorBoard finds them."""
    from tensorboard.backend.event_processing import io_wrapper

    return sorted(Path(p) for p in io_wrapper.GetLogdirSubdirectories(str(logdir)))


def _records(path: Path) -> Iterator[bytes]:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    yield from RawEventFileLoader(str(path)).Load()


def _plugin(value: Any) -> str:
    return value.metadata.plugin_data.plugin_name if value.HasField("metadata") else ""


def _scalar_of(value: Any, plugin: str) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor" and plugin == "scalars":  # "new style" scalars
        from tensorboard.util import tensor_util

        return float(tensor_util.make_ndarray(value.tensor).reshape(()))
    return None


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
        RunReadError: no event files there, or no gradscope data in them.
    """
    import pandas as pd
    from tensorboard.compat.proto.event_pb2 import Event

    from gradscope.report import Finding, Report

    files = event_files(run_dir)
    if not files:
        raise RunReadError(f"No TensorBoard event files in {str(run_dir)!r}.")
    stats: dict[tuple[int, str], tuple[int, str, str, str, float]] = {}
    scalars: dict[str, dict[int, float]] = {}
    records: dict[str, list[tuple[int, Any]]] = {}
    plugins: dict[str, str] = {}  # TensorBoard may write a tag's metadata only once
    for path in files:
        for raw in _records(path):
            if progress is not None:
                progress.update(len(raw) + 16)  # + the record's length, and the two checksums
            event = Event.FromString(raw)
            if not event.HasField("summary"):
                continue
            step = int(event.step)
            for value in event.summary.value:
                tag = value.tag
                if not tag.startswith(T.PREFIX + "/"):
                    continue
                plugin = _plugin(value) or plugins.get(tag, "")
                plugins.setdefault(tag, plugin)
                if plugin == T.PLUGIN_NAME:
                    text = value.tensor.string_val[0].decode("utf-8")
                    records.setdefault(tag, []).append((step, json.loads(text)))
                    continue
                parsed = T.parse_tag(tag)
                if parsed is None:
                    continue
                v = _scalar_of(value, plugin)
                if v is None:
                    continue
                if parsed.kind == "scalar":
                    scalars.setdefault(parsed.name, {})[step] = v
                else:
                    # a step written twice (a resumed run) keeps its last value, as TensorBoard shows
                    stats[(step, tag)] = (step, parsed.layer, parsed.param, parsed.stat, v)
    if not stats and not records and not scalars:
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
    for _, m in records.get(T.META_JSON_TAG, []):
        meta = {k: v for k, v in m.items() if k not in ("schema", "version")}
    final = records.get(T.REPORT_JSON_TAG)
    errors: list[str] = []
    if final:
        rec = final[-1][1]
        meta.update(rec.get("meta", {}))
        findings = [Finding.from_dict(f) for f in rec.get("findings", [])]
        skipped, frozen = rec.get("skipped_steps", []), rec.get("frozen", [])
        errors = list(rec.get("errors", []))
    else:
        seen: dict[tuple[str, str | None, int], Finding] = {}
        for _, batch in records.get(T.FINDINGS_JSON_TAG, []):
            for d in batch:
                f = Finding.from_dict(d)
                seen.setdefault((f.kind, f.layer, f.step), f)
        findings = list(seen.values())
        skipped, frozen = [], []
        last = int(table["step"].max()) if len(table) else (all_steps[-1] if all_steps else 0)
        meta.setdefault("steps", last)
        errors.append(
            f"The run did not close (no final record): this report covers what was flushed up to step {last}; "
            "later findings, if any, were lost with the process."
        )
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
