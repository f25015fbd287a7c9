"""CNNs that no one here wrote, watched in training: transformers' ResNet, and torchvision / timm where they import.

torchvision and timm are tried first-hand: where the installed torchvision wheel does not match the
installed torch (a CUDA build of torchvision beside a CPU build of torch fails at import with
"operator torchvision::nms does not exist", and timm imports torchvision), those tests are skipped
with the import error as the reason. transformers' own ResNet (pure PyTorch) runs everywhere.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType
from typing import Callable

import pytest
import torch
import torch.nn as nn

import gradscope

# Models are built from small configs with random weights: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

STEPS, SAMPLE_EVERY = 6, 3


def _import_or_skip(name: str) -> ModuleType:
    # importorskip only catches ImportError; a torchvision built for another torch raises RuntimeError.
    try:
        return importlib.import_module(name)
    except Exception as exc:
        pytest.skip(f"{name} cannot be imported beside torch {torch.__version__}: {type(exc).__name__}: {exc}")


def _layer_of(model: nn.Module) -> dict[int, str]:
    out: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            out.setdefault(id(p), []).append(path)
    return {k: "+".join(v) for k, v in out.items()}


def _train(model: nn.Module, loss_of: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], acts=()):
    """SGD with momentum under watch; float64 per-layer reference and our own activation hooks."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    layer_of = _layer_of(model)
    refs, act_ref, handles = [], {}, []
    for path in acts:

        def hook(module, args, out, path=path):
            if path not in act_ref:  # first forward of step 1: fraction <= 0, and channels dead on the whole batch
                inactive = out.detach() <= 0
                act_ref[path] = (
                    float(inactive.double().mean()),
                    float(inactive.transpose(0, 1).flatten(1).all(dim=1).double().mean()),
                )

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    with gradscope.watch(model, optimizer=opt, sample_every=SAMPLE_EVERY) as scope:
        for _ in range(STEPS):
            x = torch.randn(8, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            loss = loss_of(model, x, y)
            for h in handles:
                h.remove()
            handles.clear()
            loss.backward()
            ref: dict[str, float] = {}
            for p in model.parameters():
                ref[layer_of[id(p)]] = ref.get(layer_of[id(p)], 0.0) + float(p.grad.double().pow(2).sum())
            refs.append(ref)
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    return scope.report(), refs, act_ref


def _check_l2(report: gradscope.Report, refs: list[dict[str, float]]) -> None:
    df = report.stats
    l2 = df[(df.stat == "l2_norm") & (df.param == "*")].set_index(["step", "layer"]).value
    bad = []
    for step, ref in enumerate(refs, start=1):
        for layer, v in {**ref, "*": sum(ref.values())}.items():
            if not math.isclose(l2[(step, layer)], math.sqrt(v), rel_tol=1e-5):
                bad.append(f"step {step} {layer}: {l2[(step, layer)]} vs {math.sqrt(v)}")
    assert not bad, "\n".join(bad)


def test_transformers_resnet():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10
    )
    model = transformers.ResNetForImageClassification(cfg)
    acts = (
        "resnet.embedder.embedder.activation",
        "resnet.encoder.stages.0.layers.0.layer.0.activation",
        "resnet.encoder.stages.1.layers.0.activation",  # after the residual addition
    )
    report, refs, act_ref = _train(model, lambda m, x, y: m(pixel_values=x, labels=y).loss, acts)
    _check_l2(report, refs)
    layers = set(report.stats.layer) - {"*"}
    stage1 = sorted(x.removeprefix("resnet.encoder.stages.1.layers.0.") for x in layers if ".stages.1." in x)
    assert stage1 == [
        "activation",
        "layer.0.activation",
        "layer.0.convolution",
        "layer.0.normalization",
        "layer.1.convolution",
        "layer.1.normalization",
        "shortcut.convolution",  # the projection shortcut of a stage that changes width
        "shortcut.normalization",
    ]
    assert "classifier.1" in layers
    order = report.meta["layers_by_depth"]
    assert order[0] == "resnet.embedder.embedder.convolution" and order[-1] == "classifier.1"
    for path, (zero, dead) in act_ref.items():
        assert math.isclose(
            report.stats.query(f"step == 1 and layer == '{path}' and stat == 'act_zero_fraction'").value.item(),
            zero,
            rel_tol=1e-6,
        )
        assert math.isclose(
            report.stats.query(f"step == 1 and layer == '{path}' and stat == 'act_dead_fraction'").value.item(),
            dead,
            abs_tol=1e-9,
        )
    assert report.findings == [], "\n".join(str(f) for f in report.findings)


def test_torchvision_resnet18():
    torchvision = _import_or_skip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)  # random init: weights=None is the default
    report, refs, _ = _train(model, lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    _check_l2(report, refs)
    layers = set(report.stats.layer)
    assert {"conv1", "bn1", "layer1.0.conv1", "layer4.1.bn2", "layer2.0.downsample.0", "fc"} <= layers
    assert report.meta["layers_by_depth"][0] == "conv1"


def test_timm_resnet18():
    timm = _import_or_skip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    report, refs, _ = _train(model, lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    _check_l2(report, refs)
    assert {"conv1", "bn1", "layer1.0.conv1", "fc"} <= set(report.stats.layer)
