"""Teach gradscope.verify a layer of your own: register its reference forward and backward.

``GatedMLP`` is the SwiGLU feed-forward block of LLaMA-style transformers, y = W₂ (silu(W₁ x) ⊙ W₃ x).
Its reference is composite: the three projections are ordinary ``nn.Linear`` children, reached with
``self.child(name)`` so their gradients are checked under their own names, and only the gating is
written out here, with its local derivatives beside the forward.

    python examples/verify_custom_layer.py
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import gradscope
from gradscope.reference import ReferenceLayer, Residual


class GatedMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


@gradscope.register_reference(GatedMLP)
class GatedMLPReference(ReferenceLayer):
    """y = W₂ h with h = silu(a) ⊙ b, a = W₁ x, b = W₃ x."""

    def forward(self, x):
        self.w1, self.w2, self.w3 = self.child("w1"), self.child("w2"), self.child("w3")
        a, self.b = self.w1.forward(x), self.w3.forward(x)
        self.a, self.s = a, torch.sigmoid(a)
        return self.w2.forward(a * self.s * self.b)  # silu(a) = a σ(a)

    def backward(self, grad_out):
        grad_h = self.w2.backward(grad_out)
        silu = self.a * self.s
        grad_b = grad_h * silu  # h = silu(a) ⊙ b: each factor's gradient is g times the other
        grad_a = grad_h * self.b * self.s * (1 + self.a * (1 - self.s))  # silu'(a) = σ (1 + a (1 - σ))
        # x feeds both W₁ and W₃: the two paths add up.
        return self.w1.backward(grad_a) + self.w3.backward(grad_b), {}


def main() -> int:
    torch.manual_seed(0)
    width = 8
    model = nn.Sequential(
        nn.Linear(5, width),
        Residual(nn.Sequential(nn.LayerNorm(width), GatedMLP(width, 24))),
        nn.LayerNorm(width),
        nn.Linear(width, 1),
    )
    inputs, targets = torch.randn(16, 5), torch.randn(16, 1)
    report = gradscope.verify(model, inputs, targets, nn.MSELoss())
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
