"""Runs shared by the view tests (trained once per session)."""

from __future__ import annotations

import pytest
import viewhelp


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory):
    """A healthy and a vanishing run: each a live report and a JSON file; the healthy one also a TensorBoard run."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, make, log_dir in (
        ("healthy", viewhelp.healthy, root / "healthy"),
        ("vanishing", viewhelp.vanishing, None),
    ):
        report = make(log_dir=log_dir)
        report.to_json(root / f"{name}.json")
        out[name] = (report, root / f"{name}.json", log_dir)
    return out
