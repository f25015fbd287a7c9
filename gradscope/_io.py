"""Small file and terminal helpers.

* :func:`atomic_write_text`: a temporary file in the same folder and an atomic rename, so a killed
  process never leaves a half-written report. The file gets the mode ``open(path, "w")`` would give
  it: an existing file keeps its mode, a new one gets ``0o666`` minus the process umask.
* :func:`escape_controls` / :func:`echo`: text from untrusted input (a JSON report, an event file, a
  module name) is printed with its control characters made visible, so an ANSI escape sequence in a
  crafted report cannot clear the terminal, move the cursor or fake a verdict.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Union

__all__ = ["atomic_write_text", "echo", "escape_controls", "one_line"]

PathLike = Union[str, "os.PathLike[str]"]

# C0 controls except tab and newline, DEL, C1 controls, lone surrogates (unencodable), the bidirectional
# overrides and isolates (they reorder what a reader sees), and the two XML non-characters.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069\ufffe\uffff]")
_umask_lock = threading.Lock()


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    r"""``text`` with every control character written out as ``\xNN`` or ``\uNNNN``.

    Tab and newline are kept. Escaped: the other C0 controls (ESC, carriage return, backspace, bell),
    DEL, the C1 controls, lone surrogates, Unicode's bidirectional overrides and isolates, and
    U+FFFE/U+FFFF. The result is safe on a terminal, valid in XML 1.0 and encodable as UTF-8.
    """
    return _CONTROLS.sub(_escape_one, str(text))


def one_line(text: str) -> str:
    """``text`` escaped (:func:`escape_controls`) with its line breaks and tabs turned into spaces."""
    return " ".join(escape_controls(text).split())


def echo(text: str = "", *, err: bool = False) -> None:
    """Print ``text`` with its control characters escaped, to stdout (or stderr with ``err=True``)."""
    stream = sys.stderr if err else sys.stdout
    print(escape_controls(text), file=stream, flush=True)


def _umask() -> int:
    # os.umask can only be read by setting it; the lock keeps two writers in this process from racing
    # (another thread that creates files in between would still see umask 0 for an instant, hence
    # /proc first where it exists).
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename.

    The file ends with the mode ``open(path, "w")`` would give it (mkstemp alone would leave 0600):
    an existing file keeps its mode, a new one gets ``0o666`` minus the umask. Characters UTF-8 cannot
    encode (lone surrogates from a crafted JSON string) are written as backslash escapes instead of
    failing the write.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target
