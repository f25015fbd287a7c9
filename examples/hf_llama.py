"""Watch a Llama-style decoder in training: grouped-query attention, RMSNorm, SwiGLU, untied head.

Run:  python examples/hf_llama.py [--steps 30] [--checkpointing] [--log-dir runs/hf_llama]
Needs: pip install 'gradscope[hf]'

LlamaForCausalLM is built from a small LlamaConfig with random weights (nothing is downloaded). The
report lists its layers in the order they run forward (``report.meta["layers_by_depth"]``): per
decoder layer, the input RMSNorm, q/k/v/o projections, the post-attention RMSNorm, then the MLP.
With ``--checkpointing`` each block's forward is recomputed during backward; the statistics are the
same, since gradscope reads the gradients the optimizer is about to use.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config: nothing to download

import torch
import transformers

import gradscope

transformers.logging.set_verbosity_error()
VOCAB, SEQ = 64, 16

FAST = os.environ.get("GRADSCOPE_EXAMPLE_FAST") == "1"  # the test suite runs every example: fewer steps


def progressions(g: torch.Generator, batch: int = 8) -> torch.Tensor:
    """``[batch, SEQ]`` token ids ``(start + k * stride) % VOCAB``: the next token follows from the context."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    stride = torch.randint(0, 4, (batch, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6 if FAST else 30)
    ap.add_argument("--checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--log-dir", default=None, help="also write a TensorBoard run here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k_proj and v_proj are half as wide as q_proj
        max_position_embeddings=SEQ,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    if args.checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    with gradscope.watch(model, optimizer=opt, log_dir=args.log_dir) as scope:
        for _ in range(args.steps):
            ids = progressions(g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    report = scope.report()

    print(report)
    order = report.meta["layers_by_depth"]
    print("\nlayers in forward order:", ", ".join(order[:11]), f"... ({len(order)} layers)")
    last = report.stats.query(f"step == {report.steps} and stat == 'l2_norm' and param == '*'")
    norms = dict(zip(last.layer, last.value))
    print(f"\ngradient l2 norm at step {report.steps}, decoder layer 0:")
    for layer in order:
        if layer.startswith("model.layers.0."):
            print(f"  {layer.removeprefix('model.layers.0.'):<26} {norms[layer]:.3g}")
    loss = report.scalars["loss"]
    print(f"\nloss: {loss.iloc[:3].mean():.3f} -> {loss.iloc[-3:].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
