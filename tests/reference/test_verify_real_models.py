"""Real models verify clean with default options, in float64 and float32, and name what was checked numerically.

The models are ``benchmarks/verify_time.py``'s builders at tiny sizes: Hugging Face BERT, GPT-2 and Llama
built from configs (no download; skipped without ``transformers``), a torchvision-style ResNet, a U-Net
and an LSTM language model. Every one has layers without a reference (a custom ``forward``), which
verify checks with finite differences by default.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import gradscope

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import verify_time

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")

# (builder, tiny sizes, the layers checked numerically)
MODELS = {
    "bert": (verify_time.bert, {"hidden": 16, "layers": 1, "length": 6}, ["(model)"]),
    "gpt2": (verify_time.gpt2, {"hidden": 16, "layers": 1, "length": 6}, ["(model)"]),
    "llama": (verify_time.llama, {"hidden": 16, "layers": 1, "length": 6}, ["(model)"]),
    "resnet": (verify_time.resnet, {"blocks": 2, "width": 4, "batch": 4, "size": 8}, ["3", "4"]),
    "unet": (verify_time.unet, {"width": 4, "size": 8}, ["(model)"]),
    "lstm": (verify_time.lstm_lm, {"hidden": 8, "length": 6}, ["(model)"]),
}


def _params(names):
    marks = {name: [needs_transformers] if name in ("bert", "gpt2", "llama") else [] for name in names}
    return [
        pytest.param(name, dtype, marks=marks[name], id=f"{name}-{str(dtype)[6:]}")
        for name in names
        for dtype in (torch.float64, torch.float32)
    ]


@pytest.mark.parametrize(("name", "dtype"), _params(MODELS))
def test_real_model_verifies_clean_and_names_the_numerical_layers(name, dtype):
    builder, sizes, numerical = MODELS[name]
    model, x, y, loss_fn = builder(**sizes)
    report = gradscope.verify(model, x, y, loss_fn, dtype=dtype)

    assert report.ok and report.comparable, str(report)
    assert verify_time.numerical_layers(report) == numerical
    assert "checked only numerically, by finite differences" in report.summary()
    for layer in numerical:
        assert f"'{layer}'" in report.summary()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {c.name for c in report.gradients if c.kind == "parameter"} == trainable  # every one compared


@needs_transformers
def test_bert_padding_row_is_left_out_and_said_so():
    model, x, y, loss_fn = verify_time.bert(hidden=16, layers=1, length=6)
    report = gradscope.verify(model, x, y, loss_fn)
    row = next(c for c in report.gradients if c.name.endswith("word_embeddings.weight"))
    assert "padding_idx row" in row.detail


@needs_transformers
def test_llama_says_its_norm_computes_in_float32():
    model, x, y, loss_fn = verify_time.llama(hidden=16, layers=1, length=6)
    report = gradscope.verify(model, x, y, loss_fn)
    assert report.ok, str(report)
    assert any("computes internally in float32" in note for note in report.notes)


@needs_transformers
def test_a_wrong_gradient_inside_a_hugging_face_model_is_caught():
    model, x, y, loss_fn = verify_time.gpt2(hidden=16, layers=1, length=6)
    mlp = model.model.transformer.h[0].mlp.c_fc
    mlp.weight.register_hook(lambda grad: grad * 1.01)  # a 1% error in one weight's gradient
    report = gradscope.verify(model, x, y, loss_fn)
    assert not report.ok
    assert [c.name for c in report.mismatches] == ["model.transformer.h.0.mlp.c_fc.weight"]
