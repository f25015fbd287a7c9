"""The issue's acceptance checks with the real diagnosis rules, on the models of examples/ci."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
from ci_helpers import EXAMPLES, REPO, gradscope_command

import gradscope


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import broken_model
        import healthy_model

        yield healthy_model, broken_model
    finally:
        sys.path.remove(str(EXAMPLES))


def _seeded(factory, seed):
    torch.manual_seed(seed)
    out = factory()
    return out[:3], (out[3] if len(out) == 4 else None)


def test_broken_init_fails_check_with_vanishing_gradients(examples):
    _, broken = examples
    (model, batch, loss_fn), opt = _seeded(broken.make, 0)
    with pytest.raises(gradscope.GradientHealthError) as info:
        gradscope.assert_healthy(model, batch, loss_fn, optimizer=opt)
    kinds = {f.kind for f in info.value.report.findings}
    assert "vanishing_gradients" in kinds
    assert "vanishing_gradients" in str(info.value) and "layers, latest values up to step" in str(info.value)


def test_unused_branch_is_reported_as_no_gradient(examples):
    _, broken = examples
    (model, batch, loss_fn), _ = _seeded(broken.make_unused_branch, 0)
    report = gradscope.check(model, batch, loss_fn)
    assert ("no_gradient", "aux") in {(f.kind, f.layer) for f in report.findings}


def test_nan_batch_is_reported_as_nonfinite_gradients(examples):
    _, broken = examples
    (model, batch, loss_fn), _ = _seeded(broken.make_nan_batch, 0)
    report = gradscope.check(model, batch, loss_fn)
    assert not report.ok
    assert "nonfinite_gradients" in {f.kind for f in report.findings if f.severity == "error"}


@pytest.mark.parametrize("seed", range(10))
def test_healthy_classifier_passes_ten_seeds(examples, seed):
    healthy, _ = examples
    (model, batch, loss_fn), opt = _seeded(healthy.make, seed)
    report = gradscope.check(model, batch, loss_fn, optimizer=opt, seed=seed)
    assert report.findings == [], str(report)


@pytest.mark.parametrize("seed", range(3))
def test_healthy_transformer_passes_three_seeds(examples, seed):
    healthy, _ = examples
    (model, batch, loss_fn), _ = _seeded(healthy.make_transformer, seed)
    report = gradscope.check(model, batch, loss_fn, seed=seed)
    assert report.findings == [], str(report)


def test_command_fails_the_broken_model_and_passes_the_healthy_one(tmp_path):
    args, extra = gradscope_command()
    proc = subprocess.run(
        [
            *args,
            "check",
            "examples/ci/healthy_model.py:make",
            "examples/ci/healthy_model.py:make_transformer",
            "examples/ci/broken_model.py:make",
            "--junit",
            str(tmp_path / "r.xml"),
        ],
        cwd=REPO,
        env={**os.environ, **extra},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "examples/ci/healthy_model.py:make [check] HEALTHY" in proc.stdout
    assert "examples/ci/healthy_model.py:make_transformer [check] HEALTHY" in proc.stdout
    assert "examples/ci/broken_model.py:make [check] UNHEALTHY" in proc.stdout
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    failures = {c.get("name"): c.find("failure") for c in suite.findall("testcase")}
    assert failures["examples/ci/healthy_model.py:make"] is None
    assert "vanishing_gradients" in failures["examples/ci/broken_model.py:make"].text
