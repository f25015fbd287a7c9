"""Watch a Hugging Face GPT-2 in training: gradients per transformer block, tied embeddings counted once.

Run:  python examples/hf_gpt2.py [--steps 30] [--log-dir runs/hf_gpt2]
Needs: pip install 'gradscope[hf]'

The model is built from a small GPT2Config with random weights (nothing is downloaded) and learns a
synthetic task: sequences of token ids in arithmetic progression. GPT-2 ties its output layer to the
token embedding, so gradscope reports that matrix once, as the layer "transformer.wte+lm_head".
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config: nothing to download

import pandas as pd
import torch
import transformers

import gradscope

transformers.logging.set_verbosity_error()  # keep the output to gradscope's
VOCAB, SEQ = 64, 16

FAST = os.environ.get("GRADSCOPE_EXAMPLE_FAST") == "1"  # the test suite runs every example: fewer steps


def progressions(g: torch.Generator, batch: int = 8) -> torch.Tensor:
    """``[batch, SEQ]`` token ids ``(start + k * stride) % VOCAB``: the next token follows from the context."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    stride = torch.randint(0, 4, (batch, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def block_norms(report: gradscope.Report, pattern: str) -> pd.DataFrame:
    """Gradient l2 norm per block and step: layers whose path matches ``pattern`` are grouped, others kept."""
    df = report.stats.query("stat == 'l2_norm' and param == '*' and layer != '*'")
    block = df.layer.str.extract(pattern, expand=False).fillna(df.layer)
    squares = df.assign(block=block, sq=df.value**2).groupby(["step", "block"], sort=False).sq.sum()
    return squares.pow(0.5).unstack("block")  # a block's norm is the norm of its layers together


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8 if FAST else 30)
    ap.add_argument("--log-dir", default=None, help="also write a TensorBoard run here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    with gradscope.watch(model, optimizer=opt, log_dir=args.log_dir) as scope:
        for _ in range(args.steps):
            ids = progressions(g)
            loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    report = scope.report()

    print(report)
    print()
    tied = [layer for layer in report.meta["layers_by_depth"] if "+" in layer]
    print(f"tied: {', '.join(tied)} (one parameter, counted once)")
    print(f"parameters: {report.meta['parameters']:,} (model.num_parameters() = {model.num_parameters():,})")
    norms = block_norms(report, r"^(transformer\.h\.\d+)\.")
    print("\ngradient l2 norm per block, first and last step:")
    print(norms.iloc[[0, -1]].T.to_string(float_format=lambda v: f"{v:.3g}"))
    loss = report.scalars["loss"]
    print(f"\nloss: {loss.iloc[:3].mean():.3f} -> {loss.iloc[-3:].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
