"""End to end: TensorBoard (default flags) serves the gradscope tab; its routes equal the run's Report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from tbhelp import RUN, STEPS, get, start_tensorboard

from gradscope.sinks import tags as T
from gradscope.sinks.reader import read_run
from gradscope.tbplugin.data import FINDINGS_STATE_TAG
from gradscope.views.tables import layer_matrix, layer_order

LIVE = "live"
LONG = "long"


def _event_writer(run_dir: Path):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    run_dir.mkdir(parents=True)
    return EventFileWriter(str(run_dir))


def _add(writer, step: int, summary) -> None:
    from tensorboard.compat.proto.event_pb2 import Event

    writer.add_event(Event(step=step, wall_time=1_700_000_000.0 + step, summary=summary))


def _record(tag: str, payload) -> object:
    """A gradscope JSON record as the sink writes it from now on: plugin ``gradscope``, data class tensor."""
    from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=T.PLUGIN_NAME),
        data_class=DATA_CLASS_TENSOR,
    )
    tensor = TensorProto(dtype="DT_STRING", string_val=[json.dumps(payload).encode()], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=tag, tensor=tensor, metadata=meta)])


def _finding(kind: str, layer: str, step: int, **status) -> dict:
    return {
        "kind": kind,
        "severity": "error" if kind == "exploding_gradients" else "warning",
        "step": step,
        "layer": layer,
        "message": f"{kind} in {layer}",
        "suggestion": "try something",
        "evidence": {"value": 1.5},
        **status,
    }


def write_live_run(run_dir: Path) -> None:
    """A run still training, in the new form: findings at increasing steps, status updates as new records."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    w = _event_writer(run_dir)
    layers = ["enc", "mid", "dec"]
    _add(w, 1, _record(T.META_JSON_TAG, {"schema": "gradscope.run", "layers_by_depth": layers, "model": "Toy"}))
    for step in range(1, 31):
        values = [
            Summary.Value(tag=T.stat_tag("l2_norm", layer), simple_value=10.0 ** (i - 3))
            for i, layer in enumerate(layers)
        ]
        values.append(Summary.Value(tag=T.scalar_tag("loss"), simple_value=1.0 / step))
        _add(w, step, Summary(value=values))
    _add(w, 10, _record(T.FINDINGS_JSON_TAG, [_finding("vanishing_gradients", "enc", 3, provisional=True)]))
    _add(
        w,
        20,
        _record(
            T.FINDINGS_JSON_TAG, [_finding("vanishing_gradients", "enc", 3), _finding("exploding_gradients", "dec", 18)]
        ),
    )
    _add(
        w, 30, _record(T.FINDINGS_JSON_TAG, [_finding("vanishing_gradients", "enc", 3, last_step=24, resolved_step=25)])
    )
    w.close()


