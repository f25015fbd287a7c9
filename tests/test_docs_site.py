"""The documentation site builds with ``mkdocs build --strict`` (broken links, anchors and API names fail it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")
pytest.importorskip("material")

ROOT = Path(__file__).resolve().parents[1]

# What docs/api.md must document (the public names of the README, the registries and the sinks).
API_NAMES = [
    "watch",
    "GradScope",
    "WatchOptions",
    "Report",
    "Finding",
    "check",
    "assert_healthy",
    "verify",
    "VerificationReport",
    "register_statistic",
    "register_rule",
    "register_sink",
    "register_reference",
    "Rule",
    "Sink",
    "TensorBoardSink",
    "compare_runs",
]


def test_site_builds_strict_with_an_api_reference(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every page of docs/ is on the site
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    missing = [p for p in pages if not (site / ("" if p == "index" else p) / "index.html").exists()]
    assert not missing, missing
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="([^"]+)"', api))
    absent = [n for n in API_NAMES if not any(a == n or a.endswith("." + n) for a in anchors)]
    assert not absent, absent
    # the docstrings themselves are there, not just headings
    assert "Watch <code>model</code>" in api and "Raises" in api
