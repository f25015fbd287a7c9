"""Hugging Face transformers models that no one here wrote, watched in training.

GPT-2, BERT and Llama are built from small configs with random weights (nothing is downloaded) and
trained for a few steps on a learnable synthetic task (arithmetic progressions of token ids). Every
statistic asserted is compared with a reference computed here, in float64, from the very gradients
the optimizer used: per parameter, per layer, per transformer block and for the whole model, with
tied embeddings counted once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope

# Models are built from small configs with random weights: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, N_LAYER = 64, 16, 8, 2
STEPS = 24  # enough for the loss to fall clearly on the synthetic task
SAMPLE_EVERY = 4


# -- data ------------------------------------------------------------------------------------------------
def progressions(g: torch.Generator, batch: int = BATCH, max_stride: int = 3) -> torch.Tensor:
    """``[batch, SEQ]`` token ids ``(start + k * stride) % VOCAB``: predictable from context, so the loss falls."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    stride = torch.randint(0, max_stride + 1, (batch, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def masked_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(ids.sum()))
    masked = torch.rand(ids.shape, generator=g) < 0.3
    masked[:, 0] = True  # at least one label per row
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    return model(input_ids=torch.where(masked, torch.zeros_like(ids), ids), labels=labels).loss


# -- independent reference ---------------------------------------------------------------------------------
def owners(model: nn.Module) -> dict[int, tuple[nn.Parameter, str, str]]:
    """Each distinct parameter -> (tensor, layer key, leaf name), derived from ``named_modules`` here.

    The layer key is the path of every module that holds the tensor, in registration order, joined by
    "+" (DESIGN section 2): what gradscope must report, worked out without its code.
    """
    holders: dict[int, tuple[nn.Parameter, list[str], str]] = {}
    for path, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            entry = holders.setdefault(id(p), (p, [], leaf))
            if path not in entry[1]:
                entry[1].append(path)
    return {k: (p, "+".join(paths), leaf) for k, (p, paths, leaf) in holders.items()}


