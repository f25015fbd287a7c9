"""gradscope in one minute: watch two training runs, one healthy and one broken, and read the findings.

Run:  python examples/quickstart.py            (writes TensorBoard logs to runs/quickstart)
Then: tensorboard --logdir runs/quickstart      (optional: look at the dashboards)

Both runs train a small classifier on synthetic data made here (no download). The second one is
broken the classic way: a deep stack of sigmoids with a small initialisation, so the gradient
vanishes before it reaches the first layers. gradscope names the layer where it happens.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

import gradscope


def make_data(n: int = 2048, d: int = 20, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic task: labels from a random nonlinear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, classes, generator=g)
    y = (torch.tanh(x @ teacher) + 0.1 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return x, y


def healthy_model(d: int = 20, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))


def broken_model(d: int = 20, classes: int = 4, depth: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    width = d
    for _ in range(depth):
        lin = nn.Linear(width, 64)
        nn.init.normal_(lin.weight, std=0.05)  # far below Xavier's 1/sqrt(fan_in): signal and gradient shrink
        layers += [lin, nn.Sigmoid()]
        width = 64
    layers.append(nn.Linear(64, classes))
    return nn.Sequential(*layers)


def train(name: str, model: nn.Module, log_dir: str, steps: int, seed: int = 0) -> gradscope.Report:
    torch.manual_seed(seed)
    x, y = make_data(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    with gradscope.watch(model, optimizer=opt, log_dir=os.path.join(log_dir, name)) as scope:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    return scope.report()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-dir", default="runs/quickstart")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)

    for name, build in (("healthy", healthy_model), ("broken", broken_model)):
        torch.manual_seed(0)  # the same initial weights at every run
        report = train(name, build(), args.log_dir, args.steps)
        print(f"=== {name} run ===")
        print(report)
        print()
    print(f"TensorBoard logs: {args.log_dir}  (tensorboard --logdir {args.log_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
