"""Seeded fuzzing of what the commands read: JSON reports, TensorBoard event files and baseline profiles.

Every mutated input goes to ``gradscope report`` or ``gradscope check --baseline`` (in-process through
``gradscope.cli.main`` for speed, plus a few real subprocesses), and every run must exit 0, 1 or 2 with
no traceback and no raw control character on the terminal. The mutations: byte flips, truncation,
wrong types, deep nesting, huge numbers, NaN strings, control characters; for event files also
truncated records, bad CRCs, random bytes, and records with valid CRCs carrying wrong plugin data.
"""

from __future__ import annotations

import copy
import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.cli import main
from gradscope.sinks import tags as T

REPO = Path(__file__).resolve().parents[2]
SEED = 20261203

FACTORY = """
import torch
import torch.nn as nn
import torch.nn.functional as F


def make():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, (torch.randn(8, 4), torch.randint(0, 3, (8,))), F.cross_entropy
"""

# Values a crafted file may put anywhere.
HOSTILE: list[Any] = [
    None,
    True,
    -1,
    0,
    2**70,
    10**400,
    1e308,
    -1e308,
    "NaN",
    "inf",
    "-Infinity",
    "",
    "x" * 10_000,
    "\x1b[2J\x1b[H\x1b[32mHEALTHY\x1b[0m\r",
    "\ud800",
    "\u202eevil",
    [],
    {},
    [1, "a", None],
    {"schema": "gradscope.report"},
]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- the mutations -----------------------------------------------------------------------------------------


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):  # the first few items of long lists are enough
            yield from _paths(v, (*prefix, i))


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _dumps(doc: Any) -> str:
    # allow_nan: the Python encoder writes NaN / Infinity, as a hand-edited file might hold them
    return json.dumps(doc, allow_nan=True)


def mutate_json(text: str, rng: random.Random) -> bytes:
    """One mutation of a JSON document, chosen by ``rng``."""
    kind = rng.choice(["flip", "truncate", "value", "value", "value", "nan_strings", "nest", "drop_key"])
    raw = text.encode("utf-8")
    if kind == "flip":
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))]
    doc = json.loads(text)
    paths = list(_paths(doc))
    if kind == "value":
        for _ in range(rng.randint(1, 3)):
            doc = _set(doc, rng.choice(paths), copy.deepcopy(rng.choice(HOSTILE)))
            paths = list(_paths(doc))
        return _dumps(doc).encode("utf-8", "surrogatepass")
    if kind == "nan_strings":
        number_paths = [p for p in paths if p and isinstance(_get(doc, p), (int, float))]
        for p in rng.sample(number_paths, min(len(number_paths), 5)):
            doc = _set(doc, p, rng.choice(["NaN", "nan", "Infinity", float("nan"), float("inf")]))
        return _dumps(doc).encode("utf-8")
    if kind == "nest":
        path = rng.choice(paths)
        inner = _dumps(_set(copy.deepcopy(doc), path, "@@HERE@@"))
        return inner.replace('"@@HERE@@"', deep(rng.choice([50, 5_000, 200_000]))).encode("utf-8")
    container = [p for p in paths if p and isinstance(_get(doc, p[:-1]), dict)]
    if container:
        p = rng.choice(container)
        del _get(doc, p[:-1])[p[-1]]
    return _dumps(doc).encode("utf-8")


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


# TensorBoard's record framing: length, masked CRC of the length, data, masked CRC of the data.
def _masked_crc(data: bytes) -> int:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    return masked_crc32c(data)


def frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def split_records(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i : i + 8])
        out.append(raw[i : i + 12 + n + 4])
        i += 12 + n + 4
    return out


def _text_event(tag: str, payload: bytes, step: int) -> bytes:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    value = Summary.Value(tag=tag)
    value.metadata.plugin_data.plugin_name = T.PLUGIN_NAME
    value.tensor.dtype = 7  # DT_STRING
    value.tensor.string_val.append(payload)
    return frame(Event(step=step, wall_time=1.0, summary=Summary(value=[value])).SerializeToString())


