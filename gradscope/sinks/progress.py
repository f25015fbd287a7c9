"""A small progress bar on stderr for long reads (large TensorBoard log dirs); no dependency.

Shown only when the stream is a terminal, unless forced on or off. Redrawn at most ten times a
second, so a loop of millions of updates costs almost nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from gradscope._io import one_line

__all__ = ["Progress"]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


class Progress:
    """``[#####-----]  45%  12.3 MB / 27.4 MB  reading events``.

    Args:
        total: the amount that makes 100% (bytes here).
        label: what is being done.
        stream: where to draw (stderr by default).
        enabled: True or False to force; None: only when ``stream`` is a terminal.
        width: characters of the bar.
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        width: int = 28,
    ) -> None:
        self.total = max(0, int(total))
        self.label = one_line(label)  # a path from the command line may hold control characters
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty()) if callable(isatty) else False
        self.enabled = enabled
        self.width = width
        self.done = 0
        self._last_draw = 0.0
        self._closed = False

    def update(self, n: int) -> None:
        """Add ``n`` to the amount done; redraw if a tenth of a second has passed."""
        self.done += n
        if self.enabled and time.monotonic() - self._last_draw >= 0.1:
            self._draw()

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        frac = 1.0 if self.total == 0 else min(1.0, self.done / self.total)
        full = round(frac * self.width)
        bar = "#" * full + "-" * (self.width - full)
        self.stream.write(f"\r[{bar}] {frac:4.0%}  {_size(self.done)} / {_size(self.total)}  {self.label}")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
