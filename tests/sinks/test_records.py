"""Scalar records of a flush (``SinkUpdate.records``): exactly the numbers of report.stats and report.scalars."""

from __future__ import annotations

import numpy as np
from sinkhelp import expected_records, small_mlp, train

from gradscope.sinks import Record, Sink, SinkUpdate, StepRecords


class Recorder(Sink):
    """Keeps what each flush offered: the groups (default selection) and the flat records."""

    def __init__(self, **selection):
        self.selection = selection
        self.groups: list[StepRecords] = []
        self.flat: list[Record] = []
        self.updates: list[SinkUpdate] = []

    def write(self, update):
        self.updates.append(update)
        self.groups += update.records_by_step(**self.selection)
        self.flat += update.records(**self.selection)


def _as_dict(groups):
    out = {}
    for g in groups:
        for tag, value in g.values.items():
            assert (g.step, tag) not in out, f"{tag} twice at step {g.step}"
            out[(g.step, tag)] = value
    return out


def test_records_are_report_stats_and_scalars_across_flushes():
    # a skipped optimizer step 6 (statistics left out, its loss kept), NaN from step 13 on (left out),
    # sampled statistics every 3 steps, flushes of 4 rows
    def poison(step, model):
        if step == 13:
            model[2].weight.grad[0, 0] = float("nan")

    rec = Recorder()
    run = train(small_mlp(), 14, sinks=[rec], flush_every=4, sample_every=3, skip=[6], grad_hook=poison)
    got = _as_dict(rec.groups)
    want = expected_records(run.report)
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5], sorted(want.keys() - got.keys())[:5])
    bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not bad, bad[:5]
    # one group per step, in step order, across flushes
    assert [g.step for g in rec.groups] == list(range(1, 15))
    assert set(rec.groups[5].values) == {"gradscope/scalar/loss", "gradscope/scalar/val_loss"}  # step 6
    assert "gradscope/abs_max/0" in rec.groups[3].values and "gradscope/abs_max/0" not in rec.groups[4].values
    assert "gradscope/l2_norm/2" not in rec.groups[12].values and "gradscope/l2_norm/0" in rec.groups[12].values
    assert rec.groups[12].values["gradscope/nonfinite_count/2"] == 1.0
    assert "gradscope/act_dead_fraction/1" in rec.groups[0].values
    # the flat view is the same records, step by step
    assert [(r.step, r.tag, r.value) for r in rec.flat] == [
        (g.step, tag, value) for g in rec.groups for tag, value in g.values.items()
    ]
    assert all(isinstance(v, float) and not np.isnan(v) for v in got.values())


def test_selection_per_param_and_computed_once_per_selection():
    rec = Recorder(stats=["l2_norm", "act_zero_fraction"], per_param=True)
    run = train(small_mlp(), 3, sinks=[rec], flush_every=10)
    got = _as_dict(rec.groups)
    want = {
        k: v
        for k, v in expected_records(run.report, per_param=True).items()
        if k[1].split("/")[1] in ("l2_norm", "act_zero_fraction", "scalar")
    }
    assert got == want
    assert (1, "gradscope/l2_norm/4/bias") in got
    update = rec.updates[-1]
    assert update.records_by_step(stats=["l2_norm", "act_zero_fraction"], per_param=True) is update.records_by_step(
        stats=("l2_norm", "act_zero_fraction"), per_param=True
    )
    everything = update.records_by_step()
    assert everything is update.records_by_step() and everything is not rec.groups
    assert "gradscope/rms/_model" in everything[0].values


def test_no_new_rows_no_records():
    rec = Recorder()
    train(small_mlp(), 2, sinks=[rec], flush_every=2)
    # the flush at close() has no new row
    assert rec.updates[-1].records_by_step() == []
    assert list(rec.updates[-1].records()) == []
