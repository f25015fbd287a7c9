"""docs/backprop.md stays true: its code runs, prints exactly what the page shows, and agrees with autograd.

Blocks marked ``<!-- checked: NAME -->`` are executed and their output compared with the block marked
``<!-- output: NAME -->``; blocks marked ``<!-- source: PATH -->`` must appear verbatim in that file.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import gradscope

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "backprop.md").read_text(encoding="utf-8")


def _blocks(marker: str) -> dict[str, str]:
    pattern = re.compile(rf"<!-- {marker}: (\S+) -->\n```\w+\n(.*?)```", re.DOTALL)
    return {name: body for name, body in pattern.findall(DOC)}


CHECKED, OUTPUTS, SOURCES = _blocks("checked"), _blocks("output"), _blocks("source")


def test_every_checked_block_has_an_output():
    assert set(CHECKED) == set(OUTPUTS) == {"worked-example", "fork", "bptt", "flops", "vanishing"}
    assert len(SOURCES) == 3


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_code_prints_what_the_page_shows(name):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(CHECKED[name], f"docs/backprop.md:{name}", "exec"), {"__name__": "__doc__"})
    assert printed.getvalue() == OUTPUTS[name]


@pytest.mark.parametrize("path", sorted(SOURCES))
def test_quoted_source_is_current(path):
    assert SOURCES[path] in (ROOT / path).read_text(encoding="utf-8"), f"docs/backprop.md quotes stale code from {path}"


def _worked_example_model():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -1.0], [1.5, 0.25], [-0.5, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, -1.0, 0.5]))
        model[2].weight.copy_(torch.tensor([[2.0, -0.5, 0.25]]))
        model[2].bias.copy_(torch.tensor([0.5]))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.5]], dtype=torch.float64)
    return model, x, t


def test_worked_example_numbers_match_autograd():
    printed = {}
    for line in OUTPUTS["worked-example"].splitlines():
        name, value = (part.strip() for part in line.split("=", 1))
        printed[name] = ast.literal_eval(value)

    model, x, t = _worked_example_model()
    x.requires_grad_(True)
    saved = {}
    for index in (0, 1, 2):
        model[index].register_forward_hook(lambda m, a, out, i=index: saved.__setitem__(i, out))
    z_in = {}
    model[1].register_forward_pre_hook(lambda m, a: z_in.__setitem__("z", a[0]))
    model[2].register_forward_pre_hook(lambda m, a: z_in.__setitem__("h", a[0]))
    y = model(x)
    for tensor in (*z_in.values(), y):
        tensor.retain_grad()
    loss = nn.MSELoss()(y, t)
    loss.backward()

    autograd = {
        "z": saved[0],
        "h": saved[1],
        "y": y,
        "L": loss,
        "dL/dy": y.grad,
        "dL/dW2": model[2].weight.grad,
        "dL/db2": model[2].bias.grad,
        "dL/dh": z_in["h"].grad,
        "dL/dz": z_in["z"].grad,
        "dL/dW1": model[0].weight.grad,
        "dL/db1": model[0].bias.grad,
        "dL/dx": x.grad,
    }
    assert list(printed) == list(autograd)
    # The page prints Python's shortest round-trip repr, so equality is to the last digit.
    mismatched = {n: (printed[n], v.tolist()) for n, v in autograd.items() if printed[n] != v.detach().tolist()}
    assert not mismatched, mismatched


def test_worked_example_verifies():
    model, x, t = _worked_example_model()
    report = gradscope.verify(model, x, t, nn.MSELoss())
    assert report.ok, str(report)
    assert report.loss_reference == report.loss_autograd == 1.0
