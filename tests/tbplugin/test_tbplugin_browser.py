"""The gradscope tab in a real browser: headless Chromium loads it from a real TensorBoard server.

Skipped where no Chromium is installed (Debian: ``apt-get install chromium``). Chromium runs as a
plain command (``--dump-dom``, ``--screenshot``), with a virtual-time budget that lets the page's
requests finish before the DOM is read; the page marks ``<body data-ready="1">`` once it has drawn.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest
from tbhelp import RUN, STEPS, start_tensorboard

BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (apt-get install chromium)")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=20000",
]


def chromium(url: str, *args: str) -> str:
    profile = tempfile.mkdtemp(prefix="gradscope-chromium-")
    try:
        done = subprocess.run(
            [BROWSER, *FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Page(HTMLParser):
    """What the test reads from the dumped DOM: the attributes of every element, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]


@pytest.fixture(scope="module")
def server(vanish_logdir, tmp_path_factory):
    logdir, report = vanish_logdir
    srv = start_tensorboard(logdir, tmp_path_factory.mktemp("browser") / "tb.log", ready_run=RUN, ready_step=STEPS)
    try:
        yield srv.base, report
    finally:
        srv.stop()


def test_tab_renders_findings_and_charts(server, tmp_path):
    base, report = server
    url = f"{base}/data/plugin_entry.html?name=gradscope"  # the tab's iframe, as TensorBoard loads it
    page = Page()
    page.feed(chromium(url, "--dump-dom"))
    body = page.find("body")[0]
    assert body.get("data-ready") == "1", "the tab did not finish drawing"
    assert [p["data-run"] for p in page.find("section", "panel")] == [RUN]
    rows = page.find("tr", "finding")
    assert len(rows) == len(report.findings) >= 1
    assert [r["data-layer"] for r in rows] == [f.layer or "" for f in report.findings]
    assert all(f"sev-{f.severity}" in r["class"] for r, f in zip(rows, report.findings))
    assert len(page.find("svg", "flow-chart")) == 1
    dots = page.find("circle", "typical-dot")
    assert len(dots) == 9  # one per Linear layer of the MLP
    flagged = {d["data-layer"] for d in dots if "flagged" in d["class"].split()}
    assert flagged == {f.layer for f in report.findings if f.layer}
    assert len(page.find("canvas", "heatmap-canvas")) == 1
    assert len(page.find("svg", "line-chart")) >= 2  # update ratio, loss

    shot = tmp_path / "tab.png"
    chromium(url, f"--screenshot={shot}", "--window-size=1200,900")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 900)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert (0xCF, 0x22, 0x2E) in colours  # the UNHEALTHY badge / flagged layer red was drawn
    assert len(colours) > 50  # charts and the heat map's gradient, not a blank page
