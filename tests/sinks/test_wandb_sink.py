"""WandbSink against wandb itself in offline mode, read back from the run's own files; no network.

wandb (0.2x) no longer ships a Python reader of its ``.wandb`` transaction log, so the records are read
with the framing of that log (LevelDB's log format, under a 7-byte ``:W&B`` header) and parsed with
wandb's own protocol buffers (``wandb.proto.wandb_internal_pb2.Record``). One offline run for the
module: starting wandb takes seconds.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from sinkhelp import FiresAtStep, expected_records, small_mlp, train

import gradscope

wandb = pytest.importorskip("wandb")
from gradscope.sinks.wandb import STEP_METRIC, WandbSink  # noqa: E402

_BLOCK = 32 * 1024  # LevelDB log blocks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every ``Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:  # the writer is still at it
            break
        pos += 7 + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def finished_records(run_dir: Path, timeout: float = 60.0) -> list:
    """The records of an offline run once its ``exit`` record is on disk.

    ``finish()`` hands the run's end to wandb's service process, which may write the last records of
    the file a moment later.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = read_records(next(run_dir.glob("run-*.wandb")))
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    mp = pytest.MonkeyPatch()
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true"}.items():
        mp.setenv(name, value)
    try:
        sink = WandbSink(init={"project": "gradscope-test"})
        run = train(small_mlp(), 9, sinks=[sink], flush_every=4, rules=[FiresAtStep(at=3, layer="2")])
    finally:
        mp.undo()
    [run_dir] = list((tmp / "wandb").glob("offline-run-*"))
    return run, run_dir, finished_records(run_dir)


def test_metrics_read_back_at_gradscope_steps(offline):
    run, _, records = offline
    rows = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    got = {
        (row[STEP_METRIC], k): v
        for row in rows
        for k, v in row.items()
        if k.startswith("gradscope/") and k != STEP_METRIC and not k.startswith("gradscope/findings")
    }
    assert got == expected_records(run.report)  # exactly: float64 through JSON
    # one row per step, then the findings' row at the flush that found them (steps 1-4)
    steps = [row[STEP_METRIC] for row in rows]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9]
    findings_row = rows[4]
    assert (findings_row["gradscope/findings/count"], findings_row["gradscope/findings/errors"]) == (1, 1)
    assert findings_row["gradscope/findings/_type"] == "table-file"


def test_findings_table_and_summary(offline):
    run, run_dir, records = offline
    [table_file] = list((run_dir / "files" / "media" / "table" / "gradscope").glob("findings_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "severity", "kind", "layer", "status", "message", "suggestion"]
    [f] = run.report.findings
    assert table["data"] == [[3, "error", "exploding_gradients", "2", "confirmed", f.message, f.suggestion]]
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    assert summary["gradscope/verdict"] == "unhealthy"
    assert (summary["gradscope/findings/count"], summary["gradscope/findings/errors"]) == (1, 1)
    # the step metric was declared for gradscope's metrics
    metrics = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in records if r.HasField("metric")}
    assert metrics.get("gradscope/*") == STEP_METRIC
    assert any(r.HasField("exit") for r in records)  # the sink started the run, so it finished it
    assert wandb.run is None


def test_options_validated():
    with pytest.raises(gradscope.ConfigurationError, match="Expected `run` of WandbSink to be a wandb run"):
        WandbSink(run=object())
    with pytest.raises(gradscope.ConfigurationError, match="Expected `init` of WandbSink"):
        WandbSink(init=["project"])


def test_lightning_wandb_logger_gets_the_findings_as_a_table(tmp_path, monkeypatch):
    pl = pytest.importorskip("lightning.pytorch")
    from gradscope.sinks import MetricsLoggerSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = pl.loggers.WandbLogger(offline=True, save_dir=str(tmp_path), project="gradscope-test")
    run = train(small_mlp(), 5, sinks=[MetricsLoggerSink(logger)], flush_every=4, rules=[FiresAtStep(at=3, layer="2")])
    logger.experiment.finish()
    [run_dir] = list((tmp_path / "wandb").glob("offline-run-*"))
    [table_file] = list((run_dir / "files" / "media" / "table" / "gradscope").glob("findings_*.table.json"))
    table = json.loads(table_file.read_text())
    [f] = run.report.findings
    assert table["data"] == [[3, "error", "exploding_gradients", "2", "confirmed", f.message, f.suggestion]]
    rows = [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in finished_records(run_dir)
        if r.HasField("history")
    ]
    # Lightning's logger puts the step in "trainer/global_step"; the counts join step 4's metrics
    counts = [
        (r["trainer/global_step"], r["gradscope/findings/count"]) for r in rows if "gradscope/findings/count" in r
    ]
    assert counts == [(4, 1)]
    l2 = {r["trainer/global_step"]: r["gradscope/l2_norm/_model"] for r in rows if "gradscope/l2_norm/_model" in r}
    assert l2 == {s: v for (s, t), v in expected_records(run.report).items() if t == "gradscope/l2_norm/_model"}
