"""Every ``examples/verify_*.py`` runs as a script and exits 0 (the examples are part of the docs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("verify_*.py"))


def test_examples_exist():
    assert "verify_backprop.py" in {p.name for p in EXAMPLES}


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script):
    # A fresh interpreter: examples register their own reference layers, which must not leak into tests.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",  # tiny tensors: threads only contend on a shared machine
    }
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gradscope.verify: reference backprop vs autograd" in done.stdout