def _scalar_event(tag: str, step: int, rng: random.Random) -> bytes:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    value = Summary.Value(tag=tag)
    value.metadata.plugin_data.plugin_name = rng.choice(["scalars", "histograms", "text", ""])
    if rng.random() < 0.5:
        value.tensor.dtype = rng.choice([1, 2, 7, 9])  # float, double, string, int64
        value.tensor.tensor_shape.dim.add(size=rng.choice([0, 3]))
        value.tensor.float_val.extend([1.0, float("nan")])
    else:
        value.simple_value = rng.choice([float("nan"), float("inf"), -1e38, 0.5])
    return frame(Event(step=step, wall_time=1.0, summary=Summary(value=[value])).SerializeToString())


def mutate_events(raw: bytes, report_json: str, rng: random.Random) -> bytes:
    """One mutation of an event file, chosen by ``rng``."""
    records = split_records(raw)
    kind = rng.choice(["truncate", "bad_crc", "random", "garbage_record", "plugin", "plugin", "plugin", "scalar"])
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))]
    if kind == "bad_crc":
        i = rng.randrange(len(records))
        rec = bytearray(records[i])
        rec[rng.randrange(len(rec))] ^= 1 << rng.randrange(8)
        return b"".join(records[:i]) + bytes(rec) + b"".join(records[i + 1 :])
    if kind == "random":
        return rng.randbytes(rng.choice([0, 7, 16, 5000]))
    if kind == "garbage_record":
        return raw + frame(rng.randbytes(rng.randint(1, 200)))
    step = rng.choice([0, 3, -5, 2**62])
    if kind == "scalar":
        tag = rng.choice(["gradscope/l2_norm/0", "gradscope/scalar/loss", "gradscope/\x1b[2J/0", "gradscope/rms"])
        return raw + _scalar_event(tag, step, rng)
    tag = rng.choice([T.REPORT_JSON_TAG, T.FINDINGS_JSON_TAG, T.META_JSON_TAG])
    payload = rng.choice(
        [
            mutate_json(report_json, rng),
            b"{not json",
            b"\xff\xfe",
            b"",
            deep(100_000).encode(),
            json.dumps(rng.choice(HOSTILE)).encode("utf-8", "surrogatepass"),
        ]
    )
    return raw + _text_event(tag, payload, step)


# -- the inputs --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory):
    """A real run (event files + JSON report with findings) and a real baseline profile."""
    d = tmp_path_factory.mktemp("fuzz-seeds")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    with gradscope.watch(model, optimizer=opt, log_dir=d / "run", flush_every=3) as scope:
        for step in range(6):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            if step == 4:
                model[2].weight.grad[0, 0] = float("nan")  # a finding to carry through
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    report = scope.report()
    assert report.findings
    report.to_json(d / "report.json")
    (d / "f.py").write_text(FACTORY)
    assert main(["snapshot", str(d / "f.py") + ":make", "-o", str(d / "profile.json"), "--seeds", "2"]) == 0
    return d


def _events(run: Path) -> Path:
    (path,) = [p for p in run.iterdir() if "tfevents" in p.name]
    return path


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except BaseException as exc:  # the point of the test: nothing escapes main
        out, err = capsys.readouterr()
        raise AssertionError(f"{argv} raised {type(exc).__name__}: {exc}\n{err[-2000:]}") from exc
    out, err = capsys.readouterr()
    return code, out, err


def assert_sane(code: int, out: str, err: str, what: str) -> None:
    assert code in (0, 1, 2), (what, code, err[-1000:])
    assert "Traceback" not in out + err, (what, err[-2000:])
    raw = [c for c in out + err if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F]
    assert not raw, (what, raw[:5])
    if code == 2:
        assert "error: " in err, (what, err[-500:])


# -- the tests ---------------------------------------------------------------------------------------------


