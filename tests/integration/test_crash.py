"""Crashes: a training loop that raises still leaves a complete report and flushed TensorBoard events,
and a killed process never leaves a corrupt JSON report.

Every case runs a real training script in a subprocess (the interpreter really exits, atexit really
runs, signals are real) and reads back what it left: the JSON report with ``Report.from_json`` and
the events with TensorBoard's own reader. ``flush_every`` is larger than the run, so everything that
reached disk was written by the exit path.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gradscope

ROOT = Path(__file__).resolve().parents[2]

TRAIN = """
import os, signal, sys, time
import torch, torch.nn as nn
import gradscope

# Ctrl-C raises KeyboardInterrupt, as in a terminal, also when the test runner itself was started with
# SIGINT ignored (a background job of a non-interactive shell), which its children would inherit.
signal.signal(signal.SIGINT, signal.default_int_handler)

mode, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
kw = dict(optimizer=opt, log_dir=os.path.join(out, "tb"), report_path=os.path.join(out, "report.json"),
          flush_every=1000, on_nonfinite="raise" if mode == "nan" else "record")

def train(scope):
    step = 0
    while True:
        step += 1
        x = torch.randn(16, 4)
        if mode == "nan" and step == 7:
            x[0, 0] = float("nan")
        if mode == "error" and step == 9:
            raise RuntimeError("data loader died")
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad()
        if mode.startswith("sigint"):
            print(f"step {step}", flush=True)
            time.sleep(0.01)

if mode.endswith("atexit"):
    train(gradscope.watch(model, **kw))  # no `with`: the interpreter's exit closes the scope
else:
    with gradscope.watch(model, **kw) as scope:
        train(scope)
"""


def run_script(tmp_path: Path, mode: str, *, interrupt_after: int | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAIN))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(script), mode, str(tmp_path)]
    if interrupt_after is None:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.strip() == f"step {interrupt_after}":
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_events(tmp_path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def check_outputs(tmp_path: Path, last_step: int, ended_by: str) -> gradscope.Report:
    report = gradscope.Report.from_json(tmp_path / "report.json")
    assert report.steps == last_step
    assert report.meta["ended_by"] == ended_by
    steps = sorted(set(report.stats["step"]))
    assert steps[: last_step - 1] == list(range(1, last_step))
    events = read_events(tmp_path)
    norm = dict(events["gradscope/l2_norm/_model"])
    # the events on disk hold every finite step, with the report's values
    want = report.stats.query("layer == '*' and stat == 'l2_norm'").set_index("step")["value"]
    finite = {int(s): v for s, v in want.items() if v == v}
    assert sorted(norm) == sorted(finite)
    assert all(abs(norm[s] - v) <= 1e-6 * abs(v) for s, v in finite.items())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    return report


def test_nan_with_on_nonfinite_raise_leaves_a_complete_report(tmp_path):
    proc = run_script(tmp_path, "nan")
    assert proc.returncode != 0 and "NonFiniteGradientError" in proc.stderr, proc.stderr[-2000:]
    report = check_outputs(tmp_path, 7, "NonFiniteGradientError")
    s = report.stats
    assert s.query("step == 7 and layer == '*' and stat == 'nonfinite_count'")["value"].item() > 0
    assert sorted(set(s["step"])) == list(range(1, 8))


def test_exception_in_the_loop_leaves_a_complete_report(tmp_path):
    proc = run_script(tmp_path, "error")
    assert proc.returncode != 0 and "data loader died" in proc.stderr, proc.stderr[-2000:]
    report = check_outputs(tmp_path, 8, "RuntimeError")
    assert sorted(set(report.stats["step"])) == list(range(1, 9))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
@pytest.mark.parametrize("mode", ["sigint", "sigint-atexit"])
def test_keyboard_interrupt_leaves_a_complete_report_and_events(tmp_path, mode):
    proc = run_script(tmp_path, mode, interrupt_after=20)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr, proc.stderr[-2000:]
    report = gradscope.Report.from_json(tmp_path / "report.json")
    last = report.steps
    assert last >= 20  # the loop may finish a step or two before the signal lands
    ended_by = "KeyboardInterrupt" if mode == "sigint" else "interpreter exit"
    check_outputs(tmp_path, last, ended_by)
    assert sorted(set(report.stats["step"])) == list(range(1, last + 1))


KILLED_WRITE = """
import importlib.util, json, os, sys, time
path, mode = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("gs_io", sys.argv[3])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
first = json.dumps({"version": 1, "rows": list(range(50_000))})
second = json.dumps({"version": 2, "rows": list(range(100_000))})
if mode == "atomic":
    io.atomic_write_text(path, first)
    def stall(fd):  # the new text is half on its way to disk when the process is killed
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = stall
    io.atomic_write_text(path, second)
elif mode == "naive":  # the control: what a plain open(path, "w").write leaves behind
    with open(path, "w") as fh:
        fh.write(first)
    with open(path, "w") as fh:
        fh.write(second[: len(second) // 2])
        fh.flush()
        print("writing", flush=True)
        time.sleep(60)
else:  # "loop": write reports back to back until killed
    i = 0
    while True:
        i += 1
        io.atomic_write_text(path, json.dumps({"version": i, "rows": list(range(200_000))}))
        if i == 1:
            print("writing", flush=True)
"""


def _killed_writer(tmp_path: Path, mode: str, delay: float = 0.0) -> Path:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(KILLED_WRITE))
    target = tmp_path / f"report-{mode}.json"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(target), mode, str(ROOT / "gradscope" / "_io.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"  # type: ignore[union-attr]
    time.sleep(delay)
    proc.kill()  # SIGKILL: no cleanup of any kind runs
    proc.wait(timeout=30)
    return target


def test_sigkill_while_writing_keeps_the_previous_complete_report(tmp_path):
    target = _killed_writer(tmp_path, "atomic")
    assert json.loads(target.read_text())["version"] == 1  # the old report, whole
    # the control shows the kill does land mid-write: a plain write leaves truncated JSON
    naive = _killed_writer(tmp_path, "naive")
    with pytest.raises(json.JSONDecodeError):
        json.loads(naive.read_text())


def test_sigkill_at_random_moments_never_leaves_corrupt_json(tmp_path):
    rng = random.Random(0)
    for _ in range(8):
        target = _killed_writer(tmp_path, "loop", delay=rng.uniform(0.0, 0.05))
        data = json.loads(target.read_text())  # always a whole report
        assert len(data["rows"]) == 200_000


def test_report_path_is_validated_and_written_at_close(tmp_path):
    with pytest.raises(gradscope.ConfigurationError, match="Expected `report_path` to be a path"):
        gradscope.watch(nn.Linear(2, 2), report_path=3)
    target = tmp_path / "sub" / "report.json"
    model = nn.Linear(2, 2)
    with gradscope.watch(model, report_path=target) as scope:
        for _ in range(3):
            model(torch.ones(4, 2)).sum().backward()
            scope.step()
            model.zero_grad()
    back = gradscope.Report.from_json(target)
    assert back.steps == 3 and "ended_by" not in back.meta
    assert sorted(set(back.stats["step"])) == [1, 2, 3]
