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


def _timed_sink(tmp_path, step_seconds: float, draw_seconds: float) -> TensorBoardSink:
    """A sink whose clock advances ``step_seconds`` per recorded step and ``draw_seconds`` per figure drawn."""
    now = [0.0]
    sink = TensorBoardSink(tmp_path, figure_every=10)
    sink.clock = lambda: now[0]
    on_step, add_figure = sink.on_step, sink._add_figure

    def step(*args):
        now[0] += step_seconds
        return on_step(*args)

    def draw(*args):
        now[0] += draw_seconds
        return add_figure(*args)

    sink.on_step, sink._add_figure = step, draw
    return sink


def test_a_regular_figure_is_skipped_while_the_last_one_took_more_than_its_share_of_the_run(tmp_path):
    from gradscope.sinks.tensorboard import FIRST_FIGURE_SECONDS

    # 1 s steps, figures of 0.3 s, 2 % of the run's time. The first figure is taken to cost
    # FIRST_FIGURE_SECONDS (0.5 s): due after step 10 and 20 (10 s, 20 s of training: 0.2 s, 0.4 s of
    # budget), drawn after step 30 (0.6 s). Then 0.3 s of drawing: due after step 40 with 9.7 s since
    # (0.19 s of budget: skipped), drawn after step 50 (19.7 s since: 0.39 s). close() always draws.
    assert FIRST_FIGURE_SECONDS == 0.5
    sink = _timed_sink(tmp_path, 1.0, 0.3)
    assert sink.figure_budget == 0.02
    train(small_mlp(), 53, sinks=[sink], flush_every=5)
    steps = [e.step for e in load_events(tmp_path).Images(T.FIGURE_TAG)]
    assert steps == [30, 50, 53]
    # a slow step (10 s): the first regular figure is within the budget at once
    slow = _timed_sink(tmp_path / "slow", 10.0, 0.3)
    train(small_mlp(), 23, sinks=[slow], flush_every=5)
    assert [e.step for e in load_events(tmp_path / "slow").Images(T.FIGURE_TAG)] == [10, 20, 23]
    with pytest.raises(ConfigurationError, match="figure_budget"):
        TensorBoardSink(tmp_path, figure_budget=0)


def test_figures_only_at_close_when_figure_every_is_none(tmp_path):
    train(small_mlp(), 12, log_dir=tmp_path, flush_every=5, figure_every=None)
    acc = load_events(tmp_path)
    assert [e.step for e in acc.Images(T.FIGURE_TAG)] == [12]
