"""The vectorised flush helpers give what a plain loop over the frame gives, value for value, in order.

``scalar_records`` builds its records from whole NumPy blocks with cached tags, and ``histogram_rows``
bins every CPU layer in one batch; here each is compared with a straightforward reference: one
``if`` per value over the frame's public accessors, and ``_row_cpu`` layer by layer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sinkhelp import small_mlp, train

import gradscope.sinks.histograms as H
from gradscope.sinks import Sink
from gradscope.sinks import tags as T
from gradscope.sinks.records import scalar_records
from gradscope.stats.frame import ACTIVATION_STATISTICS


def reference_records(frame, start, *, stats=None, per_param=False):
    """Records of rows ``start:`` built one value at a time: ``[(step, [(tag, value), ...]), ...]``."""
    sch = frame.schema
    chosen = [s for s in sch.stats if stats is None or s in stats]
    acts = [s for s in ACTIVATION_STATISTICS if sch.act_modules and (stats is None or s in stats)]
    layer_vals = {s: frame.layer_values(s) for s in chosen}
    model_vals = {s: frame.global_values(s) for s in chosen}
    param_vals = {s: frame.param_values(s) for s in chosen}
    out = []
    for r in range(start, len(frame)):
        skipped, sampled, has = bool(frame.skipped[r]), bool(frame.sampled[r]), frame.has_grad[r]
        items = []

        def put(tag, value, wanted, items=items):
            if wanted and not math.isnan(float(value)):
                items.append((tag, float(value)))

        for s in chosen:
            when = not skipped and (sampled or s not in sch.sampled_stats)
            for li, layer in enumerate(sch.layers):
                put(T.stat_tag(s, layer), layer_vals[s][r, li], when and any(has[p] for p in sch.layer_members[li]))
            put(T.stat_tag(s, "*"), model_vals[s][r], when and bool(has.any()))
            if per_param:
                for p, (layer, leaf) in enumerate(zip(sch.param_layers, sch.param_leaves)):
                    put(T.stat_tag(s, layer, leaf), param_vals[s][r, p], when and bool(has[p]))
        for s in acts:
            for a, module in enumerate(sch.act_modules):
                put(T.stat_tag(s, module), frame.act_values(s)[r, a], not skipped and sampled)
        for name in frame.scalar_names:
            put(T.scalar_tag(name), frame.scalar(name)[r], True)
        if items:
            out.append((int(frame.steps[r]), items))
    return out


class Compare(Sink):
    """At each flush, the vectorised records next to the reference, for a few selections."""

    SELECTIONS = ({}, {"per_param": True}, {"stats": ("l2_norm", "abs_max", "act_dead_fraction")})

    def __init__(self):
        self.pairs = []

    def write(self, update):
        for sel in self.SELECTIONS:
            got = [(g.step, list(g.values.items())) for g in scalar_records(update.frame, update.new_from, **sel)]
            self.pairs.append((sel, got, reference_records(update.frame, update.new_from, **sel)))


def test_records_equal_a_value_by_value_reference_in_order():
    # a skipped step (6), NaN in layer 2 from step 13, a layer without any gradient at step 9 and a
    # parameter without one at step 10, sampled statistics every 3 steps, flushes of 4 rows
    def hook(step, model):
        if step == 9:
            model[2].weight.grad = None
            model[2].bias.grad = None
        if step == 10:
            model[0].bias.grad = None
        if step >= 13:
            model[2].weight.grad[0, 0] = float("nan")

    cmp = Compare()
    train(small_mlp(), 14, sinks=[cmp], flush_every=4, sample_every=3, skip=[6], grad_hook=hook)
    assert len(cmp.pairs) >= 3 * len(Compare.SELECTIONS)
    for sel, got, want in cmp.pairs:
        assert got == want, sel  # same steps, tags, values (bit for bit) and order
    everything = [v for _, got, _ in cmp.pairs for _, items in got for v in items]
    tags = {tag for tag, _ in everything}
    assert "gradscope/l2_norm/0/bias" in tags and "gradscope/act_dead_fraction/1" in tags
    # the partial rows really occurred: no layer-2 statistic at step 9, no 0.bias at step 10
    default = [dict(items) for sel, got, _ in cmp.pairs if not sel for _, items in got]
    steps = [step for sel, got, _ in cmp.pairs if not sel for step, _ in got]
    assert "gradscope/l2_norm/2" not in default[steps.index(9)] and "gradscope/l2_norm/0" in default[steps.index(9)]
    per_param = [(step, dict(items)) for sel, got, _ in cmp.pairs if sel.get("per_param") for step, items in got]
    at10 = dict(per_param)[10]
    assert "gradscope/l2_norm/0/bias" not in at10 and "gradscope/l2_norm/0/weight" in at10


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def test_batched_cpu_histograms_equal_the_per_layer_path(monkeypatch):
    monkeypatch.setattr(H, "CHUNK", 500)  # the 1200-element tensor is binned in three chunks
    monkeypatch.setattr(H, "cpu_histogram_kernel", lambda: None)  # the operator path (the kernel: test_tb_histograms)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(1200, generator=g)
    nan = torch.randn(5, generator=g)
    nan[2] = float("nan")
    groups = [
        [torch.randn(7, 3, generator=g), torch.randn(3, generator=g)],
        [torch.randn(40, generator=g).to(torch.bfloat16), torch.randn(6, generator=g)],  # mixed: float32 work
        [torch.randn(9, generator=g, dtype=torch.float64), torch.randn(4, generator=g)],  # float64 work
        [torch.full((4,), 2.5), torch.full((2,), 2.5)],  # one distinct value
        [torch.zeros(0)],  # nothing
        [nan],
        [torch.tensor([1.0, float("inf")])],
        [big, torch.randn(11, generator=g)],
        [torch.tensor([1.0, 1.0 + 2**-23, 1.0 + 2**-22])],  # a range of a few ulps: edges tie
    ]
    rows = H.histogram_rows(groups, 8)
    for got, tensors in zip(rows, groups):
        kept = [t for t in tensors if t.numel() > 0]
        want = H._row_cpu(kept, 8) if kept else torch.full((H.row_width(8),), float("nan"), dtype=torch.float64)
        assert _same(got, want)
    # and the finite rows are still exact against their own edges (but the last: with tied edges,
    # torch.histogram's local search picks another of the tied buckets than numpy, in both paths alike)
    for got, tensors in zip(rows.numpy()[:-1], groups[:-1]):
        edges, counts, _, _ = H.split_row(got, 8)
        if np.isfinite(got).all():
            x = np.concatenate([t.float().numpy().ravel() for t in tensors])
            np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])


@pytest.mark.parametrize("bins", [2, 64])
def test_batched_histograms_of_a_trained_mlp_equal_the_per_layer_path(bins, monkeypatch):
    monkeypatch.setattr(H, "cpu_histogram_kernel", lambda: None)
    run = train(small_mlp(), 3, capture=[3])
    layers = {}
    for name, grad in run.grads[3].items():
        layers.setdefault(name.split(".")[0], []).append(grad.float())
    groups = list(layers.values())
    rows = H.histogram_rows(groups, bins)
    for got, tensors in zip(rows, groups):
        assert _same(got, H._row_cpu(tensors, bins))
