"""`gradscope check` and `gradscope snapshot`: exit codes, messages and files, in-process and as a real command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from ci_helpers import EXAMPLES, FACTORY_SOURCE, HERE, REGISTER_SOURCE, REPO, BigGradient, gradscope_command

from gradscope.baseline import GradientProfile
from gradscope.cli import main
from gradscope.registry import RULES


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A folder with f.py (factories) and ci_helpers.py, as the working directory."""
    shutil.copy(HERE / "ci_helpers.py", tmp_path / "ci_helpers.py")
    (tmp_path / "f.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def big_gradient_rule():
    """BigGradient registered by name for one test (command lines select rules by name), then removed."""
    RULES.register("ci_big_gradient", BigGradient)
    try:
        yield "ci_big_gradient"
    finally:
        RULES.unregister("ci_big_gradient")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("missing.py:make", "Cannot find the file 'missing.py' named in 'missing.py:make'. Check the path"),
        ("f.py", "Expected FILE.py:factory (for example model_health.py:make), but got 'f.py'."),
        ("f.py:nope", "'f.py' has no attribute 'nope'. Callables defined there:"),
        ("f.py:raises", "The factory 'f.py:raises' raised RuntimeError: no data today"),
        ("f.py:wrong_shape", "'f.py:wrong_shape' returned a tuple of length 2. Expected the factory to return (model,"),
        ("f.py:not_a_model", "returned str as the model; it must be a torch.nn.Module."),
        ("f.py:vector_loss", "got shape [32]. Reduce it to one number"),
        ("f.py:forward_fails", "Checking 'f.py:forward_fails' raised RuntimeError: mat1 and mat2 shapes cannot be"),
    ],
)
def test_load_and_usage_errors_exit_2(factories, capsys, target, message):
    code, out, err = run(capsys, "check", target, "--rules", "none")
    assert code == 2
    assert err.startswith("gradscope check: error: ")
    assert message in err
    assert out.splitlines()[-1].startswith("gradscope check: 0 passed, 1 failed")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check"], "the following arguments are required: FILE.py:factory"),
        (["check", "f.py:healthy", "--fail-on", "info"], "argument --fail-on: invalid choice: 'info'"),
        (["check", "f.py:healthy", "--steps", "0"], "argument --steps: Expected a positive int, but got '0'."),
        (["check", "f.py:healthy", "--tolerance", "0.2"], "--tolerance applies to a baseline comparison"),
        (["check", "f.py:healthy", "--threshold", "ratio=3"], "Expected --threshold RULE.NAME=VALUE"),
        (["check", "f.py:healthy", "--rules", "nope"], "Unknown rule 'nope'. Registered rules:"),
        (["check", "f.py:healthy", "--baseline", "none.json"], "Cannot find the baseline profile 'none.json'"),
        (["snapshot", "f.py:healthy"], "the following arguments are required: -o/--output"),
        (["snapshot", "f.py:healthy", "-o", "p.json", "--seeds", "a"], "Expected a number of seeds (3) or a list"),
        (["snapshot", "f.py:raises", "-o", "p.json"], "The factory 'f.py:raises' raised RuntimeError"),
    ],
)
def test_bad_command_lines_exit_2(factories, capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


def test_healthy_check_prints_the_report_and_the_time(factories, capsys):
    code, out, err = run(capsys, "check", "f.py:with_sgd", "--rules", "none", "--steps", "3", "--json", "r.json")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "gradscope report: HEALTHY - Sequential, 3 steps, 0 error(s), 0 warning(s)"
    assert "layers, latest values up to step 3 (! = named in a finding):" in lines
    headline = next(line for line in lines if line.startswith("f.py:with_sgd [check]"))
    assert headline.startswith("f.py:with_sgd [check] HEALTHY, 0 error(s), 0 warning(s), 3 step(s), ")
    assert headline.endswith(" s")
    assert lines[-1].startswith("gradscope check: 1 passed, 0 failed (fail-on=error) in ")
    data = json.loads(Path("r.json").read_text())
    check = data["checks"][0]["report"]
    assert check["meta"]["check"]["optimizer"] == "SGD"  # the factory's optimizer is used
    assert check["meta"]["steps"] == 3 and data["ok"] is True


def test_fail_on_and_thresholds(factories, capsys, big_gradient_rule):
    code, out, _ = run(capsys, "check", "f.py:exploding", "--rules", big_gradient_rule, "-q")
    assert code == 1
    assert out.splitlines()[0].startswith("f.py:exploding [check] UNHEALTHY, 2 error(s), 0 warning(s), 5 step(s)")
    warn = ["--threshold", "ci_big_gradient.level='warning'", "--threshold", "ci_big_gradient.limit=1e4"]
    code, out, _ = run(capsys, "check", "f.py:exploding", "--rules", big_gradient_rule, "-q", *warn)
    assert code == 0
    assert out.splitlines()[0].startswith("f.py:exploding [check] WARNINGS, 0 error(s), 2 warning(s)")
    code, _, _ = run(
        capsys, "check", "f.py:exploding", "--rules", big_gradient_rule, "-q", "--fail-on", "warning", *warn
    )
    assert code == 1
    code, _, _ = run(
        capsys,
        "check",
        "f.py:exploding",
        "--rules",
        big_gradient_rule,
        "-q",
        "--threshold",
        "ci_big_gradient.limit=1e9",
    )
    assert code == 0


def test_snapshot_writes_a_profile(factories, capsys):
    code, out, _ = run(capsys, "snapshot", "f.py:healthy", "-o", "prof/p.json", "--seeds", "4,7")
    assert code == 0
    profile = GradientProfile.from_json("prof/p.json")
    assert profile.seeds == [4, 7] and [lp.layer for lp in profile.layers] == ["0", "3"]
    assert profile.source == "f.py:healthy"
    assert out.splitlines()[-1].startswith("gradscope snapshot: wrote prof/p.json (2 layers, seeds 4, 7) in ")
    code, out, _ = run(capsys, "check", "f.py:healthy", "--rules", "none", "--baseline", "prof/p.json", "-q")
    assert code == 0
    assert out.splitlines()[1].startswith("f.py:healthy [baseline] MATCHES, 2 layer(s) within tolerance")
    code, out, _ = run(capsys, "check", "f.py:exploding", "--rules", "none", "--baseline", "prof/p.json", "-q")
    assert code == 1
    assert out.splitlines()[1].startswith("f.py:exploding [baseline] MOVED, 2 of 2 layer(s) changed")
    # A gradient that is not finite now is a moved profile (exit 1), reported in valid JSON.
    code, out, err = run(
        capsys, "check", "f.py:nan_batch", "--rules", "none", "--baseline", "prof/p.json", "-q", "--json", "n.json"
    )
    assert code == 1, err
    layers = json.loads(Path("n.json").read_text())["checks"][1]["baseline"]["layers"]
    assert [(lc["layer"], lc["status"], lc["current"]) for lc in layers] == [
        ("0", "nonfinite", None),
        ("3", "nonfinite", None),
    ]


# -- the installed command, in a subprocess ----------------------------------------------------------------


def command(*argv, cwd, timeout=180):
    args, extra = gradscope_command()
    env = {**os.environ, **extra}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([*args, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_command_check_writes_json_junit_and_markdown(tmp_path):
    shutil.copy(HERE / "ci_helpers.py", tmp_path / "ci_helpers.py")
    (tmp_path / "models.py").write_text(REGISTER_SOURCE + FACTORY_SOURCE)
    proc = command(
        "check",
        "models.py:healthy",
        "models.py:exploding",
        "--rules",
        "ci_big_gradient",
        "--json",
        "out/r.json",
        "--junit",
        "out/r.xml",
        "--markdown",
        "out/r.md",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(
        line.startswith("models.py:healthy [check] HEALTHY, 0 error(s), 0 warning(s), 5 step(s), ") for line in lines
    )
    assert any(
        line.startswith("models.py:exploding [check] UNHEALTHY, 2 error(s), 0 warning(s), 5 step(s), ")
        for line in lines
    )
    assert "gradscope: models.py:exploding is unhealthy: 2 finding(s) at or above 'error'" in proc.stdout
    assert lines[-1].startswith("gradscope check: 1 passed, 1 failed (fail-on=error) in ")

    data = json.loads((tmp_path / "out/r.json").read_text())
    assert [(c["name"], c["verdict"]) for c in data["checks"]] == [
        ("models.py:healthy", "HEALTHY"),
        ("models.py:exploding", "UNHEALTHY"),
    ]
    assert [(f["kind"], f["layer"]) for f in data["checks"][1]["failing"]] == [
        ("ci_big_gradient", "0"),
        ("ci_big_gradient", "3"),
    ]

    suite = ET.parse(tmp_path / "out/r.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "1", "0")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["models.py:healthy"].find("failure") is None
    failure = cases["models.py:exploding"].find("failure")
    assert failure.get("type") == "ci_big_gradient"
    assert "gradient norm" in failure.text and "above 1000" in failure.text

    md = (tmp_path / "out/r.md").read_text()
    assert md.startswith("## gradscope: 1 of 2 check(s) failed")
    assert "| `models.py:exploding` | check | ❌ unhealthy | 2 error(s), 0 warning(s) |" in md


def test_command_exit_2_for_a_missing_file(tmp_path):
    proc = command("check", "nowhere.py:make", "--junit", "r.xml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "gradscope check: error: Cannot find the file 'nowhere.py'" in proc.stderr
    error = ET.parse(tmp_path / "r.xml").getroot().find("testsuite/testcase/error")
    assert "Cannot find the file 'nowhere.py'" in error.get("message")


def test_command_snapshot_and_baseline_on_the_examples(tmp_path):
    profile = tmp_path / "p.json"
    proc = command("snapshot", "examples/ci/healthy_model.py:make", "-o", str(profile), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "gradscope snapshot: wrote" in proc.stdout
    # The committed baseline is what the snapshot command records (up to float rounding across machines).
    fresh, committed = GradientProfile.from_json(profile), GradientProfile.from_json(EXAMPLES / "profile.json")
    for a, b in zip(fresh.layers, committed.layers):
        assert a.layer == b.layer and a.norms == pytest.approx(b.norms, rel=1e-4)
    proc = command(
        "check",
        "examples/ci/healthy_model.py:make",
        "examples/ci/broken_model.py:make",
        "--rules",
        "none",
        "--baseline",
        str(profile),
        "--junit",
        str(tmp_path / "r.xml"),
        cwd=REPO,
    )
    assert proc.returncode == 1, proc.stderr
    assert "examples/ci/healthy_model.py:make [baseline] MATCHES, 5 layer(s) within tolerance" in proc.stdout
    assert "examples/ci/broken_model.py:make [baseline] MOVED, 4 of 5 layer(s) changed" in proc.stdout
    assert "FAILED, 4 of 5 layers changed: 'hidden.0', 'hidden.1', 'hidden.2', 'hidden.3'" in proc.stdout
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    failures = [(c.get("classname"), c.get("name")) for c in suite.findall("testcase") if c.find("failure") is not None]
    assert failures == [("gradscope.baseline", "examples/ci/broken_model.py:make")]
