"""On an accelerator the histograms are computed without a host sync (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sinkhelp import load_events

import gradscope
from gradscope.sinks.histograms import histogram_rows, split_row

pytestmark = pytest.mark.gpu


def test_histogram_rows_on_cuda_do_not_sync_and_match_numpy():
    g = torch.Generator(device="cuda").manual_seed(0)
    groups = [
        [torch.randn(300, 40, device="cuda", generator=g), torch.randn(40, device="cuda", generator=g)],
        [torch.zeros(17, device="cuda")],
        [torch.randn(1000, device="cuda", generator=g).half()],
    ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = histogram_rows(groups, 32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows.device.type == "cuda"
    for group, row in zip(groups, rows.cpu().numpy()):
        edges, counts, _, _ = split_row(row, 32)
        x = np.concatenate([t.float().cpu().numpy().ravel() for t in group])
        np.testing.assert_array_equal(counts, np.histogram(x, bins=edges)[0])


def test_watch_with_histograms_on_cuda_has_no_sync_between_flushes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [torch.randn(64, 8, device="cuda") for _ in range(7)]
    scope = gradscope.watch(
        model, optimizer=opt, log_dir=tmp_path, histogram_every=3, histogram_weights=True, flush_every=100
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in batches:
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report = scope.close()  # the flush: the one deliberate copy to the host
    assert not report.errors, report.errors  # a sync inside monitoring would land here, not raise
    acc = load_events(tmp_path)
    assert [e.step for e in acc.Histograms("gradscope/grad_hist/0")] == [1, 4, 7]
    assert [e.step for e in acc.Histograms("gradscope/weight_hist/2")] == [1, 4, 7]
