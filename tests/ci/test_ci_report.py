"""The JSON, JUnit XML and Markdown renderings of CI check results."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from ci_helpers import BigGradient, make_mlp

import gradscope
from gradscope.baseline import GradientProfile, LayerProfile, compare
from gradscope.ci_report import CHECKS_SCHEMA, CheckRecord, junit_xml, markdown, to_document, write_json
from gradscope.report import Report


@pytest.fixture(scope="module")
def records():
    torch.manual_seed(0)
    healthy = gradscope.check(*make_mlp(), rules=[BigGradient()], steps=2)
    torch.manual_seed(0)
    sick = gradscope.check(*make_mlp(scale=1e6), rules=[BigGradient()], steps=2)
    torch.manual_seed(0)
    warned = gradscope.check(*make_mlp(scale=1e6), rules=[BigGradient(level="warning")], steps=2)
    base = GradientProfile([LayerProfile("enc|oder", 4, [1.0], [0.5])], seeds=[0])
    moved = compare(base, GradientProfile([LayerProfile("enc|oder", 4, [100.0], [50.0])], seeds=[0]))
    return [
        CheckRecord("a.py:healthy", "check", "error", 0.25, report=healthy),
        CheckRecord("a.py:sick", "check", "error", 0.5, report=sick),
        CheckRecord("a.py:warned", "check", "error", 0.125, report=warned),
        CheckRecord("a.py:sick", "baseline", "error", 0.0625, comparison=moved),
        CheckRecord("b.py:make", "check", "error", 0.01, error="'b.py:make' raised RuntimeError: no data <today>"),
    ]


def test_verdicts(records):
    assert [r.verdict for r in records] == ["HEALTHY", "UNHEALTHY", "WARNINGS", "MOVED", "ERROR"]
    assert [r.failed for r in records] == [False, True, False, True, True]
    warned = CheckRecord("w", "check", "warning", report=records[2].report)
    assert warned.failed and warned.verdict == "UNHEALTHY"
    assert records[1].headline() == "a.py:sick [check] UNHEALTHY, 2 error(s), 0 warning(s), 2 step(s), 0.50 s"


def test_junit_xml(records):
    root = ET.fromstring(junit_xml(records))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        "5",
        "2",
        "1",
        "0",
    )
    assert float(suite.get("time")) == pytest.approx(0.9475, abs=1e-3)
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("gradscope.check", "a.py:healthy"),
        ("gradscope.check", "a.py:sick"),
        ("gradscope.check", "a.py:warned"),
        ("gradscope.baseline", "a.py:sick"),
        ("gradscope.check", "b.py:make"),
    ]
    assert cases[0].find("failure") is None and "HEALTHY" in cases[0].find("system-out").text
    failure = cases[1].find("failure")
    assert failure.get("type") == "ci_big_gradient"
    assert failure.get("message") == "2 finding(s) at or above 'error': ci_big_gradient in '0', ci_big_gradient in '3'"
    for f in records[1].report.findings:
        assert f.message in failure.text  # every finding message travels with the failure
    assert "layers, latest values up to step 2" in failure.text
    assert cases[2].find("failure") is None and "[warning]" not in cases[2].find("system-out").text
    assert "WARNINGS" in cases[2].find("system-out").text
    moved = cases[3].find("failure")
    assert moved.get("type") == "baseline" and "'enc|oder'" in moved.get("message")
    error = cases[4].find("error")
    assert error.get("message") == "'b.py:make' raised RuntimeError: no data <today>"


def test_markdown(records):
    text = markdown(records)
    lines = text.splitlines()
    assert lines[0] == "## gradscope: 3 of 5 check(s) failed"
    assert "| `a.py:healthy` | check | ✅ healthy | 0 error(s), 0 warning(s) | 0.25 s |" in lines
    assert "| `a.py:sick` | check | ❌ unhealthy | 2 error(s), 0 warning(s) | 0.50 s |" in lines
    assert "| `a.py:warned` | check | ⚠️ warnings | 0 error(s), 2 warning(s) | 0.12 s |" in lines
    assert "| `a.py:sick` | baseline | ❌ moved | 1 layer(s) changed | 0.06 s |" in lines
    assert "- **error**: 'b.py:make' raised RuntimeError: no data &lt;today>" in lines
    assert any(line.startswith("- **error** `ci_big_gradient` in `0` at step 1: gradient norm") for line in lines)
    assert any(line.startswith("  - `enc\\|oder` (moved): its gradient norm at init is 100x") for line in lines)
    assert markdown(records[:1]).splitlines()[0] == "## gradscope: all 1 check(s) passed"


def test_json_document(records, tmp_path):
    path = tmp_path / "out" / "checks.json"
    write_json(records, path, source="cli", fail_on="error")
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(to_document(records, source="cli", fail_on="error"))) | {
        "created": data["created"]
    }
    assert (data["schema"], data["version"], data["source"], data["ok"]) == (CHECKS_SCHEMA, 1, "cli", False)
    assert data["counts"] == {"checks": 5, "failed": 3, "errors": 1}
    sick = data["checks"][1]
    assert (sick["name"], sick["verdict"], sick["failed"]) == ("a.py:sick", "UNHEALTHY", True)
    assert [f["kind"] for f in sick["failing"]] == ["ci_big_gradient", "ci_big_gradient"]
    report = Report.from_json(sick["report"])  # the full report, readable back
    assert [f.layer for f in report.findings] == ["0", "3"]
    assert report.stats["step"].max() == 2
    assert data["checks"][3]["baseline"]["layers"][0]["status"] == "moved"
    assert data["checks"][4]["error"].startswith("'b.py:make' raised")


def test_details_of_a_passing_check_are_the_report():
    torch.manual_seed(0)
    report = gradscope.check(*make_mlp(), rules="none", steps=1)
    r = CheckRecord("x", "check", report=report)
    assert r.details() == str(report) and r.details().startswith("gradscope report: HEALTHY")
