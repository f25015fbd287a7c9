"""The sink of docs/sinks.md, executed as written: it receives every record and finding of a run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sinkhelp import FiresAtStep, expected_records, small_mlp, train

from gradscope.sinks.registry import SINKS

ROOT = Path(__file__).resolve().parents[2]


def _doc_sink_source() -> str:
    text = (ROOT / "docs" / "sinks.md").read_text()
    section = text[text.index("A complete sink, run as it is by the tests") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]  # reason: the doc has it


def test_the_documented_sink_runs_as_written(tmp_path, monkeypatch):
    source = _doc_sink_source()
    assert len(source.strip().splitlines()) <= 20  # "a few lines"
    namespace: dict = {}
    exec(compile(source, "docs/sinks.md", "exec"), namespace)
    try:
        sink_cls = namespace["JsonLinesSink"]
        assert SINKS.get("jsonl") is sink_cls
        monkeypatch.chdir(tmp_path)
        # by instance, and by the name it registered (built with its defaults: ./gradscope.jsonl)
        run = train(
            small_mlp(),
            9,
            sinks=[sink_cls(str(tmp_path / "mine.jsonl")), "jsonl"],
            flush_every=4,
            rules=[FiresAtStep(at=3, layer="2")],
        )
    finally:
        SINKS.unregister("jsonl")
    for path in (tmp_path / "mine.jsonl", tmp_path / "gradscope.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        got = {(d["step"], k): v for d in lines if "step" in d for k, v in d.items() if k != "step"}
        assert got == expected_records(run.report)
        assert [d["finding"] for d in lines if "finding" in d] == [f.to_dict() for f in run.report.findings]
