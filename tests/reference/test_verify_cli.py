"""``gradscope verify FILE.py:factory``: exit 0 when gradients agree, 1 when not, 2 for usage errors."""

from __future__ import annotations

import json
import textwrap

import pytest

from gradscope.cli import main

HEALTHY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, (torch.randn(6, 4), torch.randint(0, 3, (6,))), nn.CrossEntropyLoss()

def broken():
    model, batch, loss_fn = make()
    model[2].register_full_backward_hook(lambda m, gin, gout: (gin[0] * 3,))
    return model, batch, loss_fn

class Gate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)

def unsupported():
    model, batch, loss_fn = make()
    return nn.Sequential(model[0], Gate(), model[2]), batch, loss_fn
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "model_factory.py"
    path.write_text(textwrap.dedent(HEALTHY))
    return path


def test_healthy_model_exits_0(factory_file, capsys):
    assert main(["verify", f"{factory_file}:make"]) == 0
    out = capsys.readouterr().out
    assert "PASS: All 9 gradients agree." in out
    assert "0.weight" in out


def test_mismatch_exits_1_and_names_the_layer(factory_file, capsys):
    assert main(["verify", f"{factory_file}:broken"]) == 1
    out = capsys.readouterr().out
    assert "FAIL:" in out and "The disagreement starts at layer '2'" in out


def test_json_report(factory_file, tmp_path, capsys):
    target = tmp_path / "report.json"
    assert main(["verify", f"{factory_file}:broken", "--json", str(target)]) == 1
    data = json.loads(target.read_text())
    assert data["ok"] is False and data["first_mismatch"] == "2"
    capsys.readouterr()  # the table printed alongside the file
    assert main(["verify", f"{factory_file}:make", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_unsupported_layer_exits_2_unless_finite_difference(factory_file, capsys):
    assert main(["verify", f"{factory_file}:unsupported"]) == 2
    assert "No reference backward for module '1' (Gate)" in capsys.readouterr().err
    assert main(["verify", f"{factory_file}:unsupported", "--on-unsupported", "finite_difference"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["verify", "missing.py:make"], "Cannot find the file"),
        (["verify", "{file}:nope"], "has no attribute 'nope'"),
        (["verify", "{file}:make", "--dtype", "float16"], "invalid choice"),
        (["verify", "{file}:make", "--rtol", "-1"], "Expected `rtol` to be a non-negative float"),
    ],
)
def test_usage_errors_exit_2(factory_file, capsys, argv, message):
    argv = [a.replace("{file}", str(factory_file)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
