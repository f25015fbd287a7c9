"""TensorBoard's default loader (its data server) shows every finding of a run.

The data server keeps a time series' events only while their steps increase (an event at or below the
last step read replaces those after it), so findings written at their back-dated first steps (11, 21,
8, 14) showed 2 of 4. A real training script writes a run whose findings surface late and out of
order; a real ``tensorboard`` with default flags serves it, and every finding is read back through
its HTTP API. One server for the module: starting one takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import scripted_findings_run
from sinkhelp import load_events, tensor_text

from gradscope.sinks import tags as T

RUN = "run1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read().decode("utf-8"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(base url, run dir)``: the scripted run, served by ``tensorboard --logdir`` with default flags."""
    tmp = tmp_path_factory.mktemp("tb_default")
    logdir = tmp / "logs"
    scripted_findings_run.main(str(logdir / RUN))  # the script's own entry point, in this process
    port = _free_port()
    log = tmp / "tensorboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:  # the verdict is the run's last event: once it is served, the whole file was read
                if proc.poll() is not None:
                    pytest.fail(f"tensorboard exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    if T.VERDICT_TAG in _get(f"{base}/data/plugin/text/tags").get(RUN, []):
                        break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"tensorboard served no verdict within 90 s:\n{log.read_text()}")
                time.sleep(0.3)
            yield base, logdir / RUN
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def _text(base: str, tag: str) -> list[dict]:
    query = urllib.parse.urlencode({"run": RUN, "tag": tag})
    return _get(f"{base}/data/plugin/text/text?{query}")  # type: ignore[return-value]  # reason: JSON list


def test_the_server_runs_its_default_loader(served):
    base, _ = served
    env = _get(f"{base}/data/environment")
    assert env["debug"]["flags"]["load_fast"] == "auto"
    # the Rust data server, not the Python multiplexer that --load_fast=false uses
    assert env["debug"]["data_provider"].startswith("GrpcDataProvider")


def test_every_finding_is_served_at_increasing_steps(served):
    base, _ = served
    entries = _text(base, T.FINDINGS_TAG)
    # the flush (every 4 steps) at which each finding was first reported, then the end of late_d's
    # episode: at the flush that saw it (36) when the scope passes episode updates to its sinks, else
    # at close() (40), where the final report has it
    assert [e["step"] for e in entries][:4] == [12, 24, 28, 32]
    assert len(entries) == 5 and entries[4]["step"] in (36, 40)
    headline = re.compile(r"<strong>warning: (late_\w)</strong> in (.+?) at step (\d+)</p>")
    firsts = [headline.search(e["text"]).groups() for e in entries[:4]]  # type: ignore[union-attr]  # reason: asserted below
    assert firsts == [
        ("late_a", "<code>0</code>", "11"),
        ("late_b", "<code>2</code>", "21"),
        ("late_c", "<code>4</code>", "8"),
        ("late_d", "the model", "14"),
    ]
    for e, first in zip(entries[:4], (11, 21, 8, 14)):
        assert f"First seen at step {first}, reported at step {e['step']}." in e["text"]
    assert "late_d</strong> in the model, first seen at step 14: no longer holds from step 33." in entries[4]["text"]
    # the latest entry lists every finding (TensorBoard keeps only a sample of a long text series)
    assert "All findings so far (4):" in entries[4]["text"]
    assert entries[4]["text"].count("<td>late_") == 4


def test_verdict_lists_every_finding(served):
    base, _ = served
    [verdict] = _text(base, T.VERDICT_TAG)
    assert verdict["step"] == 40
    for kind, first in (("late_a", 11), ("late_b", 21), ("late_c", 8), ("late_d", 14)):
        assert re.search(
            rf"<td[^>]*>{first}( \(resolved at step 33\))?</td>\s*<td>warning</td>\s*<td>{kind}</td>", verdict["text"]
        )


def test_json_findings_records_are_append_only_and_end_in_the_final_state(served):
    _, run_dir = served
    acc = load_events(run_dir)
    records = [(step, json.loads(text)) for step, text in tensor_text(acc, T.FINDINGS_JSON_TAG)]
    steps = [s for s, _ in records]
    assert steps == sorted(set(steps)) and steps[:4] == [12, 24, 28, 32] and steps[-1] == 40
    # each record holds every finding known at its step; none contradicts a later one but by ending an episode
    kinds = [sorted(f["kind"] for f in batch) for _, batch in records]
    assert kinds[:4] == [
        ["late_a"],
        ["late_a", "late_b"],
        ["late_a", "late_b", "late_c"],
        ["late_a", "late_b", "late_c", "late_d"],
    ]
    assert all(k == kinds[3] for k in kinds[4:])
    final = {f["kind"]: f for f in records[-1][1]}
    assert {k: f["step"] for k, f in final.items()} == {"late_a": 11, "late_b": 21, "late_c": 8, "late_d": 14}
    before = {f["kind"]: f for f in records[3][1]}  # step 32: the episode still held
    assert before["late_d"]["resolved_step"] is None and final["late_d"]["resolved_step"] == 33
    [(_, report)] = tensor_text(acc, T.REPORT_JSON_TAG)
    assert sorted(records[-1][1], key=lambda f: f["kind"]) == sorted(
        json.loads(report)["findings"], key=lambda f: f["kind"]
    )
