"""CSVSink: the rows read back with the csv module are report.stats and report.scalars; a crash keeps the flushes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sinkhelp import FiresAtStep, expected_records, small_mlp, train

import gradscope
from gradscope.findings import Finding
from gradscope.sinks import CSVSink
from gradscope.sinks.registry import SINKS, build_sink

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _read(path):
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    return header, rows


def test_rows_equal_report_stats_and_findings_beside(tmp_path):
    path = tmp_path / "out" / "gradscope.csv"
    run = train(
        small_mlp(),
        15,
        sinks=[CSVSink(path)],
        flush_every=4,
        sample_every=5,
        skip=[7],
        rules=[FiresAtStep(at=6, layer="2")],
    )
    header, rows = _read(path)
    assert header == ["step", "tag", "value"]
    got = {}
    for step, tag, value in rows:
        assert (int(step), tag) not in got, f"{tag} twice at step {step}"
        got[(int(step), tag)] = float(value)  # full precision: float64 round trip
    want = expected_records(run.report)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert (3, "gradscope/l2_norm/_model") in got and (7, "gradscope/l2_norm/_model") not in got
    assert (7, "gradscope/scalar/loss") in got  # the skipped step keeps its loss
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)  # appended flush after flush
    findings = (tmp_path / "out" / "gradscope.findings.jsonl").read_text().splitlines()
    assert [Finding.from_dict(json.loads(line)) for line in findings] == run.report.findings
    assert len(findings) == 1


def test_selection_and_own_findings_path(tmp_path):
    sink = CSVSink(tmp_path / "s.csv", findings_path=tmp_path / "f.jsonl", stats=["rms"], per_param=True)
    run = train(small_mlp(), 3, sinks=[sink])
    _, rows = _read(tmp_path / "s.csv")
    got = {(int(s), t): float(v) for s, t, v in rows}
    want = {
        k: v for k, v in expected_records(run.report, per_param=True).items() if k[1].split("/")[1] in ("rms", "scalar")
    }
    assert got == want and (2, "gradscope/rms/0/weight") in got
    assert (tmp_path / "f.jsonl").read_text() == ""  # no finding, but the file says so
    sink.close(run.report)  # idempotent


def test_what_was_flushed_survives_a_killed_process(tmp_path):
    # the process dies at step 12 without closing anything: flushes at steps 5 and 10 are on disk
    script = textwrap.dedent(
        f"""
        import os, sys
        import torch
        sys.path.insert(0, {str(HERE)!r})
        from sinkhelp import small_mlp, train
        from gradscope.sinks import CSVSink

        torch.set_num_threads(min(2, torch.get_num_threads()))  # as in the test session
        torch.manual_seed(0)

        def die(step, model):
            if step == 12:
                os._exit(3)

        train(small_mlp(), 20, sinks=[CSVSink({str(tmp_path / "run.csv")!r})], flush_every=5, grad_hook=die)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    header, rows = _read(tmp_path / "run.csv")
    assert header == ["step", "tag", "value"]
    assert sorted({int(r[0]) for r in rows}) == list(range(1, 11))
    # the same run, closed properly, has the same first ten steps
    torch.manual_seed(0)
    run = train(small_mlp(), 10, flush_every=5)
    assert {(int(s), t): float(v) for s, t, v in rows} == expected_records(run.report)


def test_registered_and_validated(tmp_path):
    assert SINKS.get("csv") is CSVSink
    with pytest.raises(gradscope.ConfigurationError, match="Sink 'csv' needs arguments; pass an instance"):
        build_sink("csv")
    with pytest.raises(gradscope.ConfigurationError, match="Expected `path` of CSVSink to be a file path"):
        CSVSink(3)
    with pytest.raises(gradscope.ConfigurationError, match="give the findings another file"):
        CSVSink(tmp_path / "a.csv", findings_path=tmp_path / "a.csv")
    with pytest.raises(gradscope.ConfigurationError, match="Expected `stats` of CSVSink to be a list"):
        CSVSink(tmp_path / "a.csv", stats="rms")
    with pytest.raises(gradscope.ConfigurationError, match=r"CSVSink\(stats=...\) names 'grad_p99'"):
        gradscope.watch(small_mlp(), sinks=[CSVSink(tmp_path / "a.csv", stats=["grad_p99"])])
