"""Three gradient bugs people actually hit, planted on purpose, and how gradscope.verify names each one.

(a) A custom ``torch.autograd.Function`` whose backward forgets a term of the product rule.
(b) A hook that rescales a gradient: on a module's backward, or on a parameter.
(c) An in-place write through ``.data`` into a tensor autograd saved for backward: the forward value is
    right, the version counter does not notice, and the gradient is silently wrong.

Every bug leaves the loss and the forward outputs unchanged, so training "works"; only the gradients
differ. Exit status 0 when every bug is caught at the right layer.

    python examples/verify_planted_bugs.py
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import gradscope
from gradscope.reference import ReferenceLayer
from gradscope.reference.activations import SiLUReference


# (a) ---------------------------------------------------------------------------------------------
class _SwishFunction(torch.autograd.Function):
    """swish(x) = x σ(x), with a hand-written (and wrong) backward."""

    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(s)
        return x * s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad * s  # BUG: the product rule gives σ + x σ (1 - σ)


class Swish(nn.Module):
    def forward(self, x):
        return _SwishFunction.apply(x)


@gradscope.register_reference(Swish)
class SwishReference(ReferenceLayer):
    """What Swish should compute: y = x σ(x), dy/dx = σ (1 + x (1 - σ))."""

    def forward(self, x):
        self.x, self.s = x, torch.sigmoid(x)
        return x * self.s

    def backward(self, grad_out):
        return grad_out * self.s * (1 + self.x * (1 - self.s)), {}


# (c) ---------------------------------------------------------------------------------------------
class ClampedSiLU(nn.Module):
    """x σ(x), then the gate is clamped in place "for stability", through .data."""

    def forward(self, x):
        gate = torch.sigmoid(x)  # saved by autograd for the backward of sigmoid and of the product
        y = x * gate
        gate.data.clamp_(0.05, 0.95)  # BUG: rewrites the saved gate after it was used
        return y


gradscope.register_reference(ClampedSiLU)(SiLUReference)  # its intended math is SiLU's


def mlp(middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), middle, nn.Linear(16, 3))


def check(title: str, model: nn.Module, expected: str) -> bool:
    torch.manual_seed(1)
    inputs, targets = 3 * torch.randn(8, 4), torch.randint(0, 3, (8,))
    report = gradscope.verify(model, inputs, targets, nn.CrossEntropyLoss())
    print(f"--- {title}")
    print(report, end="\n\n")
    first = report.first_mismatch
    return first is not None and first.name == expected


def main() -> int:
    caught = [check("(a) custom autograd.Function with a wrong backward, at layer '1'", mlp(Swish()), "1")]

    model = mlp(nn.Tanh())
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 0.1,))
    caught.append(check("(b) a backward hook that scales the gradient into layer '2' by 0.1", model, "2"))

    model = mlp(nn.Tanh())
    model[0].bias.register_hook(lambda grad: grad.clamp(-1e-3, 1e-3))
    caught.append(check("(b) a parameter hook that clips the gradient of '0.bias'", model, "0.bias"))

    caught.append(
        check("(c) an in-place write through .data into a saved tensor, at layer '1'", mlp(ClampedSiLU()), "1")
    )

    print(f"caught {sum(caught)} of {len(caught)} planted bugs at the right layer")
    return 0 if all(caught) else 1


if __name__ == "__main__":
    sys.exit(main())
