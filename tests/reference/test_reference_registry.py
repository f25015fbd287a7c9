"""The reference registry: every built-in reference has a test case, and registration is strict."""

from __future__ import annotations

import pytest
import torch
from reference_cases import CASES, build
from torch import nn

import gradscope
from gradscope.errors import RegistryError
from gradscope.reference import LossReference, ReferenceLayer, manual_backward
from gradscope.reference.linear import LinearReference
from gradscope.reference.losses import FUNCTIONAL_LOSSES
from gradscope.registry import REFERENCES


def _builtin_types():
    return {t for t, cls in REFERENCES.items() if cls.__module__.startswith("gradscope.")}


def _covered_types():
    covered = set()
    for c in CASES:
        model, _, _ = build(c)
        covered |= {type(m) for m in model.modules()}
        loss = c["loss"]
        covered.add(type(loss) if isinstance(loss, nn.Module) else FUNCTIONAL_LOSSES.get(getattr(loss, "func", loss)))
    return covered


def test_every_builtin_reference_has_a_case():
    missing = sorted(t.__name__ for t in _builtin_types() - _covered_types())
    assert not missing, f"reference layers without a test case in tests/reference/reference_cases.py: {missing}"


def test_the_documented_layers_are_registered():
    expected = {
        nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh,
        nn.Sigmoid, nn.Softmax, nn.LogSoftmax, nn.Dropout, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d,
        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Sequential,
        gradscope.reference.Residual, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
        nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.NLLLoss,
        # issue 15: recurrent layers, decoders, norms, convolutions, resampling, activations, losses
        nn.RNN, nn.LSTM, nn.GRU, gradscope.reference.Recurrent, nn.TransformerDecoderLayer, nn.TransformerDecoder,
        nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm, nn.BatchNorm3d,
        nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
        nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d, nn.AdaptiveMaxPool2d, nn.EmbeddingBag,
        nn.ELU, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Softplus, nn.Mish, nn.Dropout2d,
        nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.KLDivLoss, nn.BCELoss,
    }  # fmt: skip
    assert expected <= _builtin_types()
    for module_type in expected:
        cls = REFERENCES.get(module_type)
        assert issubclass(cls, LossReference if module_type.__name__.endswith("Loss") else ReferenceLayer)


def test_register_reference_rejects_what_is_not_a_reference():
    class Mine(nn.Module):
        pass

    with pytest.raises(RegistryError, match=r"must decorate a subclass of gradscope\.reference\.ReferenceLayer"):
        gradscope.register_reference(Mine)(object)
    with pytest.raises(RegistryError, match="Pass the class, not an instance"):
        gradscope.register_reference(nn.Linear(2, 2))
    assert Mine not in REFERENCES


def test_duplicate_registration_needs_overwrite():
    with pytest.raises(RegistryError, match=r"already registered.*overwrite=True"):
        gradscope.register_reference(nn.Linear)(LinearReference)


def test_overwriting_a_builtin_is_used_and_can_be_undone():
    calls = []

    class CountingLinear(LinearReference):
        def backward(self, grad_out):
            calls.append(self.path)
            return super().backward(grad_out)

    gradscope.register_reference(nn.Linear, overwrite=True)(CountingLinear)
    try:
        model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
        manual_backward(
            model, torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), nn.MSELoss()
        )
    finally:
        gradscope.register_reference(nn.Linear, overwrite=True)(LinearReference)
    assert calls == ["2", "0"]  # backward order: last layer first
