"""verify on a CUDA model: same answers, dropout masks replayed from the CUDA generator (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.reference import Residual

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cnn_with_dropout_in_training_mode_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GELU())),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8, 5),
    ).cuda()
    x, y = torch.randn(4, 3, 8, 8, device="cuda"), torch.randint(0, 5, (4,), device="cuda")
    report = gradscope.verify(model.train(), x, y, nn.CrossEntropyLoss(label_smoothing=0.1))
    assert report.ok, str(report)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched


def test_transformer_and_finite_difference_on_cuda():
    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(11, 16),
        nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True),
        Gate(),
        nn.Linear(16, 11),
        nn.Flatten(0, 1),
    ).cuda()
    tokens = torch.randint(0, 11, (3, 6), device="cuda")
    report = gradscope.verify(
        model,
        tokens,
        torch.randint(0, 11, (18,), device="cuda"),
        nn.CrossEntropyLoss(),
        on_unsupported="finite_difference",
    )
    assert report.ok, str(report)
    assert any(c.method == "finite_difference" for c in report.gradients)