@dataclass
class StepRef:
    """float64 sums of squares and extremes of the gradients one optimizer step used."""

    param_sumsq: dict[tuple[str, str], float] = field(default_factory=dict)
    param_absmax: dict[tuple[str, str], float] = field(default_factory=dict)
    weights_before: dict[int, torch.Tensor] = field(default_factory=dict)
    update_sumsq: float = math.nan
    weight_sumsq: float = math.nan

    def layer_sumsq(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (layer, _), v in self.param_sumsq.items():
            out[layer] = out.get(layer, 0.0) + v
        return out

    def total(self) -> float:
        return sum(self.param_sumsq.values())


def reference_step(model: nn.Module, sampled: bool) -> StepRef:
    ref = StepRef()
    for key, (p, layer, leaf) in owners(model).items():
        if p.grad is None:
            continue
        g = p.grad.detach().double()
        ref.param_sumsq[(layer, leaf)] = float(g.pow(2).sum())
        ref.param_absmax[(layer, leaf)] = float(g.abs().max())
        if sampled:
            ref.weights_before[key] = p.detach().double().clone()
    return ref


def finish_reference(model: nn.Module, ref: StepRef) -> None:
    if not ref.weights_before:
        return
    params = {k: p for k, (p, _, _) in owners(model).items()}
    ref.update_sumsq = sum(float((params[k].detach().double() - w).pow(2).sum()) for k, w in ref.weights_before.items())
    ref.weight_sumsq = sum(float(w.pow(2).sum()) for w in ref.weights_before.values())
    ref.weights_before.clear()


# -- one watched run per model, shared by the assertions ----------------------------------------------------
@dataclass
class Run:
    model: nn.Module
    report: gradscope.Report
    refs: list[StepRef]
    losses: list[float]
    act_ref: dict[str, float] = field(default_factory=dict)

    def value(self, step: int, layer: str, param: str, stat: str) -> float:
        df = self.report.stats
        hit = df[(df.step == step) & (df.layer == layer) & (df.param == param) & (df.stat == stat)]
        assert len(hit) == 1, f"expected one row for step {step} {layer!r} {param!r} {stat}, got {len(hit)}"
        return float(hit.value.iloc[0])

    def layers(self) -> list[str]:
        df = self.report.stats
        return list(dict.fromkeys(df[(df.stat == "l2_norm") & (df.layer != "*")].layer))


def train(
    model: nn.Module,
    loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    *,
    steps: int = STEPS,
    seed: int = 0,
    lr: float = 3e-3,
    batch: int = BATCH,
    max_stride: int = 3,
    random_ids: bool = False,
    act_modules: tuple[str, ...] = (),
) -> Run:
    """Train with AdamW under ``watch``; record the reference gradients right before each ``opt.step()``."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    refs: list[StepRef] = []
    losses: list[float] = []
    act_ref: dict[str, float] = {}
    handles = []
    for path in act_modules:  # our own hook: fraction of outputs <= 0 in the first forward of step 1

        def hook(module, args, out, path=path):
            act_ref.setdefault(path, float((out.detach() <= 0).double().mean()))

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    with gradscope.watch(model, optimizer=opt, sample_every=SAMPLE_EVERY) as scope:
        for step in range(1, steps + 1):
            ids = (
                torch.randint(0, VOCAB, (batch, SEQ), generator=g) if random_ids else progressions(g, batch, max_stride)
            )
            loss = loss_of(model, ids)
            for h in handles:
                h.remove()
            handles.clear()
            loss.backward()
            refs.append(reference_step(model, sampled=(step - 1) % SAMPLE_EVERY == 0))
            opt.step()
            finish_reference(model, refs[-1])
            scope.step(loss=loss)
            losses.append(loss.item())
            opt.zero_grad(set_to_none=True)
    return Run(model, scope.report(), refs, losses, act_ref)


def tiny_gpt2(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=N_LAYER, n_head=2, bos_token_id=0, eos_token_id=0, **kw
    )
    return transformers.GPT2LMHeadModel(cfg)


def tiny_bert(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=N_LAYER,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        pad_token_id=0,
        **kw,
    )
    return transformers.BertForMaskedLM(cfg)


def tiny_llama(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYER,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k_proj and v_proj are narrower than q_proj
        max_position_embeddings=SEQ,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg)


BERT_ACTS = tuple(f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(N_LAYER))


@pytest.fixture(scope="module")
def gpt2() -> Run:
    return train(tiny_gpt2(), causal_lm_loss)


@pytest.fixture(scope="module")
def bert() -> Run:
    # hidden_act="relu": transformers builds an nn.ReLU, so dead-unit statistics are measured too. A small
    # post-LayerNorm BERT learns slowly: rows of one repeated token (fill in the masked copies), more rows.
    return train(tiny_bert(hidden_act="relu"), masked_lm_loss, lr=1e-2, batch=32, max_stride=0, act_modules=BERT_ACTS)


@pytest.fixture(scope="module")
def llama() -> Run:
    return train(tiny_llama(), causal_lm_loss)


RUNS = ["gpt2", "bert", "llama"]


# -- expected layers, written out by hand --------------------------------------------------------------------
def expected_layers(family: str) -> list[str]:
    if family == "gpt2":
        block = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
        return [
            "transformer.wte+lm_head",
            "transformer.wpe",
            *[f"transformer.h.{i}.{s}" for i in range(N_LAYER) for s in block],
            "transformer.ln_f",
        ]
    if family == "bert":
        block = [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ]
        return [
            "bert.embeddings.word_embeddings+cls.predictions.decoder",
            "bert.embeddings.position_embeddings",
            "bert.embeddings.token_type_embeddings",
            "bert.embeddings.LayerNorm",
            *[f"bert.encoder.layer.{i}.{s}" for i in range(N_LAYER) for s in block],
            "cls.predictions+cls.predictions.decoder",  # BERT ties the decoder's bias to predictions.bias
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
        ]
    block = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    ]
    return [
        "model.embed_tokens",
        *[f"model.layers.{i}.{s}" for i in range(N_LAYER) for s in block],
        "model.norm",
        "lm_head",
    ]


BLOCK_PREFIX = {"gpt2": "transformer.h.{}.", "bert": "bert.encoder.layer.{}.", "llama": "model.layers.{}."}


@pytest.mark.parametrize("family", RUNS)
def test_layers_are_module_paths_grouped_by_block(family, request):
    run: Run = request.getfixturevalue(family)
    assert sorted(run.layers()) == sorted(expected_layers(family))
    assert run.layers() == list(dict.fromkeys(layer for _, layer, _ in owners(run.model).values()))
    # every block holds the same sub-layers, and nothing else starts with its prefix
    suffixes = [
        sorted(
            layer.removeprefix(BLOCK_PREFIX[family].format(i))
            for layer in run.layers()
            if layer.startswith(BLOCK_PREFIX[family].format(i))
        )
        for i in range(N_LAYER)
    ]
    assert len(suffixes[0]) >= 6 and all(s == suffixes[0] for s in suffixes)


@pytest.mark.parametrize("family", RUNS)
def test_depth_order_follows_the_forward_pass(family, request):
    run: Run = request.getfixturevalue(family)
    order = run.report.meta["layers_by_depth"]
    assert sorted(order) == sorted(run.layers())
    first = {"gpt2": "transformer.wte+lm_head", "bert": "bert.embeddings.word_embeddings+cls.predictions.decoder"}
    assert order[0] == first.get(family, "model.embed_tokens")
    pos = {layer: i for i, layer in enumerate(order)}
    for i in range(N_LAYER - 1):
        here = [pos[x] for x in order if x.startswith(BLOCK_PREFIX[family].format(i))]
        nxt = [pos[x] for x in order if x.startswith(BLOCK_PREFIX[family].format(i + 1))]
        assert max(here) < min(nxt), f"block {i} must run before block {i + 1}: {order}"
    if family == "llama":  # inside a block: the norm runs before the projections it feeds
        assert pos["model.layers.0.input_layernorm"] < pos["model.layers.0.self_attn.q_proj"]
        assert pos["model.layers.0.self_attn.o_proj"] < pos["model.layers.0.mlp.gate_proj"]
        assert order[-1] == "lm_head"


@pytest.mark.parametrize("family", RUNS)
def test_l2_norm_per_parameter_layer_block_and_model_match_float64(family, request):
    run: Run = request.getfixturevalue(family)
    assert run.report.steps == STEPS and run.report.skipped_steps == []
    df = run.report.stats
    l2 = df[df.stat == "l2_norm"].set_index(["step", "layer", "param"]).value
    mismatches = []
    for step, ref in enumerate(run.refs, start=1):
        expected = {(layer, leaf): math.sqrt(v) for (layer, leaf), v in ref.param_sumsq.items()}
        expected |= {(layer, "*"): math.sqrt(v) for layer, v in ref.layer_sumsq().items()}
        expected[("*", "*")] = math.sqrt(ref.total())
        for (layer, param), want in expected.items():
            got = l2.get((step, layer, param), math.nan)
            if not math.isclose(got, want, rel_tol=1e-5):
                mismatches.append(f"step {step} {layer}.{param}: gradscope {got!r}, float64 {want!r}")
        # a block is its layers together: the prefix grouping gives the block's norm exactly
        layer_l2 = l2.xs(step, level="step").xs("*", level="param")
        for i in range(N_LAYER):
            prefix = BLOCK_PREFIX[family].format(i)
            got = math.sqrt(sum(v * v for layer, v in layer_l2.items() if layer.startswith(prefix)))
            want = math.sqrt(sum(v for (layer, _), v in ref.param_sumsq.items() if layer.startswith(prefix)))
            if not math.isclose(got, want, rel_tol=1e-5):
                mismatches.append(f"step {step} block {prefix}: {got!r} vs {want!r}")
    assert not mismatches, "\n".join(mismatches[:20])


@pytest.mark.parametrize("family", RUNS)
def test_sampled_statistics_match_float64(family, request):
    run: Run = request.getfixturevalue(family)
    sampled = [s for s in range(1, STEPS + 1) if (s - 1) % SAMPLE_EVERY == 0]
    df = run.report.stats
    assert sorted(df[df.stat == "abs_max"].step.unique()) == sampled
    for step in sampled[:2]:
        ref = run.refs[step - 1]
        for (layer, leaf), want in ref.param_absmax.items():
            assert math.isclose(run.value(step, layer, leaf, "abs_max"), want, rel_tol=1e-6), (step, layer, leaf)
        want_ratio = math.sqrt(ref.update_sumsq / ref.weight_sumsq)
        assert math.isclose(run.value(step, "*", "*", "update_ratio"), want_ratio, rel_tol=1e-4)
        assert math.isclose(run.value(step, "*", "*", "param_norm"), math.sqrt(ref.weight_sumsq), rel_tol=1e-5)


def test_bert_relu_activations_are_measured(bert):
    for path in BERT_ACTS:
        got = bert.value(1, path, "*", "act_zero_fraction")
        assert math.isclose(got, bert.act_ref[path], rel_tol=1e-6), path
        assert 0.2 < got < 0.8  # a ReLU at random init: about half its outputs are zero


@pytest.mark.parametrize(
    ("family", "tied_layer", "aliases"),
    [
        ("gpt2", "transformer.wte+lm_head", ("transformer.wte.weight", "lm_head.weight")),
        (
            "bert",
            "bert.embeddings.word_embeddings+cls.predictions.decoder",
            ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
        ),
    ],
)
def test_tied_embeddings_are_counted_once(family, tied_layer, aliases, request):
    run: Run = request.getfixturevalue(family)
    model = run.model
    a, b = (model.get_parameter(n) for n in aliases)
    assert a is b  # the model really ties them
    unique = sum(p.numel() for p in model.parameters())
    with_dupes = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert run.report.meta["parameters"] == unique < with_dupes
    df = run.report.stats
    rows = df[(df.layer == tied_layer) & (df.stat == "l2_norm") & (df.step == 1)]
    assert sorted(rows.param) == ["*", "weight"]  # one parameter entry, not two
    for name in aliases:  # and no layer of either owner alone
        assert name.rpartition(".")[0] not in run.layers()
    for step, ref in enumerate(run.refs, start=1):
        once = math.sqrt(ref.total())
        # counting the tied matrix twice would add its sum of squares again: make sure that is visible
        twice = math.sqrt(ref.total() + ref.param_sumsq[(tied_layer, "weight")])
        assert twice > once * 1.001
        got = run.value(step, "*", "*", "l2_norm")
        assert math.isclose(got, once, rel_tol=1e-5), f"step {step}: {got} vs {once} (twice would be {twice})"


def test_llama_untied_head_has_its_own_layer(llama):
    assert llama.model.lm_head.weight is not llama.model.model.embed_tokens.weight
    assert {"lm_head", "model.embed_tokens"} <= set(llama.layers())
    assert llama.report.meta["parameters"] == sum(p.numel() for p in llama.model.parameters())


def test_llama_tied_config_is_counted_once():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    run = train(model, causal_lm_loss, steps=2)
    assert "model.embed_tokens+lm_head" in run.layers()
    for step, ref in enumerate(run.refs, start=1):
        assert math.isclose(run.value(step, "*", "*", "l2_norm"), math.sqrt(ref.total()), rel_tol=1e-5)


@pytest.mark.parametrize("family", RUNS)
def test_the_models_learn(family, request):
    # The "healthy run" premise of the next test: the loss falls clearly on the synthetic task.
    run: Run = request.getfixturevalue(family)
    first, last = np.mean(run.losses[:4]), np.mean(run.losses[-4:])
    assert last < first - 0.4, f"{family} loss: {first:.3f} -> {last:.3f} ({np.round(run.losses, 2)})"
    assert np.allclose(run.report.scalars["loss"].to_numpy(), run.losses, rtol=1e-6)


@pytest.mark.parametrize("family", RUNS)
def test_healthy_runs_have_no_findings(family, request):
    run: Run = request.getfixturevalue(family)
    assert run.report.findings == [], "\n".join(str(f) for f in run.report.findings)
    assert run.report.ok


def test_bert_fine_tuning_with_frozen_embeddings():
    """A common fine-tuning recipe: embeddings frozen, encoder and head trained. Healthy: the loss falls.

    With the embeddings frozen, the earliest watched layers are layer 0's attention query and key,
    whose gradients are structurally small at random init (attention logits near zero make the
    softmax insensitive to them): their gradient RMS stays below 1e-3 x the classifier's for the first
    20 steps and then grows, while AdamW's update ratio for them is like every other layer's and the
    loss falls. A rule that reads that as vanishing gradients is wrong.
    """
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=N_LAYER,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)

    def loss_of(m, ids):
        return m(input_ids=ids, labels=ids[:, 0] % 3).loss  # the first token id decides the class

    run = train(model, loss_of, steps=60, lr=5e-3, batch=32, random_ids=True)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert run.report.frozen == frozen and len(frozen) == 5
    assert not any(layer.startswith("bert.embeddings") for layer in run.layers())
    assert "bert.pooler.dense" in run.layers() and "classifier" in run.layers()
    for step, ref in enumerate(run.refs, start=1):
        assert math.isclose(run.value(step, "*", "*", "l2_norm"), math.sqrt(ref.total()), rel_tol=1e-5)
    first, last = np.mean(run.losses[:5]), np.mean(run.losses[-5:])
    assert last < first - 0.3, f"loss {first:.3f} -> {last:.3f}"
    assert run.report.findings == [], "\n".join(str(f) for f in run.report.findings)


def test_gradient_checkpointing_gives_the_same_statistics():
    # Checkpointing re-runs each block's forward inside backward: forward hooks fire twice.
    model = tiny_gpt2()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    run = train(model, causal_lm_loss, steps=3)
    assert run.report.meta["layers_by_depth"][0] == "transformer.wte+lm_head"
    for step, ref in enumerate(run.refs, start=1):
        for layer, v in ref.layer_sumsq().items():
            assert math.isclose(run.value(step, layer, "*", "l2_norm"), math.sqrt(v), rel_tol=1e-5), (step, layer)
