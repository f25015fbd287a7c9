"""End to end: a real TensorBoard server on loopback serves the run's scalar tags and the layout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from sinkhelp import small_mlp, train

from gradscope.sinks import tags as T


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read().decode("utf-8"))


def _wait_ready(base: str, proc: subprocess.Popen, log, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}:\n{log.read_text()}")
        try:
            runs = _get(f"{base}/data/runs")
            if runs:  # the log dir has been read at least once
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"tensorboard did not answer on {base} within {timeout:.0f} s")


def test_real_tensorboard_server_serves_tags_and_layout(tmp_path):
    logdir = tmp_path / "logs"
    run = train(small_mlp(), 12, log_dir=logdir / "exp1", flush_every=5)
    port = _free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    log = tmp_path / "tensorboard.log"
    log_file = log.open("w")
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
            "--reload_interval",
            "1",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc, log)
        assert _get(f"{base}/data/runs") == ["exp1"]
        tags = _get(f"{base}/data/plugin/scalars/tags")["exp1"]
        stats = run.report.stats
        expected = {T.stat_tag(s, layer) for (layer, s), _ in stats[stats["param"] == "*"].groupby(["layer", "stat"])}
        expected |= {T.scalar_tag("loss"), T.scalar_tag("val_loss")}
        assert set(tags) == expected

        query = urllib.parse.urlencode({"run": "exp1", "tag": "gradscope/l2_norm/_model"})
        series = _get(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [int(step) for _, step, _ in series] == list(range(1, 13))

        layout = _get(f"{base}/data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert titles[:2] == ["gradscope overview", "gradscope l2_norm by layer"]
        l2 = layout["category"][1]
        # one chart per layer: the dashboard colours a chart's lines by run, so layers never share one
        assert [c["title"] for c in l2["chart"]] == [
            "l2_norm / whole model",
            "l2_norm / 0",
            "l2_norm / 2",
            "l2_norm / 4",
        ]
        assert l2["chart"][1]["multiline"]["tag"] == ["^(?:gradscope/l2_norm/0)$"]

        # the custom-scalars plugin resolves each chart's regex to exactly its layer's tag
        for chart, layer in zip(l2["chart"][1:], ["0", "2", "4"]):
            query = urllib.parse.urlencode({"run": "exp1", "tag": chart["multiline"]["tag"][0]})
            resolved = _get(f"{base}/data/plugin/custom_scalars/scalars?{query}")
            assert resolved["regex_valid"] is True
            assert list(resolved["tag_to_events"]) == [f"gradscope/l2_norm/{layer}"]
            assert [int(step) for _, step, _ in resolved["tag_to_events"][f"gradscope/l2_norm/{layer}"]] == list(
                range(1, 13)
            )

        hist_tags = _get(f"{base}/data/plugin/histograms/tags")["exp1"]
        assert sorted(hist_tags) == ["gradscope/grad_hist/0", "gradscope/grad_hist/2", "gradscope/grad_hist/4"]
        text_tags = _get(f"{base}/data/plugin/text/tags")["exp1"]
        assert T.VERDICT_TAG in text_tags
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log_file.close()
