"""Findings as markdown at the step they fire, the final verdict, figures and the JSON records."""

from __future__ import annotations

import json
import struct

import pytest
from sinkhelp import FiresAtStep, load_events, small_mlp, tensor_text, train

from gradscope.errors import ConfigurationError
from gradscope.sinks import tags as T
from gradscope.sinks.tensorboard import TensorBoardSink


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return width, height


def test_findings_text_when_visible_and_verdict_at_close(tmp_path):
    rules = [
        FiresAtStep(at=5, layer="2"),
    ]
    run = train(small_mlp(), 12, log_dir=tmp_path, flush_every=4, rules=rules)
    assert [(f.kind, f.step, f.layer) for f in run.report.findings] == [("exploding_gradients", 5, "2")]
    acc = load_events(tmp_path)
    findings = tensor_text(acc, T.FINDINGS_TAG)
    # written at the step it became visible (the flush of steps 5-8): TensorBoard's default loader
    # keeps a tag's events only while their steps increase; the first step is in the text
    assert [s for s, _ in findings] == [8]
    text = findings[0][1]
    assert "**error: exploding_gradients** in `2` at step 5" in text
    assert text.endswith("*Try:* Nothing; this is a test.\n\n*First seen at step 5, reported at step 8.*")
    assert "Layer '2' is flagged by the test rule at step 5." in text
    assert "*Try:* Nothing; this is a test." in text
    [(step, verdict)] = tensor_text(acc, T.VERDICT_TAG)
    assert step == 12
    assert verdict.startswith("## gradscope: UNHEALTHY")
    assert "| 5 | error | exploding_gradients | `2` |" in verdict
    assert str(run.report) in verdict
    # the text dashboard's plugin, so TensorBoard shows them
    assert acc.summary_metadata[T.FINDINGS_TAG].plugin_data.plugin_name == "text"


def test_machine_readable_records(tmp_path):
    run = train(
        small_mlp(), 9, log_dir=tmp_path, flush_every=4, rules=[FiresAtStep(at=3, layer=None, severity="warning")]
    )
    acc = load_events(tmp_path)
    [(_, meta)] = tensor_text(acc, T.META_JSON_TAG)
    meta = json.loads(meta)
    assert meta["schema"] == "gradscope.run"
    assert meta["layers_by_depth"] == ["0", "2", "4"]
    assert meta["activation_modules"] == ["1", "3"]
    batches = tensor_text(acc, T.FINDINGS_JSON_TAG)
    # first reported at the flush of steps 1-4: recorded at that flush's last step
    assert [(s, [f["kind"] for f in json.loads(b)]) for s, b in batches] == [(4, ["exploding_gradients"])]
    [(step, final)] = tensor_text(acc, T.REPORT_JSON_TAG)
    final = json.loads(final)
    assert step == 9
    assert final["schema"] == "gradscope.report" and final["ok"] is True
    assert final["findings"] == [f.to_dict() for f in run.report.findings]
    assert final["meta"]["steps"] == 9
    # gradscope's own plugin: TensorBoard lists it under no dashboard
    assert acc.summary_metadata[T.REPORT_JSON_TAG].plugin_data.plugin_name == "gradscope"


def test_gradient_flow_figure_at_intervals_and_at_close(tmp_path):
    sink = TensorBoardSink(tmp_path, figure_every=10, figure_budget=None)  # every due figure
    train(small_mlp(), 23, sinks=[sink], flush_every=5)
    acc = load_events(tmp_path)
    flows = acc.Images(T.FIGURE_TAG)
    # first flush after steps 10 and 20 (flushes at 5, 10, 15, 20), then close at 23
    assert [e.step for e in flows] == [10, 20, 23]
    for e in flows:
        assert _png_size(e.encoded_image_string) == (e.width, e.height)
    assert [e.step for e in acc.Images(T.HEATMAP_TAG)] == [23]


def test_a_regular_figure_is_skipped_while_the_last_one_took_more_than_its_share_of_the_run(tmp_path):
    # steps of a few milliseconds, figures of a few hundred: at 2 % of the run's time, the figure due after
    # step 20 comes too soon after the one drawn after step 10 (the first is always drawn), step 30's too
    # drawn from 0 to 0.3 s; due at 0.35 s (skipped); due at 20 s, drawn from 20.1 to 20.4; at close from 30
    clock = iter([0.0, 0.3, 0.35, 20.0, 20.1, 20.4, 30.0, 30.3])
    sink = TensorBoardSink(tmp_path, figure_every=10)
    assert sink.figure_budget == 0.02
    sink.clock = lambda: next(clock)
    train(small_mlp(), 33, sinks=[sink], flush_every=5)
    steps = [e.step for e in load_events(tmp_path).Images(T.FIGURE_TAG)]
    # drawn after step 10 (the first), skipped at 20 (0.3 s of drawing against 0.05 s since: 600 %),
    # drawn at 30 (0.3 s against 19.7 s: 1.5 %), and at close (always)
    assert steps == [10, 30, 33]
    with pytest.raises(ConfigurationError, match="figure_budget"):
        TensorBoardSink(tmp_path, figure_budget=0)


def test_figures_only_at_close_when_figure_every_is_none(tmp_path):
    train(small_mlp(), 12, log_dir=tmp_path, flush_every=5, figure_every=None)
    acc = load_events(tmp_path)
    assert [e.step for e in acc.Images(T.FIGURE_TAG)] == [12]
