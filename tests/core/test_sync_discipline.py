"""Host syncs on the hot path, checked on a CPU: every value read back from a tensor by gradscope's code.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches a sync (``tests/integration/test_gpu.py``).
On a CPU nothing waits, so a sync is invisible there; this test makes it visible anyway. A
``TorchFunctionMode`` sees every call that reads a tensor's value into Python (``item``, ``tolist``,
``cpu``, ``numpy``, ``bool``, ``float``, ``int``) and the test attributes each to the innermost frame of
gradscope's own code on the stack (a torch function gradscope called that syncs inside counts too).
Calls from torch itself (the optimizer, GradScaler) or from the training loop are not gradscope's.

The rules asserted (docs/concepts.md, "Host syncs"):

* every such read in gradscope's code sits under a ``# sync point:`` comment;
* outside a flush, the only ones are reads of CPU tensors (the comment says "CPU tensors only", and
  the code reaches them only for CPU tensors) and the one requested by ``on_nonfinite="raise"``.
"""

from __future__ import annotations

import linecache
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import gradscope

PACKAGE = Path(gradscope.__file__).resolve().parent
READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}
FLUSH_FRAMES = {"_flush", "_close", "report", "flush"}
MARK = "# sync point:"


class ReadSpy(TorchFunctionMode):
    """Records (file, line, function, marker comment, inside a flush) for each read from gradscope's code."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self._record(func)
        return func(*args, **(kwargs or {}))

    def _record(self, func) -> None:
        frame = sys._getframe(2)
        ours = None
        in_flush = False
        while frame is not None:
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(PACKAGE):
                ours = ours or frame
                in_flush = in_flush or frame.f_code.co_name in FLUSH_FRAMES
            frame = frame.f_back
        if ours is None:
            return  # torch's or the training loop's own read
        file, line = ours.f_code.co_filename, ours.f_lineno
        above = [linecache.getline(file, n) for n in range(max(1, line - 6), line + 1)]
        marks = [text.strip() for text in above if MARK in text]
        self.reads.append(
            {
                "where": f"{Path(file).relative_to(PACKAGE.parent)}:{line}",
                "func": func.__name__,
                "mark": marks[-1] if marks else None,
                "in_flush": in_flush,
            }
        )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(scope_kwargs: dict, *, steps: int, tmp_path: Path, amp: bool = False) -> list[dict]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    spy = ReadSpy()
    with spy:
        with gradscope.watch(model, optimizer=opt, log_dir=tmp_path / "tb", **scope_kwargs) as scope:
            for _ in range(steps):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                accuracy = (out.argmax(1) == y).float().mean()
                scope.step(loss=loss, accuracy=accuracy, lr=1e-2)
                opt.zero_grad()
        report = scope.report()
    assert report.steps == steps and len(report.stats)  # it did record
    return spy.reads


CONFIGS = {
    "defaults-with-tensorboard": ({}, False),
    "everything-every-step": (
        {"sample_every": 1, "flush_every": 4, "histogram_every": 1, "histogram_weights": True, "figure_every": 4},
        False,
    ),
    "raise-on-nonfinite": ({"on_nonfinite": "raise", "sample_every": 2, "flush_every": 4}, False),
    "bf16-autocast-gradscaler": ({"sample_every": 2, "flush_every": 4, "histogram_every": 2}, True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_read_from_a_tensor_is_a_marked_sync_point(name, tmp_path):
    kwargs, amp = CONFIGS[name]
    reads = _train(kwargs, steps=9, tmp_path=tmp_path, amp=amp)
    unmarked = sorted({f"{r['where']} ({r['func']})" for r in reads if r["mark"] is None})
    assert not unmarked, "reads of tensor values without a '# sync point:' comment:\n" + "\n".join(unmarked)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outside_a_flush_only_cpu_reads_and_requested_ones(name, tmp_path):
    kwargs, amp = CONFIGS[name]
    reads = _train(kwargs, steps=9, tmp_path=tmp_path, amp=amp)
    per_step = [r for r in reads if not r["in_flush"]]
    allowed = ("CPU tensors only", 'on_nonfinite="raise"')
    bad = sorted({f"{r['where']}: {r['mark']}" for r in per_step if not any(a in (r["mark"] or "") for a in allowed)})
    assert not bad, "per-step reads that would be device syncs on a GPU:\n" + "\n".join(bad)
    if "on_nonfinite" in kwargs:
        assert any('on_nonfinite="raise"' in (r["mark"] or "") for r in per_step)


def test_the_spy_sees_an_unmarked_read(tmp_path):
    # The check can fail: a statistic whose function reads a value (a sync on a GPU) is reported.
    from gradscope.registry import STATISTICS

    @gradscope.register_statistic("test_sync_spy_max")
    def _max(grad, param):
        return torch.tensor(grad.abs().max().item())

    try:
        reads = _train({"stats": ["l2_norm", "test_sync_spy_max"]}, steps=3, tmp_path=tmp_path)
    finally:
        STATISTICS.unregister("test_sync_spy_max")
    assert any(r["mark"] is None and r["func"] == "item" for r in reads), reads
