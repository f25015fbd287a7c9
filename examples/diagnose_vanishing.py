"""Diagnose vanishing gradients, fix them, and check the fix: the rules' findings read as evidence.

Run:  python examples/diagnose_vanishing.py     (a few seconds on a CPU)

A deep stack of sigmoids multiplies the backward signal by at most 0.25 per layer, so the gradient
that reaches the first layers is orders of magnitude below the head's: they barely learn.
gradscope's ``vanishing_gradients`` rule compares each layer's gradient RMS with the layers after it
at every step, names the layer where the collapse begins, and backs the finding with the ratios.
The same network with ReLU and He initialisation trains cleanly: the report has no findings.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope


def deep_net(act: type[nn.Module], depth: int = 8, width: int = 48, he_init: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 16
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if he_init:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
        d = width
    layers.append(nn.Linear(d, 4))
    return nn.Sequential(*layers)


def train(model: nn.Module, steps: int = 60, **watch_options: object) -> gradscope.Report:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 4, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with gradscope.watch(model, optimizer=opt, **watch_options) as scope:
        for _ in range(steps):
            x = torch.randn(64, 16, generator=g)
            loss = F.cross_entropy(model(x), (x @ teacher).argmax(dim=1))
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    return scope.report()


def main() -> int:
    torch.manual_seed(0)
    broken = train(deep_net(nn.Sigmoid))
    (vanishing,) = [f for f in broken.findings if f.kind == "vanishing_gradients"]
    print("=== 8 sigmoid layers, default init ===")
    print(f"{vanishing.severity}: {vanishing.kind} in {vanishing.layer!r} from step {vanishing.step}")
    print(vanishing.message)
    print("try:", vanishing.suggestion)
    print("gradient RMS / largest RMS of the layers after it:")
    for layer, ratio in vanishing.evidence["ratio_to_later_max"].items():
        print(f"  layer {layer:>3}  {ratio:.1e}")

    # The threshold is a per-watch setting: stricter here, so only the deepest collapse counts.
    torch.manual_seed(0)
    strict = train(deep_net(nn.Sigmoid), thresholds={"vanishing_gradients": {"ratio": 1e-6}})
    (tight,) = [f for f in strict.findings if f.kind == "vanishing_gradients"]
    print(f"\nwith ratio=1e-6 the collapse is named from layer {tight.layer!r}: {tight.evidence['collapsed_layers']}")

    torch.manual_seed(0)
    fixed = train(deep_net(nn.ReLU, he_init=True))
    print("\n=== the same depth with ReLU and He init ===")
    print(fixed)
    assert not any(f.kind == "vanishing_gradients" for f in fixed.findings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
