"""examples/tensorboard_demo.py runs as a test; the JSON example in docs/json-schema.md is a valid report."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from sinkhelp import load_events

from gradscope import Report

ROOT = Path(__file__).resolve().parents[2]


def test_tensorboard_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import tensorboard_demo

    run_dir = tmp_path / "logs" / "demo"
    report = tensorboard_demo.main(
        ["--log-dir", str(run_dir), "--steps", "50", "--histogram-every", "20", "--figure-every", "25"]
    )
    assert report.steps == 50
    # the demo's sigmoid stack starves its input side: the demo rule names the first layers
    flagged = [f.layer for f in report.findings if f.kind == "small_gradients"]
    assert flagged[:2] == ["embed", "blocks.0.fc1"]
    assert "head" not in flagged
    acc = load_events(run_dir)
    assert [e.step for e in acc.Histograms("gradscope/weight_hist/blocks.2.fc1")] == [1, 21, 41]
    # figures are drawn at flushes (every 50 steps here): the one at step 50 is not drawn twice at close
    assert [e.step for e in acc.Images("gradscope/figures/gradient_flow")] == [50]
    assert Report.from_json(run_dir / "report.json").findings == report.findings
    assert (run_dir / "gradscope-report.html").read_text().count("data:image/png;base64,") == 4
    assert "HTML summary:" in capsys.readouterr().out
    sys.modules.pop("tensorboard_demo", None)


def test_json_schema_doc_example_is_a_valid_report():
    text = (ROOT / "docs" / "json-schema.md").read_text()
    doc = json.loads(re.findall(r"```json\n(.*?)```", text, re.S)[-1])
    report = Report.from_json(doc)
    assert report.ok is False
    assert [f.kind for f in report.findings] == ["nonfinite_gradients"]
    assert report.stats["value"].isna().sum() == 2  # "nan" strings become NaN
    assert report.to_dict()["stats"] == doc["stats"]


def test_import_gradscope_stays_light():
    # TensorBoard, matplotlib and pandas load when an output needs them, not at import
    import subprocess

    code = (
        "import sys, gradscope; print(sorted(m for m in ('tensorboard', 'matplotlib', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
