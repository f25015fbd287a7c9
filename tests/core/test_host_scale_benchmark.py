"""``benchmarks/host_scale.py`` (the host-side figures of docs/performance.md) keeps running.

A smoke run at small sizes: every case prints its line with its times; the times are never judged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_host_scale_benchmark_prints_every_case(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_scale.py"), "--quick", "--cases", "flush,report,wide,step"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.split()}
    flush = [line for line in proc.stdout.splitlines() if line.startswith("flush ")]
    assert len(flush) == 2, proc.stdout
    assert re.search(r"live off: flush \d+\.\d ms \(commit \d+\.\d ms; rules \d+\.\d ms, over all", flush[0]), flush
    assert re.search(
        r"live on \(the second flush\): flush \d+\.\d ms \(commit \d+\.\d ms; live evaluations since the first flush: \d+",
        flush[1],
    ), flush
    assert re.search(r"report\(\) \d+\.\d\d s", lines["report"]) and "rows, built when read" in lines["report"]
    assert re.search(r"HTML \d+\.\d\d s \(\d+ KiB\)", proc.stdout), proc.stdout
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step    ")]
    assert [re.search(r"\((\d+) tensors\)", line).group(1) for line in steps] == ["16", "128"], proc.stdout
    assert all(re.search(r"scope\.step\(\) \d+ / \d+ us .* capture \d+ / \d+ us", line) for line in steps), steps