def test_fuzz_json_reports(seeds_dir, tmp_path, capsys):
    rng = random.Random(SEED)
    text = (seeds_dir / "report.json").read_text()
    assert run_main(capsys, ["report", str(seeds_dir / "report.json"), "--no-html"])[0] == 1  # the seed reads
    codes = []
    for i in range(60):
        path = tmp_path / f"r{i}.json"
        path.write_bytes(mutate_json(text, rng))
        argv = ["report", str(path)] + (["-o", str(tmp_path / f"r{i}.html")] if i % 20 == 0 else ["--no-html"])
        code, out, err = run_main(capsys, argv)
        assert_sane(code, out, err, f"report mutation {i}")
        codes.append(code)
    assert codes.count(2) >= 10 and codes.count(1) + codes.count(0) >= 5, codes  # both outcomes are exercised


def test_fuzz_event_files(seeds_dir, tmp_path, capsys):
    rng = random.Random(SEED + 1)
    source = _events(seeds_dir / "run")
    raw = source.read_bytes()
    report_json = (seeds_dir / "report.json").read_text()
    assert run_main(capsys, ["report", str(seeds_dir / "run"), "--no-html"])[0] == 1
    codes = []
    for i in range(40):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / source.name).write_bytes(mutate_events(raw, report_json, rng))
        argv = ["report", str(run)] + (["--json", str(run / "out.json")] if i % 10 == 0 else ["--no-html"])
        code, out, err = run_main(capsys, argv)
        assert_sane(code, out, err, f"event mutation {i}")
        codes.append(code)
    assert codes.count(2) >= 5 and codes.count(1) + codes.count(0) >= 5, codes


def test_fuzz_baselines(seeds_dir, tmp_path, capsys, monkeypatch):
    rng = random.Random(SEED + 2)
    monkeypatch.chdir(seeds_dir)
    text = (seeds_dir / "profile.json").read_text()
    base = ["check", "f.py:make", "--rules", "none", "--steps", "1", "-q", "--baseline"]
    code, out, err = run_main(capsys, [*base, "profile.json"])
    assert code == 0, err
    codes = []
    for i in range(40):
        path = tmp_path / f"p{i}.json"
        path.write_bytes(mutate_json(text, rng))
        extra = ["--junit", str(tmp_path / f"p{i}.xml")] if i % 10 == 0 else []
        code, out, err = run_main(capsys, [*base, str(path), *extra])
        assert_sane(code, out, err, f"baseline mutation {i}")
        codes.append(code)
        if extra:
            import xml.etree.ElementTree as ET

            ET.parse(tmp_path / f"p{i}.xml")  # the JUnit file stays well-formed whatever the baseline held
    assert codes.count(2) >= 10 and codes.count(0) + codes.count(1) >= 3, codes


@pytest.mark.parametrize("which", ["report-json", "report-events", "check-baseline"])
def test_fuzz_in_real_processes(seeds_dir, tmp_path, which):
    if which == "report-json":
        target = tmp_path / "r.json"
        target.write_text('{"schema": "gradscope.report", "version": 1, "findings": ' + deep(100_000) + "}")
        argv = ["report", str(target), "--no-html"]
    elif which == "report-events":
        source = _events(seeds_dir / "run")
        run = tmp_path / "run"
        run.mkdir()
        payload = b'{"findings": [{"kind": "\\u001b[2Jx", "severity": "fatal"}]}'
        (run / source.name).write_bytes(source.read_bytes() + _text_event(T.REPORT_JSON_TAG, payload, 7))
        argv = ["report", str(run), "--no-html"]
    else:
        # the deeply nested baseline: the JSON parser's own recursion limit
        target = tmp_path / "p.json"
        target.write_text('{"schema": "gradscope.profile", "version": 1, "layers": ' + deep(100_000) + "}")
        argv = ["check", "f.py:make", "--rules", "none", "--steps", "1", "-q", "--baseline", str(target)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("GRADSCOPE_TRACEBACK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gradscope", *argv],
        cwd=seeds_dir,
        env=env,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_sane(proc.returncode, proc.stdout, proc.stderr, which)
