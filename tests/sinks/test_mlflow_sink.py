"""MLflowSink against MLflow itself: a local file store, read back with MlflowClient."""

from __future__ import annotations

import json

import pytest
from sinkhelp import FiresAtStep, expected_records, small_mlp, train

import gradscope

mlflow = pytest.importorskip("mlflow")
from gradscope.sinks.mlflow import MLflowSink, metric_name  # noqa: E402


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A file store of MLflow's own in ``tmp_path``; no server, no network.

    MLflow 3 keeps the file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; the sink
    uses only the client API, the same against any store.
    """
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    mlflow.set_tracking_uri(f"file:{tmp_path / 'mlruns'}")
    yield mlflow.tracking.MlflowClient()
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _history(client, run_id):
    run = client.get_run(run_id)
    return {(m.step, key): m.value for key in run.data.metrics for m in client.get_metric_history(run_id, key)}


def test_metrics_findings_and_verdict_read_back(store, tmp_path):
    with mlflow.start_run() as active:
        run = train(small_mlp(), 9, sinks=["mlflow"], flush_every=4, rules=[FiresAtStep(at=3, layer="2")])
        assert mlflow.active_run().info.run_id == active.info.run_id  # the user's run: gradscope did not end it
    client, run_id = store, active.info.run_id
    got = _history(client, run_id)
    want = expected_records(run.report)
    # every statistic and scalar at its step, as float64 (MLflow stores doubles)
    assert {k: v for k, v in got.items() if not k[1].startswith("gradscope/findings/")} == want
    # the finding surfaced at the flush of steps 1-4: counted there
    assert {k: v for k, v in got.items() if k[1].startswith("gradscope/findings/")} == {
        (4, "gradscope/findings/count"): 1.0,
        (4, "gradscope/findings/errors"): 1.0,
        (4, "gradscope/findings/warnings"): 0.0,
    }
    tags = client.get_run(run_id).data.tags
    assert (tags["gradscope.verdict"], tags["gradscope.findings"], tags["gradscope.errors"]) == ("unhealthy", "1", "1")
    folder = client.download_artifacts(run_id, "gradscope", str(tmp_path / "artifacts"))
    saved = json.loads((tmp_path / "artifacts" / "gradscope" / "findings.json").read_text())
    assert [gradscope.Finding.from_dict(d) for d in saved] == run.report.findings
    assert "| 3 | error | exploding_gradients | `2` |" in (tmp_path / "artifacts/gradscope/findings.md").read_text()
    report = gradscope.Report.from_json((tmp_path / "artifacts/gradscope/report.json").read_text())
    assert report.findings == run.report.findings and report.steps == 9
    assert folder.endswith("gradscope")


def test_a_run_of_its_own_when_none_is_active_and_batches_of_1000(store):
    sink = MLflowSink(stats=["l2_norm"], per_param=True, findings=False)
    # 100 steps x (3 layers + model + 6 parameters + 2 scalars) = 1200 values in one flush: two log_batch calls
    run = train(small_mlp(), 100, sinks=[sink], flush_every=100)
    assert mlflow.active_run() is None  # started by the sink, ended at close
    finished = store.get_run(sink.run_id)
    assert finished.info.status == "FINISHED"
    got = _history(store, sink.run_id)
    want = {
        (step, metric_name(tag)): v
        for (step, tag), v in expected_records(run.report, per_param=True).items()
        if tag.split("/")[1] in ("l2_norm", "scalar")
    }
    assert (1, "gradscope/l2_norm/0.weight") in want  # a parameter's metric: layer.param
    assert got == want and len(got) == 100 * 12
    assert "gradscope.verdict" not in finished.data.tags  # findings=False: no findings output at all


def test_metric_names_mlflow_refuses_are_mended():
    assert metric_name("gradscope/l2_norm/wte+head") == "gradscope/l2_norm/wte_head"
    assert metric_name("gradscope/rms/wte+head/weight") == "gradscope/rms/wte_head.weight"
    assert metric_name("gradscope/scalar/lr (group 0):x") == "gradscope/scalar/lr _group 0_:x"
    from mlflow.utils.validation import _validate_metric_name

    _validate_metric_name(metric_name("gradscope/l2_norm/a+b[0]"))  # raises for an invalid name


def test_options_validated():
    with pytest.raises(gradscope.ConfigurationError, match="Expected `run_id` of MLflowSink"):
        MLflowSink(run_id=3)
