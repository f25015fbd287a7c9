"""Check autograd's gradients against gradscope's reference manual backprop, layer by layer.

Three healthy models are verified in float64: a small residual CNN, a transformer language model built
from nn.TransformerEncoderLayer, and a GPT-style causal block built from Residual and SelfAttention.
Then a planted bug (a backward hook that halves a gradient) is shown being caught.

    python examples/verify_backprop.py
    gradscope verify examples/verify_backprop.py:make          # the same CNN check from the shell
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import gradscope
from gradscope.reference import Residual, SelfAttention


def make():
    """A residual CNN on a batch of 8x8 images (the factory the CLI calls)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.GELU())),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8, 5),
    )
    inputs, targets = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    return model, (inputs, targets), nn.CrossEntropyLoss(label_smoothing=0.1)


def make_transformer():
    """A one-block pre-norm transformer language model: next-token logits for every position."""
    torch.manual_seed(0)
    vocab, width, length = 11, 16, 6
    model = nn.Sequential(
        nn.Embedding(vocab, width),
        nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True),
        nn.LayerNorm(width),
        nn.Linear(width, vocab),
        nn.Flatten(0, 1),  # [N, L, vocab] -> [N·L, vocab]: one prediction per position
    )
    tokens = torch.randint(0, vocab, (3, length))
    return model, (tokens, torch.randint(0, vocab, (3 * length,))), nn.CrossEntropyLoss()


def make_gpt():
    """A GPT-style language model: pre-norm residual blocks with causal self-attention."""
    torch.manual_seed(0)
    vocab, width, length = 11, 16, 6

    def block():
        return nn.Sequential(
            Residual(nn.Sequential(nn.LayerNorm(width), SelfAttention(width, 4, causal=True))),
            Residual(
                nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            ),
        )

    model = nn.Sequential(nn.Embedding(vocab, width), block(), block(), nn.LayerNorm(width), nn.Linear(width, vocab))
    model.append(nn.Flatten(0, 1))
    tokens = torch.randint(0, vocab, (2, length))
    return model, (tokens, torch.randint(0, vocab, (2 * length,))), nn.CrossEntropyLoss()


def main() -> int:
    healthy = True
    for factory in (make, make_transformer, make_gpt):
        model, (inputs, targets), loss_fn = factory()
        report = gradscope.verify(model, inputs, targets, loss_fn)
        print(report, end="\n\n")
        healthy &= report.ok

    # A planted bug: a backward hook that halves the gradient flowing into the classifier's input.
    model, (inputs, targets), loss_fn = make()
    model[8].register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 0.5,))
    report = gradscope.verify(model, inputs, targets, loss_fn)
    print("With a gradient-halving hook on layer '8':")
    print(report.summary())
    assert not report.ok and report.first_mismatch.name == "8", "verify missed the planted hook"
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
