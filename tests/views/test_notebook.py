"""Notebook display, executed for real: a fresh Jupyter kernel (nbclient + ipykernel) reads a report back and shows it.

What a user sees is what the kernel sends: the test inspects the cell outputs (``text/html``, ``image/png``,
``text/plain``) of an executed notebook, not the Python objects.
"""

from __future__ import annotations

import base64
import html
import json

import pytest
import torch.nn as nn
from viewhelp import FlagLayer, train

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<b>x</b>$\\foo$"  # HTML and mathtext in one module name


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    model = nn.Sequential()
    model.add_module("0", nn.Linear(16, 12))
    model.add_module("1", nn.Tanh())
    model.add_module(HOSTILE, nn.Linear(12, 4))
    report = train(model, 8, rules=[FlagLayer(HOSTILE, at=3)])
    path = tmp_path_factory.mktemp("nb") / "run.json"
    report.to_json(path)
    return path, report


def _execute(cells: list[str], monkeypatch) -> list[list[dict]]:
    # A fresh kernel as a user gets it: ipykernel selects matplotlib's inline backend only when MPLBACKEND is
    # unset (this test session sets Agg for itself), and hooks it into IPython only once pyplot is imported.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=False)
    client.execute()
    return [c.outputs for c in nb.cells]


def _data(outputs: list[dict]) -> dict:
    results = [o for o in outputs if o["output_type"] in ("execute_result", "display_data")]
    assert len(results) == 1, outputs
    return results[0]["data"]


def _png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_MAGIC)
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_report_findings_and_figures_display_in_a_fresh_kernel(report_path, monkeypatch):
    path, report = report_path
    outs = _execute(
        [
            f"import gradscope\nreport = gradscope.Report.from_json({str(path)!r})",
            "report",
            "report.findings",
            "report.plot('flow')",
            "import matplotlib.pyplot as plt\nreport.plot('loss')",  # pyplot's inline backend active as well
        ],
        monkeypatch,
    )
    # the report: verdict, the finding with every name escaped, the flow plot as an inline PNG
    page = _data(outs[1])["text/html"]
    assert "UNHEALTHY" in page and "8 steps" in page and "1 error(s)" in page and "0 warning(s)" in page
    assert html.escape(HOSTILE) in page and HOSTILE not in page
    assert "&lt;i&gt;this&lt;/i&gt; is a test" in page
    assert "exploding_gradients" in page and "<script" not in page.lower()
    src = page.split("src='data:image/png;base64,", 1)[1].split("'", 1)[0]
    fig = report.plot("flow")
    assert _png_size(base64.b64decode(src)) == tuple(round(v * 90) for v in fig.get_size_inches())  # dpi 90
    # the findings: one short line each with rounded numbers, and an escaped table
    findings = _data(outs[2])
    assert findings["text/plain"].splitlines() == [
        "[",
        f"  Finding(step=3, error, exploding_gradients, layer={HOSTILE!r}, stat=l2_norm, value=1.23, threshold=1),",
        "]",
    ]
    assert html.escape(HOSTILE) in findings["text/html"] and findings["text/html"].count("<tr>") == 2
    # the figures: one PNG output each, whether or not pyplot's inline backend is active
    for i, kind in ((3, "flow"), (4, "loss")):
        data = _data(outs[i])
        fig = report.plot(kind)
        width, height = _png_size(base64.b64decode(data["image/png"]))
        if i == 3:  # our own _repr_png_: exactly the figure's size
            assert (width, height) == tuple(round(v * fig.dpi) for v in fig.get_size_inches())
        else:  # IPython's inline formatter crops to the drawn area
            assert 0.5 * fig.dpi * fig.get_size_inches()[0] < width <= fig.dpi * fig.get_size_inches()[0]
        assert "Figure size" in data["text/plain"]
    json.dumps(outs)  # plain JSON, as the notebook file stores it
