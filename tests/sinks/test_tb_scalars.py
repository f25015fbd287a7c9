"""TensorBoard scalars read back with TensorBoard's own reader equal report.stats; one run, one file."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sinkhelp import event_files, f32, load_events, small_mlp, tensor_text, train
from torch.utils.tensorboard import SummaryWriter

import gradscope
from gradscope.sinks import tags as T
from gradscope.sinks.tensorboard import TensorBoardSink


def _tb_series(acc, tag):
    events = acc.Scalars(tag)
    return [e.step for e in events], f32([e.value for e in events])


def _expected(stats, layer, param, stat):
    rows = stats[(stats["layer"] == layer) & (stats["param"] == param) & (stats["stat"] == stat)]
    return rows["step"].tolist(), f32(rows["value"])


def _assert_same(actual, expected, what):
    (s_a, v_a), (s_e, v_e) = actual, expected
    assert s_a == s_e, f"{what}: steps {s_a} != {s_e}"
    np.testing.assert_array_equal(v_a, v_e, err_msg=what)


def test_scalars_equal_report_stats_and_one_event_file(tmp_path):
    run = train(small_mlp(), 23, log_dir=tmp_path, flush_every=7, histogram_every=None)
    stats = run.report.stats
    acc = load_events(tmp_path)
    tags = set(acc.Tags()["scalars"])

    expected_tags = set()
    agg = stats[stats["param"] == "*"]
    for (layer, stat), _ in agg.groupby(["layer", "stat"]):
        tag = T.stat_tag(stat, layer)
        expected_tags.add(tag)
        _assert_same(_tb_series(acc, tag), _expected(stats, layer, "*", stat), tag)
    for name in ("loss", "val_loss"):
        tag = T.scalar_tag(name)
        expected_tags.add(tag)
        sc = run.report.scalars[name]
        _assert_same(_tb_series(acc, tag), (sc.index.tolist(), f32(sc)), tag)
    # nothing more, nothing less: per-parameter tags are opt-in
    assert tags == expected_tags
    assert {"gradscope/l2_norm/0", "gradscope/l2_norm/_model", "gradscope/act_dead_fraction/1"} <= tags
    # sampled statistics are on sampled steps only (1, 11, 21), every-step ones on every step
    assert [e.step for e in acc.Scalars("gradscope/abs_max/2")] == [1, 11, 21]
    assert [e.step for e in acc.Scalars("gradscope/rms/2")] == list(range(1, 24))
    assert len(event_files(tmp_path)) == 1


def test_global_norm_and_loss_against_float64_reference(tmp_path):
    run = train(small_mlp(), 6, log_dir=tmp_path, capture=range(1, 7), histogram_every=None)
    acc = load_events(tmp_path)
    steps, norms = _tb_series(acc, "gradscope/l2_norm/_model")
    assert steps == list(range(1, 7))
    ref = [math.sqrt(sum(float(g.pow(2).sum()) for g in run.grads[s].values())) for s in steps]
    np.testing.assert_allclose(norms, ref, rtol=2e-6)
    # a layer aggregate: all of layer "2"'s parameters together
    _, layer2 = _tb_series(acc, "gradscope/l2_norm/2")
    ref2 = [
        math.sqrt(float(run.grads[s]["2.weight"].pow(2).sum() + run.grads[s]["2.bias"].pow(2).sum())) for s in steps
    ]
    np.testing.assert_allclose(layer2, ref2, rtol=2e-6)
    loss_steps, loss = _tb_series(acc, "gradscope/scalar/loss")
    _, val = _tb_series(acc, "gradscope/scalar/val_loss")
    assert loss_steps == steps
    np.testing.assert_allclose(val, loss * 1.25, rtol=1e-6)


def test_user_writer_gets_everything_and_stays_open(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("mine/before", 1.0, 0)
    run = train(small_mlp(), 5, writer=writer, histogram_every=2)
    # gradscope flushed but did not close the user's writer: it still takes events
    writer.add_scalar("mine/after", 2.0, 6)
    writer.close()
    acc = load_events(tmp_path)
    tags = acc.Tags()
    assert {"mine/before", "mine/after", "gradscope/l2_norm/_model", "gradscope/scalar/loss"} <= set(tags["scalars"])
    assert "gradscope/grad_hist/0" in tags["histograms"]
    assert len(event_files(tmp_path)) == 1
    assert run.report.steps == 5


def test_per_param_tags_opt_in(tmp_path):
    sink = TensorBoardSink(tmp_path, per_param=True, histogram_every=None)
    run = train(small_mlp(), 4, sinks=[sink])
    stats = run.report.stats
    acc = load_events(tmp_path)
    params = stats[(stats["param"] != "*")]
    assert len(params)
    for (layer, param, stat), _ in params.groupby(["layer", "param", "stat"]):
        tag = T.stat_tag(stat, layer, param)
        _assert_same(_tb_series(acc, tag), _expected(stats, layer, param, stat), tag)
    assert "gradscope/l2_norm/4/bias" in acc.Tags()["scalars"]


def test_skipped_optimizer_steps_are_left_out(tmp_path):
    run = train(small_mlp(), 6, log_dir=tmp_path, skip=[3], histogram_every=1)
    assert run.report.skipped_steps == [3]
    acc = load_events(tmp_path)
    assert [e.step for e in acc.Scalars("gradscope/l2_norm/_model")] == [1, 2, 4, 5, 6]
    assert [e.step for e in acc.Histograms("gradscope/grad_hist/0")] == [1, 2, 4, 5, 6]
    # the loss of a skipped step is still the loss of that step
    assert 3 in [e.step for e in acc.Scalars("gradscope/scalar/loss")]


def test_every_records_every_nth_step(tmp_path):
    train(small_mlp(), 9, log_dir=tmp_path, every=2, sample_every=4, histogram_every=4)
    acc = load_events(tmp_path)
    assert [e.step for e in acc.Scalars("gradscope/l2_norm/0")] == [1, 3, 5, 7, 9]
    assert [e.step for e in acc.Scalars("gradscope/abs_max/0")] == [1, 5, 9]
    # the first recorded step of each window of 4 steps: 1, 5, 9
    assert [e.step for e in acc.Histograms("gradscope/grad_hist/0")] == [1, 5, 9]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"histogram_every": 0}, "Expected `histogram_every` to be a positive int or None (off), but got 0."),
        ({"figure_every": -5}, "Expected `figure_every` to be a positive int or None (off), but got -5."),
        ({"histogram_weights": "yes"}, "Expected `histogram_weights` to be True or False, but got 'yes'."),
        ({"writer": object()}, "Expected `writer` to be a torch.utils.tensorboard.SummaryWriter, but got object."),
    ],
)
def test_invalid_options_raise_before_touching_the_model(kwargs, message):
    model = small_mlp()
    with pytest.raises(gradscope.ConfigurationError) as err:
        gradscope.watch(model, **kwargs)
    assert message in str(err.value)
    # nothing attached: the model can be watched right away
    gradscope.watch(model).close()


@pytest.mark.parametrize(
    ("tag", "parsed"),
    [
        ("gradscope/l2_norm/blocks.3.attn", ("stat", "l2_norm", "blocks.3.attn", "*", "")),
        ("gradscope/rms/_model", ("stat", "rms", "*", "*", "")),
        ("gradscope/rms/_root", ("stat", "rms", "", "*", "")),
        ("gradscope/mean/wte+head/weight", ("stat", "mean", "wte+head", "weight", "")),
        ("gradscope/scalar/val_loss", ("scalar", "", "", "*", "val_loss")),
    ],
)
def test_tags_round_trip(tag, parsed):
    p = T.parse_tag(tag)
    assert (p.kind, p.stat, p.layer, p.param, p.name) == parsed
    if p.kind == "stat":
        assert T.stat_tag(p.stat, p.layer, p.param) == tag


@pytest.mark.parametrize(
    "tag", ["loss", "gradscope/_meta", "gradscope/grad_hist/0", "gradscope/findings", "other/l2_norm/x"]
)
def test_other_tags_are_not_statistics(tag):
    assert T.parse_tag(tag) is None


def test_stats_selection(tmp_path):
    sink = TensorBoardSink(tmp_path, stats=["l2_norm", "act_dead_fraction"], histogram_every=None)
    train(small_mlp(), 3, sinks=[sink])
    tags = set(load_events(tmp_path).Tags()["scalars"])
    assert {t.split("/")[1] for t in tags} == {"l2_norm", "act_dead_fraction", "scalar"}
    with pytest.raises(gradscope.ConfigurationError, match="names 'grad_p99', which this scope does not collect"):
        gradscope.watch(small_mlp(), sinks=[TensorBoardSink(tmp_path / "x", stats=["grad_p99"])])


def test_nan_values_are_not_written_but_counted(tmp_path):
    def poison(step, model):
        if step == 3:
            model[2].weight.grad[1, 1] = float("nan")

    run = train(small_mlp(), 3, log_dir=tmp_path, grad_hook=poison, histogram_every=None)
    stats = run.report.stats
    nan_rows = stats[stats["value"].isna() & (stats["param"] == "*")]
    assert set(nan_rows["layer"]) >= {"2", "*"} and set(nan_rows["step"]) == {3}
    acc = load_events(tmp_path)
    assert [e.step for e in acc.Scalars("gradscope/l2_norm/2")] == [1, 2]
    assert [e.step for e in acc.Scalars("gradscope/l2_norm/0")] == [1, 2, 3]
    assert [(e.step, e.value) for e in acc.Scalars("gradscope/nonfinite_count/2")] == [(1, 0.0), (2, 0.0), (3, 1.0)]
    assert acc.Scalars("gradscope/nonfinite_count/_model")[-1].value == 1.0


def test_user_writer_closed_before_the_last_flush_still_gets_everything(tmp_path):
    # as the Hugging Face Trainer does with its own writer when training ends
    writer = SummaryWriter(str(tmp_path))

    def close_it(step, model):
        if step == 5:
            writer.close()

    run = train(small_mlp(), 6, writer=writer, flush_every=2, histogram_every=1, grad_hook=close_it)
    assert run.report.errors == []
    acc = load_events(tmp_path)
    assert [e.step for e in acc.Scalars("gradscope/l2_norm/_model")] == list(range(1, 7))
    assert [e.step for e in acc.Histograms("gradscope/grad_hist/0")] == list(range(1, 7))
    assert [s for s, _ in tensor_text(acc, T.VERDICT_TAG)] == [6]
    assert len(event_files(tmp_path)) == 2  # yours, then gradscope's own on the same folder
