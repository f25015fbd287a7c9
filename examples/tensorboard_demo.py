"""Everything gradscope writes to TensorBoard, on a network whose early layers barely learn.

A 12-layer sigmoid MLP (5 blocks of two layers between an input and an output layer) with the default initialisation: each sigmoid
multiplies the backward signal by at most 0.25, so the gradient reaching the first block is orders
of magnitude smaller than the last one's. Run it, then look::

    python examples/tensorboard_demo.py --log-dir runs/demo
    tensorboard --logdir runs            # Custom Scalars, Histograms, Images and Text dashboards
    gradscope report runs/demo           # the self-contained HTML summary (also written by this script)

Besides the built-in rules, the run uses one rule written here (``SmallGradients``), to show how a
rule of your own plugs in: it flags layers whose gradient RMS stays far below the largest layer's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

import gradscope
from gradscope.views.html import write_html


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.act1 = nn.Sigmoid()
        self.fc2 = nn.Linear(d, d)
        self.act2 = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.fc2(self.act1(self.fc1(x))))


class DeepSigmoidNet(nn.Module):
    def __init__(self, d_in: int = 16, d: int = 32, blocks: int = 5, d_out: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class SmallGradients(gradscope.Rule):
    """Demo rule: a layer whose gradient RMS stays below ``ratio`` times the largest layer's.

    Definition: over the last ``window`` recorded steps, ``rms(layer) < ratio * max over layers of rms``
    at every step. A simpler cousin of the built-in ``vanishing_gradients`` rule, written here to show
    the extension point: a class with ``name``, ``requires``, ``defaults`` and ``check``.
    """

    name = "small_gradients"
    severity = "warning"
    requires = ("rms",)
    defaults: ClassVar[dict[str, float]] = {"ratio": 1e-6, "window": 20}

    def check(self, ctx: gradscope.RuleContext) -> list[gradscope.Finding]:
        window = int(self.thresholds["window"])
        rms = ctx.frame.layer_values("rms")  # [S, L]
        if len(rms) < window:
            return []
        recent = rms[-window:]
        top = np.nanmax(recent, axis=1, keepdims=True)
        small = np.all(recent < self.thresholds["ratio"] * top, axis=0)
        first = int(ctx.steps[len(rms) - window])
        found = []
        for li in ctx.forward_order:
            if small[li]:
                layer = ctx.layers[li]
                ratio = float(np.nanmedian(recent[:, li] / top[:, 0]))
                found.append(
                    self.finding(
                        step=first,
                        layer=layer,
                        message=(
                            f"The gradient RMS of {layer!r} stayed below {self.thresholds['ratio']:g} of the largest "
                            f"layer's for {window} steps (median ratio {ratio:.1e}): it barely learns."
                        ),
                        suggestion="Use ReLU/GELU instead of sigmoid, He initialisation, normalisation or residual "
                        "connections.",
                        evidence={
                            "stat": "rms",
                            "value": ratio,
                            "threshold": self.thresholds["ratio"],
                            "window": window,
                        },
                    )
                )
        return found


def main(argv: list[str] | None = None) -> gradscope.Report:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-dir", default="runs/tensorboard_demo", help="the TensorBoard run to write")
    # GRADSCOPE_EXAMPLE_FAST: the test suite runs every example; a short run shows the same things
    ap.add_argument("--steps", type=int, default=60 if os.environ.get("GRADSCOPE_EXAMPLE_FAST") else 400)
    ap.add_argument("--histogram-every", type=int, default=50)
    ap.add_argument("--figure-every", type=int, default=100)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = DeepSigmoidNet()
    teacher = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    log_dir = Path(args.log_dir)
    with gradscope.watch(
        model,
        optimizer=opt,
        log_dir=log_dir,
        rules=["all", SmallGradients()],
        histogram_every=args.histogram_every,
        histogram_weights=True,
        figure_every=args.figure_every,
    ) as scope:
        for step in range(args.steps):
            x = torch.randn(64, 16, generator=gen)
            with torch.no_grad():
                y = teacher(x)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            val_loss = None
            if step % 25 == 0:
                with torch.no_grad():
                    xv = torch.randn(256, 16, generator=gen)
                    val_loss = nn.functional.mse_loss(model(xv), teacher(xv))
            scope.step(loss=loss, val_loss=val_loss, lr=opt.param_groups[0]["lr"])
            opt.zero_grad()
    report = scope.report()
    print(report)
    report.to_json(log_dir / "report.json", indent=1)
    html = write_html(report, log_dir / "gradscope-report.html", source=str(log_dir))
    print(f"\nTensorBoard run: {log_dir}  (tensorboard --logdir {log_dir.parent})")
    print(f"HTML summary:    {html}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
