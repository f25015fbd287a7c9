"""On-device histograms: bucket counts equal numpy's on the same gradients, read back from the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sinkhelp import load_events, small_mlp, train

from gradscope.sinks.histograms import _row_cpu, _row_device, histogram_rows, split_row

BINS = 64
LAYERS = {"0": ("0.weight", "0.bias"), "2": ("2.weight", "2.bias"), "4": ("4.weight", "4.bias")}


def _read(event):
    h = event.histogram_value
    edges = np.array([h.min, *h.bucket_limit])
    return edges, np.array(h.bucket), h


@pytest.mark.parametrize("kind", ["grad", "weight"])
def test_histograms_equal_numpy_on_the_same_tensors(tmp_path, kind):
    run = train(
        small_mlp(), 9, log_dir=tmp_path, capture=[1, 5, 9], histogram_every=4, histogram_weights=True, flush_every=4
    )
    acc = load_events(tmp_path)
    source = run.grads if kind == "grad" else run.weights
    for layer, names in LAYERS.items():
        events = acc.Histograms(f"gradscope/{kind}_hist/{layer}")
        assert [e.step for e in events] == [1, 5, 9]
        for e in events:
            x = np.concatenate([source[e.step][n].float().numpy().ravel() for n in names])
            edges, counts, h = _read(e)
            assert len(counts) == BINS
            # exact: every value placed by comparison with the edges written
            np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])
            # numpy's own binning convention: equal-width buckets between the minimum and the maximum
            ref_counts, ref_edges = np.histogram(x, bins=BINS)
            assert (edges[0], edges[-1]) == (x.min(), x.max())
            np.testing.assert_allclose(edges, ref_edges, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(x).max())
            assert np.abs(counts - ref_counts).sum() <= 4  # only values within rounding of an edge may move
            assert h.num == x.size
            np.testing.assert_allclose(h.sum, x.astype(np.float64).sum(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(h.sum_squares, (x.astype(np.float64) ** 2).sum(), rtol=1e-5)


def test_no_weight_histograms_by_default_and_layer_with_nonfinite_gradient_is_skipped(tmp_path):
    def poison(step, model):
        if step == 3:
            model[2].weight.grad[0, 0] = float("inf")

    train(small_mlp(), 3, log_dir=tmp_path, histogram_every=1, grad_hook=poison)
    tags = load_events(tmp_path).Tags()["histograms"]
    assert sorted(tags) == ["gradscope/grad_hist/0", "gradscope/grad_hist/2", "gradscope/grad_hist/4"]
    acc = load_events(tmp_path)
    # step 3: layer 2's gradient holds inf, so its histogram is left out; layer 0's is finite
    assert [e.step for e in acc.Histograms("gradscope/grad_hist/2")] == [1, 2]
    assert [e.step for e in acc.Histograms("gradscope/grad_hist/0")] == [1, 2, 3]


@pytest.mark.parametrize("row_fn", [_row_cpu, _row_device], ids=["cpu", "device-path"])
def test_constant_tensor_is_a_spike_at_its_value_as_tensorboard_draws_it(row_fn):
    """A constant (e.g. all-zero) gradient: every edge at the value, all counts in the last bucket.

    That is the convention of TensorBoard's own histogram summary for one distinct value, and what its
    reader turns our old-style histogram into is then one zero-width bucket at the value (a spike),
    where numpy's ``[v - 0.5, v + 0.5]`` range became a bucket one unit wide (a flat band).
    """
    from tensorboard import data_compat
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
    from tensorboard.util import tensor_util

    for x in (np.zeros(7), np.full(6, 2.5)):
        edges, counts, total, squares = split_row(row_fn([torch.tensor(x, dtype=torch.float32)], 4).numpy(), 4)
        np.testing.assert_array_equal(edges, np.full(5, x[0]))
        np.testing.assert_array_equal(counts, [0, 0, 0, x.size])
        np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])  # placed by comparison, as numpy
        assert (total, squares) == (x.sum(), (x**2).sum())
        histo = HistogramProto(
            min=edges[0], max=edges[-1], num=x.size, bucket_limit=edges[1:].tolist(), bucket=counts.tolist()
        )
        value = data_compat.migrate_value(Summary.Value(tag="h", histo=histo))
        buckets = tensor_util.make_ndarray(value.tensor)  # [k, 3]: left, right, count, as the dashboard gets them
        np.testing.assert_array_equal(buckets, [[x[0], x[0], x.size]])


def test_constant_and_empty_tensors_in_histogram_rows():
    rows = histogram_rows([[torch.zeros(7)], [torch.full((3, 2), 2.5)], [torch.zeros(0)]], 4).numpy()
    for row, x in zip(rows[:2], [np.zeros(7), np.full(6, 2.5)]):
        edges, counts, _, _ = split_row(row, 4)
        np.testing.assert_array_equal(edges, np.full(5, x[0]))
        np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])
    assert not np.isfinite(rows[2]).all()


def test_all_zero_gradient_written_as_a_spike_at_zero(tmp_path):
    def zero_first_layer(step, model):
        model[0].weight.grad.zero_()
        model[0].bias.grad.zero_()

    train(small_mlp(), 2, log_dir=tmp_path, histogram_every=1, grad_hook=zero_first_layer)
    for e in load_events(tmp_path).Histograms("gradscope/grad_hist/0"):
        h = e.histogram_value
        assert (h.min, h.max, h.num) == (0.0, 0.0, 12 * 6 + 12)
        assert set(h.bucket_limit) == {0.0} and h.bucket[-1] == h.num and sum(h.bucket[:-1]) == 0


arrays = st.lists(
    st.one_of(
        st.floats(-1e3, 1e3, allow_nan=False, width=32),
        st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-30]),  # ties and repeated values
    ),
    min_size=1,
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(arrays, min_size=1, max_size=3), bins=st.integers(2, 40))
def test_both_paths_count_exactly_against_their_edges(groups, bins):
    tensors = [torch.tensor(g, dtype=torch.float32) for g in groups]
    x = np.concatenate([np.asarray(g, dtype=np.float32) for g in groups])
    for row in (_row_cpu(tensors, bins).numpy(), _row_device(tensors, bins).numpy()):
        edges, counts, s, ss = split_row(row, bins)
        assert np.all(np.diff(edges) >= 0)
        if x.min() < x.max():
            assert (edges[0], edges[-1]) == (x.min(), x.max())
        np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])
        assert counts.sum() == x.size
        np.testing.assert_allclose(s, x.astype(np.float64).sum(), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(ss, (x.astype(np.float64) ** 2).sum(), rtol=1e-5, atol=1e-3)


def test_large_tensors_are_binned_in_chunks(monkeypatch):
    import gradscope.sinks.histograms as H

    monkeypatch.setattr(H, "CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4321, generator=g)
    for fn in (_row_cpu, _row_device):
        edges, counts, _, _ = split_row(fn([t], 16).numpy(), 16)
        np.testing.assert_array_equal(counts, np.histogram(t.numpy(), bins=edges)[0])


def _kernel_rows(groups, bins, kernel_fn):
    import gradscope.sinks.histograms as H

    out = torch.empty((len(groups), H.row_width(bins)), dtype=torch.float64)
    ends = np.cumsum([len(g) for g in groups]).tolist()
    kernel_fn([t for g in groups for t in g], ends, bins, out)
    return out.numpy()


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(arrays, min_size=1, max_size=3), bins=st.integers(2, 40))
def test_the_compiled_histograms_count_exactly_against_their_edges(cpu_kernel, groups, bins):
    from gradscope.capture.kernels import cpu_histogram_kernel

    kernel = cpu_histogram_kernel()
    assert kernel is not None
    tensors = [torch.tensor(g, dtype=torch.float32) for g in groups]
    x = np.concatenate([np.asarray(g, dtype=np.float32) for g in groups]).astype(np.float64)
    row = _kernel_rows([tensors], bins, kernel)[0]
    edges, counts, s, ss = split_row(row, bins)
    assert np.all(np.diff(edges) >= 0) and (edges[0], edges[-1]) == (x.min(), x.max())
    np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])
    assert counts.sum() == x.size
    np.testing.assert_allclose(s, x.sum(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(ss, (x**2).sum(), rtol=1e-12, atol=1e-9)


def test_the_compiled_histograms_match_numpy_group_by_group(cpu_kernel):
    import gradscope.sinks.histograms as H
    from gradscope.capture.kernels import cpu_histogram_kernel

    kernel = cpu_histogram_kernel()
    assert kernel is not None
    g = torch.Generator().manual_seed(0)
    nan = torch.randn(5, generator=g)
    nan[2] = float("nan")
    groups = [
        [torch.randn(7, 3, generator=g), torch.randn(3, generator=g)],
        [torch.randn(9, generator=g, dtype=torch.float64), torch.randn(4, generator=g)],  # mixed dtypes
        [torch.full((4,), 2.5), torch.full((2,), 2.5)],  # one distinct value: a spike at it
        [],  # nothing
        [nan],
        [torch.tensor([1.0, float("inf")])],
        [torch.randn(100_000, generator=g) * 1e-3],
        [torch.tensor([1.0, 1.0 + 2**-23, 1.0 + 2**-22])],  # a range of a few float32 ulps
        [torch.tensor([0.0, 1e-310, 3e-310, -2e-310], dtype=torch.float64)],  # a subnormal range: 16 / range is inf
        [torch.tensor([-3.4e38, 3.4e38, 0.0])],  # the widest float32 range: hi - lo overflows float32, not float64
    ]
    rows = _kernel_rows(groups, 16, kernel)
    for row, tensors in zip(rows, groups):
        if not tensors or any(not torch.isfinite(t).all() for t in tensors):
            assert np.isnan(row).all()
            continue
        x = np.concatenate([t.double().numpy().ravel() for t in tensors])
        edges, counts, s, ss = split_row(row, 16)
        if x.min() == x.max():
            assert (edges == x[0]).all() and counts[-1] == x.size and counts[:-1].sum() == 0
        else:
            np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])
            np.testing.assert_allclose(
                edges, np.linspace(x.min(), x.max(), 17), rtol=1e-15, atol=1e-321
            )  # (subnormals)
        np.testing.assert_allclose([s, ss], [x.sum(), (x**2).sum()], rtol=1e-12)
    # half precision: its values (which float64 holds exactly) counted against the edges written, a
    # bfloat16 and a float16 tensor in one group, and a group of float32 with bfloat16
    half = [
        [torch.randn(300, generator=g).to(torch.bfloat16), (3 * torch.randn(7, 5, generator=g)).half()],
        [torch.randn(40, generator=g), torch.randn(9, generator=g).to(torch.bfloat16)],
    ]
    for row, tensors in zip(_kernel_rows(half, 8, kernel), half):
        x = np.concatenate([t.double().numpy().ravel() for t in tensors])
        edges, counts, s, ss = split_row(row, 8)
        assert (edges[0], edges[-1]) == (x.min(), x.max())
        np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])
        np.testing.assert_allclose([s, ss], [x.sum(), (x**2).sum()], rtol=1e-12)
    # NaN or Inf in half precision: a NaN row, as for float32
    bad = [[torch.tensor([1.0, float("nan"), 2.0]).bfloat16()], [torch.tensor([1.0, float("inf")]).half()]]
    assert np.isnan(_kernel_rows(bad, 8, kernel)).all()
    # what the kernel does not take (a view with gaps between its entries) goes the operator way:
    # histogram_rows gives the per-layer path's row for it
    gapped = [[torch.randn(6, 8, generator=g)[:, ::2]]]
    for got, tensors in zip(H.histogram_rows(gapped, 8), gapped):
        want = H._row_cpu(tensors, 8)
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="dense float32/float64/bfloat16/float16"):
        _kernel_rows(gapped, 8, kernel)
    # a channels-last weight and a transpose are read in memory order: the same row as their copies
    odd = [
        torch.randn(4, 3, 5, 5, generator=g).to(memory_format=torch.channels_last),
        torch.randn(7, 9, generator=g).t(),
    ]
    got = _kernel_rows([odd], 8, kernel)[0]
    want = _kernel_rows([[t.contiguous() for t in odd]], 8, kernel)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12)
