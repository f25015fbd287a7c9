"""`gradscope report RUN`: reads a JSON report or TensorBoard event files, writes one self-contained HTML."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sinkhelp import FiresAtStep, f32, small_mlp, train

from gradscope.cli import main
from gradscope.sinks.progress import Progress
from gradscope.sinks.reader import read_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unhealthy(tmp_path_factory):
    d = tmp_path_factory.mktemp("unhealthy")
    run = train(small_mlp(), 12, log_dir=d / "run", flush_every=5, rules=[FiresAtStep(at=6, layer="2")])
    run.report.to_json(d / "report.json")
    return d, run.report


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    d = tmp_path_factory.mktemp("healthy")
    run = train(small_mlp(), 6, log_dir=d / "run", rules="none")
    return d, run.report


def _check_html(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # self-contained: no external resource, every image embedded
    assert not re.search(r"(?:src|href)\s*=\s*['\"](?!data:)", text)
    assert "http://" not in text and "https://" not in text
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == 4  # flow, heatmap, norms, loss
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    return text


def test_tensorboard_run_unhealthy_exit_1_and_html(unhealthy, capsys):
    d, _ = unhealthy
    assert main(["report", str(d / "run")]) == 1
    out = capsys.readouterr()
    assert out.out.strip() == str(read_report(d / "run", progress=False)).strip()
    assert "UNHEALTHY" in out.out and "exploding_gradients" in out.out
    html = _check_html(d / "run" / "gradscope-report.html")
    assert "UNHEALTHY: Sequential" in html
    assert "Layer &#x27;2&#x27; is flagged by the test rule at step 6." in html
    assert "HTML report:" in out.err


def test_json_report_and_output_option(unhealthy, tmp_path, capsys):
    d, _ = unhealthy
    out = tmp_path / "sub" / "page.html"
    assert main(["report", str(d / "report.json"), "-o", str(out), "-q"]) == 1
    assert capsys.readouterr().out == ""
    html = _check_html(out)
    assert "<td class='num'>6</td><td class='sev-error'>error</td>" in html


def test_healthy_exit_0_default_output_next_to_json(healthy, capsys):
    d, report = healthy
    report.to_json(d / "r.json")
    assert main(["report", str(d / "r.json")]) == 0
    assert (d / "r.html").is_file()
    assert "HEALTHY" in capsys.readouterr().out
    assert "No findings: every rule passed." in (d / "r.html").read_text()


def test_report_read_from_event_files_equals_the_live_one(unhealthy, tmp_path):
    d, live = unhealthy
    back = read_report(d, progress=False)  # the log dir holding one run
    assert back.findings == live.findings
    assert back.ok is False and back.steps == live.steps and back.errors == []
    assert back.meta["layers_by_depth"] == ["0", "2", "4"]
    agg = live.stats[live.stats["param"] == "*"]
    keys = ["step", "layer", "param", "stat"]
    merged = agg.merge(back.stats, on=keys, how="outer", indicator=True, suffixes=("_live", "_tb"))
    assert (merged["_merge"] == "both").all()
    np.testing.assert_array_equal(f32(merged["value_live"]), f32(merged["value_tb"]))
    for name in ("loss", "val_loss"):
        np.testing.assert_array_equal(f32(back.scalars[name]), f32(live.scalars[name]))
    # and converts to the JSON report
    assert main(["report", str(d / "run"), "--no-html", "-q", "--json", str(tmp_path / "tb.json")]) == 1
    assert read_report(tmp_path / "tb.json").findings == live.findings


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: _write(d / "x.json", '{"schema": "other"}'), "is not a gradscope JSON report"),
        (lambda d: _write(d / "x.txt", "hello"), "is not a gradscope JSON report"),
        (lambda d: _mkdir(d / "empty"), "No TensorBoard event files"),
    ],
)
def test_unreadable_input_exit_2(tmp_path, capsys, make, message):
    assert main(["report", str(make(tmp_path))]) == 2
    assert message in capsys.readouterr().err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_log_dir_with_several_runs(unhealthy, healthy, tmp_path, capsys):
    import shutil

    shutil.copytree(unhealthy[0] / "run", tmp_path / "a")
    shutil.copytree(healthy[0] / "run", tmp_path / "b")
    assert main(["report", str(tmp_path)]) == 2
    assert "holds 2 runs (a, b)" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--run-name", "b", "-q"]) == 0


def test_progress_bar():
    stream = io.StringIO()
    with Progress(2048, label="reading", stream=stream, enabled=True) as bar:
        bar.update(1024)
        bar.update(1024)
    assert stream.getvalue().endswith("[############################] 100%  2.0 KB / 2.0 KB  reading\n")
    quiet = io.StringIO()  # not a terminal: nothing unless forced
    with Progress(10, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_unclosed_run_in_a_real_subprocess(tmp_path):
    """A killed training process: the findings flushed before the end are still reported."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path[:0] = [{str(ROOT / "tests" / "sinks")!r}, {str(ROOT)!r}]
        from sinkhelp import FiresAtStep, small_mlp
        import torch, gradscope
        torch.manual_seed(0)
        model = small_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scope = gradscope.watch(model, optimizer=opt, log_dir={str(tmp_path / "run")!r}, flush_every=3,
                                rules=[FiresAtStep(at=2, layer="0")])
        for _ in range(7):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step(); scope.step(); opt.zero_grad()
        os._exit(0)  # no close(), no atexit: as if killed
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    proc = subprocess.run(
        [sys.executable, "-m", "gradscope.cli", "report", str(tmp_path / "run"), "--progress", "--no-html"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stderr
    assert "exploding_gradients" in proc.stdout
    assert "The run did not close (no final record): this report covers what was flushed up to step 6" in proc.stdout
    assert "100%" in proc.stderr
    assert not (tmp_path / "run" / "gradscope-report.html").exists()  # --no-html
