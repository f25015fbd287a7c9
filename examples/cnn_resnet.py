"""Watch a ResNet that no one here wrote: gradients per stage, dead ReLU channels, BatchNorm layers.

Run:  python examples/cnn_resnet.py [--backend transformers|torchvision|timm] [--steps 20]
Needs: pip install 'gradscope[hf]' (default backend), or torchvision / timm

The ResNet comes from transformers (``ResNetForImageClassification`` from a small ``ResNetConfig``,
default), torchvision (``resnet18``) or timm (``resnet18``), always with random weights: nothing is
downloaded. torchvision (and timm, which imports it) must be the build made for the installed torch;
a mismatched wheel fails at import with "operator torchvision::nms does not exist".
Data: 32x32 images whose class is the colour channel with the brightest centre.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn

import gradscope

CLASSES = 3

FAST = os.environ.get("GRADSCOPE_EXAMPLE_FAST") == "1"  # the test suite runs every example: fewer steps


def make_model(backend: str) -> tuple[nn.Module, str]:
    """The model and the regular expression that names a stage in its layer paths."""
    torch.manual_seed(0)
    if backend == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        config = transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic", num_labels=CLASSES
        )
        model = transformers.ResNetForImageClassification(config)
        return _LogitsOf(model), r"^(model\.resnet\.encoder\.stages\.\d+)\."
    if backend == "torchvision":
        import torchvision

        return torchvision.models.resnet18(num_classes=CLASSES), r"^(layer\d)\."
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=CLASSES), r"^(layer\d)\."


class _LogitsOf(nn.Module):
    """transformers models return an output object; the loop below wants the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def batch(g: torch.Generator, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x[torch.arange(n), y, 12:20, 12:20] += 0.5  # the label is the channel with the bright centre
    return x, y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["transformers", "torchvision", "timm"], default="transformers")
    ap.add_argument("--steps", type=int, default=6 if FAST else 20)
    ap.add_argument("--log-dir", default=None, help="also write a TensorBoard run here")
    args = ap.parse_args(argv)

    model, stage = make_model(args.backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    # sample_every=5: activation statistics (dead ReLU channels) on steps 1, 6, 11, 16
    with gradscope.watch(model, optimizer=opt, log_dir=args.log_dir, sample_every=5) as scope:
        for _ in range(args.steps):
            x, y = batch(g)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    report = scope.report()

    print(report)
    df = report.stats
    grads = df.query("stat == 'l2_norm' and param == '*' and layer != '*'")
    group = grads.layer.str.extract(stage, expand=False).fillna(grads.layer)
    per_stage = grads.assign(stage=group, sq=grads.value**2).groupby(["step", "stage"], sort=False).sq.sum().pow(0.5)
    print("\ngradient l2 norm per stage (first and last step):")
    print(per_stage.unstack("stage").iloc[[0, -1]].T.to_string(float_format=lambda v: f"{v:.3g}"))
    dead = df.query("stat == 'act_dead_fraction'").groupby("layer", sort=False).value.max()
    print("\nlargest fraction of ReLU channels dead on a whole batch, per activation:")
    print(dead.to_string(float_format=lambda v: f"{v:.2f}"))
    loss = report.scalars["loss"]
    print(f"\nloss: {loss.iloc[:3].mean():.3f} -> {loss.iloc[-3:].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
