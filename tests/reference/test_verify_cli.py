"""``gradscope verify FILE.py:factory``: exit 0 when gradients agree, 1 when not, 2 for usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_unsupported_layer_is_checked_numerically_unless_error_is_asked(factory_file, capsys):
    assert main(["verify", f"{factory_file}:unsupported", "--on-unsupported", "error"]) == 2
    assert "No reference backward for module '1' (Gate)" in capsys.readouterr().err
    assert main(["verify", f"{factory_file}:unsupported"]) == 0
    out = capsys.readouterr().out
    assert (
        "checked only numerically, by finite differences (1 along random directions), in the layers without a reference: '1'."
        in out
    )


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


FAILING = """
import torch
from torch import nn

class Output:  # what a Hugging Face model returns: an object with .logits, not a tensor
    def __init__(self, logits):
        self.logits = logits

class ReturnsModelOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return Output(self.fc(x))

def _batch():
    torch.manual_seed(0)
    return torch.randn(6, 4), torch.randint(0, 3, (6,))

def agree():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), _batch(), nn.CrossEntropyLoss()

def differ():
    model, batch, loss_fn = agree()
    model[2].register_full_backward_hook(lambda m, gin, gout: (gin[0] * 3,))
    return model, batch, loss_fn

def wrong_width():  # the model expects 5 features, the batch has 4
    return nn.Sequential(nn.Linear(5, 3)), _batch(), nn.CrossEntropyLoss()

def out_of_range():  # class 7 with a 3-class output
    model, (x, y), loss_fn = agree()
    y[2] = 7
    return model, (x, y), loss_fn

def model_output():
    return ReturnsModelOutput(), _batch(), nn.CrossEntropyLoss()

def nan_loss():  # NaN on both sides: nothing to compare, not a disagreement
    model, (x, y), loss_fn = agree()
    x[0, 0] = float("nan")
    return model, (x, y), loss_fn
"""


@pytest.fixture
def failing_file(tmp_path):
    path = tmp_path / "failing_factories.py"
    path.write_text(textwrap.dedent(FAILING))
    return path


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """``gradscope ARGV`` in a child process, as a user runs it."""
    code = "import sys; from gradscope.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, cwd=REPO)


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_examples_exit_0_in_both_dtypes(dtype):
    # make: a CNN with a conv bias before BatchNorm, whose gradient is 0 in exact arithmetic (rounding
    # noise in float32); make_gpt: a GPT-style transformer.
    for factory in ("make", "make_gpt"):
        done = _cli("verify", f"examples/verify_backprop.py:{factory}", "--dtype", dtype)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "PASS: All " in done.stdout


@pytest.mark.parametrize(
    ("factory", "code", "expected"),
    [
        ("agree", 0, ["PASS: All 9 gradients agree."]),
        ("differ", 1, ["FAIL: ", "The disagreement starts at layer '2'"]),
        (
            "wrong_width",
            2,
            [
                "The model failed on the batch, before anything could be compared: RuntimeError: mat1 and mat2",
                "Check that the inputs fit the model",
            ],
        ),
        (
            "out_of_range",
            2,
            [
                "loss_fn(model(inputs), targets) failed",
                "The targets hold class indices from 0 to 7, but the model output has 3 classes",
            ],
        ),
        ("model_output", 2, ["it returned Output", "verify a wrapper whose forward returns `.logits`"]),
        ("nan_loss", 2, ["NOT COMPARABLE: ", "the loss is NaN or infinite on both sides"]),
    ],
)
def test_exit_codes_in_a_child_process(failing_file, factory, code, expected):
    done = _cli("verify", f"{failing_file}:{factory}")
    out = done.stdout + done.stderr
    assert done.returncode == code, out
    for text in expected:
        assert text in out
    assert "Traceback" not in out  # the user's error summarised, not a raw traceback
