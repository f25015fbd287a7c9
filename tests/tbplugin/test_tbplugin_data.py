"""The tab's data module on hand-made inputs: findings logs old and new, heat-map binning, flow lookup."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradscope.tbplugin.data import Series, depth_order, flow_at, heatmap, merge_findings


def _f(kind: str, layer: str | None, step: int, **extra) -> dict:
    return {
        "kind": kind,
        "severity": "warning",
        "step": step,
        "layer": layer,
        "message": "m",
        "suggestion": "s",
        "evidence": {},
        **extra,
    }


def test_old_form_each_flush_lists_its_new_findings():
    log = [(10, [_f("a", "x", 3)]), (20, [_f("b", None, 15)])]
    findings, closed = merge_findings(log)
    assert [(f["kind"], f["layer"], f["status"], f["seen_step"]) for f in findings] == [
        ("a", "x", "active", 10),
        ("b", None, "active", 20),
    ]
    assert closed is False


def test_new_form_latest_record_per_finding_wins():
    log = [
        (10, [_f("a", "x", 3, provisional=True)]),
        (20, [_f("a", "x", 3), _f("b", "y", 18, provisional=True)]),
        (30, {"findings": [_f("a", "x", 3, last_step=24, resolved_step=25)]}),  # an object holding the list
    ]
    findings, _ = merge_findings(log)
    status = {f["kind"]: (f["status"], f["seen_step"], f.get("resolved_step")) for f in findings}
    assert status == {"a": ("resolved", 10, 25), "b": ("provisional", 20, None)}
    assert [f["kind"] for f in findings] == ["a", "b"]  # order of first appearance


def test_final_record_is_the_list_and_unreadable_entries_are_skipped():
    log = [(10, [_f("a", "x", 3)]), (20, [{"kind": "broken"}])]
    final = [(40, {"findings": [_f("a", "x", 3), _f("c", "z", 33, severity="error")]})]
    findings, closed = merge_findings(log, final)
    assert closed is True and [f["kind"] for f in findings] == ["a", "c"]
    assert findings[0]["seen_step"] == 10 and findings[1]["seen_step"] == 33


def test_heatmap_bins_equal_counts_of_steps_mean_of_log10():
    steps = np.arange(1, 11, dtype=np.int64)
    a = 10.0 ** np.arange(10.0)  # log10: 0..9
    b = np.array([1.0, 0.0, np.nan, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8])  # zero and NaN left out
    hm = heatmap(["a", "b", "c"], {"a": Series(steps, a), "b": Series(steps, b)}, columns=4)
    # 10 steps into 4 columns of 3, 2, 3, 2 steps (i * 4 // 10)
    assert hm["step_lo"] == [1, 4, 6, 9] and hm["step_hi"] == [3, 5, 8, 10] and hm["binned"]
    assert hm["values"][0] == pytest.approx([1.0, 3.5, 6.0, 8.5])
    assert hm["values"][1] == pytest.approx([0.0, 2.5, 5.0, 7.5])  # (0), (2+3)/2, (4+5+6)/3, (7+8)/2
    assert hm["values"][2] == [None] * 4  # a layer without the statistic
    assert hm["vmin"] == 0.0 and hm["vmax"] == 8.5


def test_heatmap_with_layers_sampled_at_different_steps_and_a_zoom():
    s1 = Series(np.array([1, 2, 3, 4]), np.array([10.0, 100.0, 1000.0, 1e4]))
    s2 = Series(np.array([2, 4, 6]), np.array([1.0, 1.0, 1.0]))
    hm = heatmap(["p", "q"], {"p": s1, "q": s2}, lo=2, hi=5)
    assert hm["steps"] == [2, 3, 4] and not hm["binned"]
    assert hm["values"] == [[2.0, 3.0, 4.0], [0.0, None, 0.0]]


def test_flow_takes_each_layers_last_value_at_or_before_the_step():
    typ = {
        "a": Series(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0])),
        "b": Series(np.array([2, 3]), np.array([5.0, 6.0])),
    }
    peak = {"a": Series(np.array([1, 11]), np.array([7.0, 8.0]))}
    out = flow_at(["a", "b"], typ, peak, step=1)
    assert out["typical"] == [1.0, None] and out["peak"] == [7.0, None]
    out = flow_at(["a", "b"], typ, peak, step=None)  # default: the last step with max |g|
    assert out["step"] == 11 and out["typical"] == [3.0, 6.0] and out["typical_steps"] == [3, 3]
    assert out["peak"] == [8.0, None] and out["peak_steps"] == [11, None]


def test_depth_order_uses_the_recorded_order_then_natural_order():
    assert depth_order({"10", "2", "enc", "1"}, ["enc"]) == ["enc", "1", "2", "10"]
    assert depth_order({"blocks.10.fc", "blocks.2.fc"}, None) == ["blocks.2.fc", "blocks.10.fc"]


def test_local_records_read_old_runs_incrementally(tmp_path):
    """Records without a data class (older sinks) are read from the event files, only what was appended."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from gradscope.sinks import tags as T
    from gradscope.sinks.protos import json_summary, scalars_summary
    from gradscope.tbplugin.data import LocalRecords

    writer = EventFileWriter(str(tmp_path))
    writer.add_event(Event(step=1, summary=json_summary(T.META_JSON_TAG, T.PLUGIN_NAME, '{"layers_by_depth": ["a"]}')))
    writer.add_event(Event(step=2, summary=scalars_summary([("gradscope/l2_norm/a", 1.0)])))
    writer.add_event(
        Event(step=10, summary=json_summary(T.FINDINGS_JSON_TAG, T.PLUGIN_NAME, json.dumps([_f("k", "a", 3)])))
    )
    writer.flush()
    local = LocalRecords()
    first = local.read(str(tmp_path))
    assert first[T.META_JSON_TAG] == [(1, {"layers_by_depth": ["a"]})]
    assert first[T.FINDINGS_JSON_TAG] == [(10, [_f("k", "a", 3)])]
    writer.add_event(
        Event(step=20, summary=json_summary(T.FINDINGS_JSON_TAG, T.PLUGIN_NAME, json.dumps([_f("j", "a", 15)])))
    )
    writer.flush()
    again = local.read(str(tmp_path))
    assert [step for step, _ in again[T.FINDINGS_JSON_TAG]] == [10, 20]  # each record once
    writer.close()
    assert local.read(str(tmp_path / "missing")) == {}
