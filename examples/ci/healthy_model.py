"""Healthy models for `gradscope check` and the gradscope pytest fixture.

    gradscope check examples/ci/healthy_model.py:make
    gradscope check examples/ci/healthy_model.py:make_transformer
    gradscope snapshot examples/ci/healthy_model.py:make -o examples/ci/profile.json

A factory returns (model, batch, loss_fn) or (model, batch, loss_fn, optimizer); gradscope seeds torch
before calling it, so random batches are reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nets import Classifier, TinyGPT, lm_loss


def make():
    """MLP classifier with He initialisation, a batch of 64, AdamW."""
    model = Classifier()
    batch = (torch.randn(64, 32), torch.randint(0, 10, (64,)))
    return model, batch, F.cross_entropy, torch.optim.AdamW(model.parameters(), lr=1e-3)


def make_transformer():
    """GPT-style transformer (4 blocks, d=64, 0.22M parameters), 8 sequences of 32 tokens."""
    model = TinyGPT()
    tokens = torch.randint(0, 256, (8, 33))
    return model, (tokens[:, :-1], tokens[:, 1:]), lm_loss
