"""MetricsLoggerSink: one log_metrics(metrics, step=) call per step, with that step's records."""

from __future__ import annotations

import pytest
from sinkhelp import expected_records, small_mlp, train

import gradscope
from gradscope.sinks import MetricsLoggerSink
from gradscope.sinks.registry import SINKS


class Logger:
    """Has the interface of Lightning's loggers; keeps every call, and may damage what it receives."""

    def __init__(self, *, destructive: bool = False) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.destructive = destructive

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))
        if self.destructive:
            metrics.clear()


def test_one_call_per_step_with_the_values_of_report_stats():
    logger = Logger()
    run = train(small_mlp(), 11, sinks=[MetricsLoggerSink(logger)], flush_every=4, sample_every=5, skip=[4])
    assert [step for step, _ in logger.calls] == list(range(1, 12))
    got = {(step, tag): value for step, metrics in logger.calls for tag, value in metrics.items()}
    want = expected_records(run.report)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert set(logger.calls[3][1]) == {"gradscope/scalar/loss", "gradscope/scalar/val_loss"}  # skipped step 4


def test_each_logger_gets_its_own_dict_and_selection():
    first, second = Logger(destructive=True), Logger()
    third = Logger()
    train(
        small_mlp(),
        3,
        sinks=[
            MetricsLoggerSink(first),
            MetricsLoggerSink(second),
            MetricsLoggerSink(third, stats=["l2_norm"], per_param=True),
        ],
    )
    assert first.calls == second.calls
    assert {t.split("/")[1] for _, m in third.calls for t in m} == {"l2_norm", "scalar"}
    assert "gradscope/l2_norm/0/weight" in third.calls[0][1]


def test_a_module_level_function_works_like_mlflow():
    # mlflow.log_metrics(metrics, step=None, synchronous=None, ...): a module, not a logger object
    import types

    seen = []
    mlflow_like = types.SimpleNamespace(log_metrics=lambda metrics, step=None, synchronous=None: seen.append(step))
    train(small_mlp(), 2, sinks=[MetricsLoggerSink(mlflow_like)])
    assert seen == [1, 2]


@pytest.mark.parametrize("logger", [object(), type("L", (), {"log_metrics": 3})()])
def test_an_object_without_log_metrics_is_refused_with_the_fix(logger):
    with pytest.raises(gradscope.ConfigurationError) as err:
        MetricsLoggerSink(logger)
    msg = str(err.value)
    assert "needs an object with a log_metrics(metrics, step=...) method" in msg
    assert type(logger).__name__ in msg and "Lightning logger" in msg


def test_registered_and_stats_checked_at_open():
    assert SINKS.get("metrics_logger") is MetricsLoggerSink
    with pytest.raises(gradscope.ConfigurationError, match=r"MetricsLoggerSink\(stats=...\) names 'nope'"):
        gradscope.watch(small_mlp(), sinks=[MetricsLoggerSink(Logger(), stats=["nope"])])
