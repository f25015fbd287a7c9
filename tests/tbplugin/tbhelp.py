"""Helpers of the gradscope-tab tests: a short training run, a real TensorBoard server, HTTP reads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import gradscope

RUN = "vanish"
STEPS = 40


def vanishing_mlp(depth: int = 8, d: int = 16) -> nn.Module:
    """Linear + sigmoid layers ``0, 2, ..., 2*depth`` (Linear), default init: the input side's gradient vanishes."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(d, d), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(d, 2))


def train_run(run_dir: Path, steps: int = STEPS) -> gradscope.Report:
    """The training script of the tests: SGD on seeded regression data under ``gradscope.watch``."""
    torch.manual_seed(0)
    model = vanishing_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    with gradscope.watch(model, optimizer=opt, log_dir=run_dir, flush_every=10) as scope:
        for _ in range(steps):
            x = torch.randn(32, 16, generator=gen)
            loss = (model(x) - x[:, :2].sin()).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    return scope.report()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(base: str, path: str, **params: Any) -> Any:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    url = f"{base}{path}" + (f"?{query}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read().decode("utf-8"))


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=3)  # its data server exits with it (it watches its stdin)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def start_tensorboard(logdir: Path, log: Path, *, ready_run: str, ready_step: int, timeout: float = 90.0) -> Server:
    """``tensorboard --logdir LOGDIR --port PORT`` (default flags otherwise), ready once the tab sees ``ready_run``.

    Fails the test with the server's log when it exits or does not get ready in ``timeout`` seconds.
    """
    import pytest

    port = free_port()
    exe = shutil.which("tensorboard")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    fh = log.open("w")
    proc = subprocess.Popen(
        [*cmd, "--logdir", str(logdir), "--port", str(port)],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    server = Server(f"http://localhost:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}:\n{log.read_text()}")
        try:
            runs = get(server.base, "/data/plugin/gradscope/runs")["runs"]
            if any(r["run"] == ready_run and r["max_step"] >= ready_step for r in runs):
                return server
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.3)
    server.stop()
    pytest.fail(
        f"tensorboard did not serve run {ready_run!r} on {server.base} within {timeout:.0f} s:\n{log.read_text()}"
    )
