"""Broken models: each has a bug that `gradscope check` reports before any long run.

gradscope check examples/ci/broken_model.py:make                # exit 1: vanishing_gradients
gradscope check examples/ci/healthy_model.py:make --baseline examples/ci/profile.json   # exit 0
gradscope check examples/ci/broken_model.py:make --baseline examples/ci/profile.json    # exit 1
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import Classifier


def make():
    """The healthy classifier after an init change: weights ~ N(0, 0.01^2) instead of He.

    Each ReLU layer now scales its signal by about 0.01 * sqrt(64 / 2) = 0.06 instead of 1, so the gradient
    reaching the first layer is about 1e-5 of the head's (1e-6 vs 0.1 at init): the early layers do not learn.
    """
    model = Classifier(init_std=0.01)
    batch = (torch.randn(64, 32), torch.randint(0, 10, (64,)))
    return model, batch, F.cross_entropy, torch.optim.AdamW(model.parameters(), lr=1e-3)


class TwoHeads(nn.Module):
    """A classifier with an auxiliary head that the forward pass computes but never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Classifier()
        self.aux = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        _aux = self.aux(logits.detach())  # the bug: detached and dropped, so `aux` never gets a gradient
        return logits


def make_unused_branch():
    """A new branch that never gets a gradient."""
    model = TwoHeads()
    return model, (torch.randn(64, 32), torch.randint(0, 10, (64,))), F.cross_entropy


def make_nan_batch():
    """The healthy classifier on an edge-case batch: one all-zero row, which its normalisation turns into NaN."""
    model = Classifier()
    x = torch.randn(64, 32)
    x[7] = 0.0
    return model, (x, torch.randint(0, 10, (64,))), F.cross_entropy