def write_long_run(run_dir: Path, n: int = 150) -> None:
    """More ``_findings`` records than TensorBoard keeps of a tag (100), then a snapshot of them all."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    w = _event_writer(run_dir)
    everything = []
    for step in range(1, n + 1):
        _add(w, step, Summary(value=[Summary.Value(tag=T.stat_tag("l2_norm", "fc"), simple_value=1.0)]))
        everything.append(_finding(f"rule_{step}", "fc", step))
        _add(w, step, _record(T.FINDINGS_JSON_TAG, [everything[-1]]))
    _add(w, n, _record(FINDINGS_STATE_TAG, {"findings": everything}))
    w.close()


@pytest.fixture(scope="module")
def served(vanish_logdir, tmp_path_factory):
    src, _ = vanish_logdir
    logdir = tmp_path_factory.mktemp("routes") / "logs"
    shutil.copytree(src / RUN, logdir / RUN)
    write_live_run(logdir / LIVE)
    write_long_run(logdir / LONG)
    server = start_tensorboard(logdir, logdir.parent / "tb.log", ready_run=RUN, ready_step=STEPS)
    try:
        yield server.base, read_run(logdir / RUN)
    finally:
        server.stop()


def _grad_layers(report) -> list[str]:
    stats = report.stats
    grad = stats[(stats["param"] == "*") & (stats["layer"] != "*") & ~stats["stat"].str.startswith("act_")]
    present = set(grad["layer"])
    return [layer for layer in layer_order(stats, report.meta.get("layers_by_depth")) if layer in present]


def _value(report, stat: str, layer: str, step: int) -> float | None:
    s = report.stats
    hit = s[(s["stat"] == stat) & (s["layer"] == layer) & (s["param"] == "*") & (s["step"] == step)]["value"]
    return float(hit.iloc[0]) if len(hit) else None


def test_plugin_is_listed_and_active(served):
    base, _ = served
    listing = get(base, "/data/plugins_listing")
    assert listing["gradscope"]["enabled"] is True
    assert listing["gradscope"]["loading_mechanism"] == {
        "type": "IFRAME",
        "module_path": "/data/plugin/gradscope/index.js",
    }
    runs = {r["run"]: r for r in get(base, "/data/plugin/gradscope/runs")["runs"]}
    assert sorted(runs) == [LIVE, LONG, RUN]
    assert runs[RUN]["max_step"] == STEPS and runs[RUN]["closed"] is True and runs[RUN]["layers"] == 9


def test_findings_equal_the_report(served):
    base, report = served
    assert report.findings, "the vanishing-gradient MLP must produce a finding"
    run = get(base, "/data/plugin/gradscope/run", run=RUN)
    keys = set(report.findings[0].to_dict())
    assert [{k: f[k] for k in keys} for f in run["findings"]] == [f.to_dict() for f in report.findings]
    assert run["verdict"] == ("healthy" if not report.findings else ("unhealthy" if not report.ok else "warnings"))
    assert run["closed"] is True
    assert run["layers"] == _grad_layers(report)  # input side first: the run's layers_by_depth
    assert run["layers"][0] == "0" and run["layers"][-1] == "16"
    assert run["flagged"] == [f.layer for f in report.findings if f.layer]
    assert run["steps"] == list(range(1, STEPS + 1))
    assert all(f["status"] == "active" for f in run["findings"])


@pytest.mark.parametrize("step", [None, 21, 25])
def test_flow_at_a_step_equals_the_report(served, step):
    base, report = served
    flow = get(base, "/data/plugin/gradscope/flow", run=RUN, step=step)
    layers = _grad_layers(report)
    assert flow["layers"] == layers
    peak_steps = sorted(report.stats[report.stats["stat"] == "abs_max"]["step"].unique())
    want = int(peak_steps[-1]) if step is None else step
    assert flow["step"] == want
    last_peak = max(s for s in peak_steps if s <= want)  # max |g| is taken on sampled steps only
    for i, layer in enumerate(layers):
        assert flow["typical"][i] == _value(report, "rms", layer, want)
        assert flow["peak"][i] == _value(report, "abs_max", layer, last_peak)
        assert flow["peak_steps"][i] == last_peak
    assert flow["typical"][0] < 1e-5 * flow["typical"][-1]  # the input side vanishes


def test_heatmap_equals_the_report(served):
    base, report = served
    layers = _grad_layers(report)
    steps, cols, values = layer_matrix(report.stats, "l2_norm", layers)
    expected = np.log10(values.T)  # [L, S]
    hm = get(base, "/data/plugin/gradscope/heatmap", run=RUN, columns=400)
    assert hm["layers"] == cols == layers
    assert hm["steps"] == [int(s) for s in steps] and not hm["binned"]
    got = np.array([[np.nan if v is None else v for v in row] for row in hm["values"]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=6e-7)  # 6 decimals in the JSON

    # binned: 8 columns of 5 steps, each the mean of log10; zoomed: steps 11-20 only
    hm = get(base, "/data/plugin/gradscope/heatmap", run=RUN, columns=8)
    assert hm["binned"] and hm["step_lo"] == list(range(1, 41, 5)) and hm["step_hi"] == list(range(5, 41, 5))
    ref = expected.reshape(len(layers), 8, 5).mean(axis=2)
    np.testing.assert_allclose(np.array(hm["values"], dtype=float), ref, rtol=0, atol=6e-7)
    hm = get(base, "/data/plugin/gradscope/heatmap", run=RUN, lo=11, hi=20)
    assert hm["steps"] == list(range(11, 21))
    np.testing.assert_allclose(np.array(hm["values"], dtype=float), expected[:, 10:20], rtol=0, atol=6e-7)


def test_layer_curves_and_scalars_equal_the_report(served):
    base, report = served
    layer = report.findings[0].layer
    curves = get(base, "/data/plugin/gradscope/curves", run=RUN, layer=layer)["series"]
    s = report.stats
    for stat in ("l2_norm", "rms", "abs_max", "update_ratio"):
        rows = s[(s["stat"] == stat) & (s["layer"] == layer) & (s["param"] == "*")]
        assert curves[stat]["steps"] == rows["step"].tolist()
        assert curves[stat]["values"] == rows["value"].tolist()
    sc = get(base, "/data/plugin/gradscope/scalars", run=RUN)
    assert sc["scalars"]["loss"]["steps"] == report.scalars.index.tolist()
    assert sc["scalars"]["loss"]["values"] == report.scalars["loss"].tolist()
    model = s[(s["stat"] == "update_ratio") & (s["layer"] == "*")]
    assert sc["model"]["update_ratio"]["values"] == model["value"].tolist()


def test_live_run_latest_record_per_finding_wins(served):
    base, _ = served
    run = get(base, "/data/plugin/gradscope/run", run=LIVE)
    assert run["closed"] is False and run["has_records"] is True
    assert run["layers"] == ["enc", "mid", "dec"]  # _meta's depth order, not the alphabet
    by_kind = {f["kind"]: f for f in run["findings"]}
    assert [f["kind"] for f in run["findings"]] == ["vanishing_gradients", "exploding_gradients"]
    assert by_kind["vanishing_gradients"]["status"] == "resolved"
    assert by_kind["vanishing_gradients"]["resolved_step"] == 25
    assert by_kind["vanishing_gradients"]["seen_step"] == 10
    assert by_kind["exploding_gradients"]["status"] == "active" and by_kind["exploding_gradients"]["seen_step"] == 20
    assert run["verdict"] == "unhealthy"
    flow = get(base, "/data/plugin/gradscope/flow", run=LIVE, step=12)
    assert flow["step"] == 12 and flow["peak"] == [None, None, None]  # no abs_max in this run
    assert flow["typical"] == pytest.approx([1e-3, 1e-2, 1e-1], rel=1e-6)  # float32; rms absent: l2_norm
    hm = get(base, "/data/plugin/gradscope/heatmap", run=LIVE)
    assert [row[0] for row in hm["values"]] == pytest.approx([-3.0, -2.0, -1.0], abs=1e-6)


def test_a_snapshot_keeps_every_finding_of_a_long_log(served):
    base, _ = served
    run = get(base, "/data/plugin/gradscope/run", run=LONG)
    assert [f["kind"] for f in run["findings"]] == [f"rule_{s}" for s in range(1, 151)]


def test_bad_requests_say_what_is_wrong(served):
    import urllib.error

    base, _ = served
    with pytest.raises(urllib.error.HTTPError) as err:
        get(base, "/data/plugin/gradscope/flow")
    assert err.value.code == 400 and b"run" in err.value.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        get(base, "/data/plugin/gradscope/run", run="nope")
    assert err.value.code == 404
    assert math.isfinite(1.0)
