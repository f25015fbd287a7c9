"""Modules without a reference: a precise error by default, a finite-difference check on request."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.reference import manual_backward

D = torch.float64


class MyGate(nn.Module):
    """y = x σ(w x) with a learned per-feature w: a user layer gradscope has no reference for."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x):
        return x * torch.sigmoid(self.w * x)


class Net(nn.Module):
    """A model with a custom forward: opaque to the reference walk."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).relu()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Tanh(), MyGate(6)), nn.Linear(6, 3)).double()


def _batch(n=8):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=D), torch.randint(0, 3, (n,))


def test_error_names_path_type_supported_layers_and_fixes():
    with pytest.raises(gradscope.UnsupportedLayerError) as info:
        gradscope.verify(_model(), *_batch(), nn.CrossEntropyLoss(), on_unsupported="error")
    message = str(info.value)
    assert message.startswith("No reference backward for module '1.1' (MyGate). Supported: ")
    assert "BatchNorm1d, " in message and "Linear, " in message and "TransformerEncoderLayer" in message
    assert "CrossEntropyLoss" not in message  # losses are not layers
    assert (
        "Register one with @gradscope.register_reference(MyGate), or pass on_unsupported='finite_difference'."
        in message
    )


def test_custom_forward_at_the_root_gets_a_hint():
    with pytest.raises(gradscope.UnsupportedLayerError, match=r"the model itself \(Net\).*self\.child\(name\)"):
        manual_backward(Net().double(), *_batch(), nn.CrossEntropyLoss())


def test_unsupported_configuration_of_a_supported_type():
    model = nn.Sequential(nn.Upsample(scale_factor=2, mode="bicubic"), nn.Flatten(), nn.Linear(16, 2)).double()
    x, y = torch.randn(3, 1, 2, 2, dtype=D), torch.randint(0, 2, (3,))
    with pytest.raises(gradscope.UnsupportedLayerError, match="mode='bicubic'"):
        gradscope.verify(model, x, y, nn.CrossEntropyLoss(), on_unsupported="error")
    report = gradscope.verify(model, x, y, nn.CrossEntropyLoss(), on_unsupported="finite_difference")
    assert report.ok, str(report)
    assert {c.name for c in report.gradients if c.method == "finite_difference"} == {"0"}


def test_finite_difference_checks_a_healthy_module_by_default_jointly_over_its_tensors():
    report = gradscope.verify(_model(), *_batch(2), nn.CrossEntropyLoss())  # numerical is the default

    assert report.ok, str(report)
    sampled = {c.name: c for c in report.gradients if c.method == "finite_difference"}
    assert set(sampled) == {"1.1", "1.1.w"}
    assert sampled["1.1"].compared == 4  # fd_directions, over the input's 12 and w's 6 entries together
    assert sampled["1.1"].detail == "4 random sign directions over 18 entries, jointly with 1 other tensor of '1.1'"
    assert all(c.method == "reference" for c in report.gradients if c.name.startswith("0"))


def test_finite_difference_samples_large_inputs_and_continues_from_autograd():
    report = gradscope.verify(
        _model(), *_batch(32), nn.CrossEntropyLoss(), on_unsupported="finite_difference", fd_directions=10, seed=3
    )
    assert report.ok, str(report)
    gate = next(c for c in report.gradients if c.name == "1.1")
    assert gate.compared == 10
    assert any("starting from autograd's gradient" in note for note in report.notes)


def test_finite_difference_sample_is_seeded():
    def sampled(seed):
        report = gradscope.verify(
            _model(), *_batch(32), nn.CrossEntropyLoss(), on_unsupported="finite_difference", seed=seed
        )
        return next(c.abs_error for c in report.gradients if c.name == "1.1")

    assert sampled(0) == sampled(0)
    assert sampled(0) != sampled(1)


def test_finite_difference_replays_dropout_inside_an_unsupported_module():
    class NoisyGate(MyGate):
        def forward(self, x):
            return nn.functional.dropout(super().forward(x), 0.5, training=self.training)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), NoisyGate(3), nn.Linear(3, 2)).double().train()
    report = gradscope.verify(
        model,
        torch.randn(4, 4, dtype=D),
        torch.randint(0, 2, (4,)),
        nn.CrossEntropyLoss(),
        on_unsupported="finite_difference",
    )
    assert report.ok, str(report)


def test_loss_module_inside_the_model_is_a_configuration_error():
    model = nn.Sequential(nn.Linear(4, 3), nn.MSELoss()).double()
    with pytest.raises(gradscope.ConfigurationError, match="is a loss"):
        manual_backward(model, *_batch(), nn.CrossEntropyLoss())
