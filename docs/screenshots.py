"""Regenerate the screenshots in docs/images/: TensorBoard's dashboards on the demo run, and the HTML report.

A docs step, not a test: it runs ``examples/tensorboard_demo.py`` into a temporary folder, starts a
real ``tensorboard`` server on loopback, and has a headless Chromium render each dashboard::

    python docs/screenshots.py                      # needs `chromium` (or --browser PATH)

Images are cropped to the interesting part and palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

# name -> (url suffix, window size, crop box or None)
PAGES = {
    "tb-custom-scalars": ("/#custom_scalars", (1400, 1900), None),
    "tb-scalars": ("/#scalars&tagFilter=gradscope%2Fl2_norm%2F", (1400, 1000), None),
    "tb-histograms": ("/#histograms&tagFilter=gradscope%2Fgrad_hist%2F", (1400, 1000), None),
    "tb-images": ("/#images", (1400, 1000), (0, 0, 1400, 620)),
    "tb-text": ("/#text", (1400, 1000), None),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shoot(browser: str, url: str, size: tuple[int, int], out: Path, wait_ms: int) -> None:
    profile = tempfile.mkdtemp(prefix="gradscope-shot-")
    try:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={wait_ms}",
                f"--window-size={size[0]},{size[1]}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            timeout=180,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _shrink(path: Path, crop: tuple[int, int, int, int] | None, max_kb: int = 290) -> None:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if crop is not None:
        img = img.crop(crop)
    for colors, scale in ((256, 1.0), (128, 1.0), (128, 0.85), (64, 0.75)):
        im = img if scale == 1.0 else img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
        im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= max_kb * 1024:
            return
    raise SystemExit(f"{path} is still over {max_kb} KB")


def main(argv: list[str] | None = None) -> int:
    """Write every screenshot; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--browser", default=shutil.which("chromium") or shutil.which("google-chrome") or "chromium")
    ap.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page gets to load its data")
    args = ap.parse_args(argv)

    import tensorboard_demo

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gradscope-docs-"))
    # relative paths, so that no folder of this machine shows in the pictures
    os.chdir(work)
    run_dir = Path("runs") / "demo"
    tensorboard_demo.main(["--log-dir", str(run_dir)])
    port = _free_port()
    log = (work / "tensorboard.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            "runs",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--samples_per_plugin",
            "images=100,text=100",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as r:
                    if r.read().strip() not in (b"", b"[]"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"tensorboard did not start: see {work / 'tensorboard.log'}")
            time.sleep(0.5)
        for name, (suffix, size, crop) in PAGES.items():
            out = OUT / f"{name}.png"
            _shoot(args.browser, base + suffix, size, out, args.wait_ms)
            _shrink(out, crop)
            print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KB)")
        out = OUT / "html-report.png"
        _shoot(args.browser, (work / run_dir / "gradscope-report.html").as_uri(), (1300, 2200), out, 3000)
        _shrink(out, None)
        print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KB)")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
