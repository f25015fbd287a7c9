"""The third-party model and trainer examples run (fewer steps) and print what they promise.

They run in this process (``main(argv)``), so the frameworks are imported once for all of them.
"""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, argv: list[str], capsys) -> str:
    main = runpy.run_path(str(EXAMPLES / name), run_name=f"example_{name[:-3]}")["main"]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_hf_gpt2(capsys):
    pytest.importorskip("transformers")
    out = run_example("hf_gpt2.py", ["--steps", "6"], capsys)
    assert "tied: transformer.wte+lm_head (one parameter, counted once)" in out
    ours, theirs = re.search(r"parameters: ([\d,]+) \(model.num_parameters\(\) = ([\d,]+)\)", out).groups()
    assert ours == theirs
    assert all(f"transformer.h.{i} " in out for i in range(3))  # one row per block


def test_hf_bert(capsys):
    pytest.importorskip("transformers")
    out = run_example("hf_bert.py", ["--steps", "4"], capsys)
    assert "frozen (5): bert.embeddings.word_embeddings.weight" in out
    assert "bert.encoder.layer.1 " in out


def test_hf_llama_with_checkpointing(capsys):
    pytest.importorskip("transformers")
    out = run_example("hf_llama.py", ["--steps", "4", "--checkpointing"], capsys)
    assert "layers in forward order: model.embed_tokens, model.layers.0.input_layernorm, " in out
    assert "self_attn.k_proj" in out


def test_cnn_resnet(capsys):
    pytest.importorskip("transformers")
    out = run_example("cnn_resnet.py", ["--steps", "6"], capsys)
    assert "model.resnet.encoder.stages.2 " in out
    assert "model.resnet.encoder.stages.0.layers.0.activation" in out  # dead-channel table


def test_lightning_callback(capsys):
    pytest.importorskip("lightning")
    out = run_example("lightning_callback.py", ["--epochs", "1"], capsys)
    n, m = re.search(r"optimizer steps: (\d+), gradscope steps: (\d+)", out).groups()
    assert n == m == "16"  # 1024 samples / 32 per batch / 2 accumulated
    assert "validation loss: none recorded yet" in out  # one epoch: its validation has no step after it


def test_hf_trainer_callback(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run_example("hf_trainer_callback.py", ["--steps", "4"], capsys)
    n, m = re.search(r"optimizer steps: (\d+), gradscope steps: (\d+)", out).groups()
    assert n == m == "4"
    assert re.search(r"eval loss: [\d.]+ \(step 2\), [\d.]+ \(step 4\)", out)
