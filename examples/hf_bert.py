"""Watch a Hugging Face BERT being fine-tuned with frozen embeddings: frozen is listed, never flagged.

Run:  python examples/hf_bert.py [--steps 30] [--log-dir runs/hf_bert]
Needs: pip install 'gradscope[hf]'

BertForSequenceClassification is built from a small BertConfig with random weights (nothing is
downloaded). Its embeddings are frozen, as in a common fine-tuning recipe: gradscope lists them in
``report.frozen`` and watches the rest, grouped by encoder layer. The task: the first token id of a
random sequence, modulo 3.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config: nothing to download

import torch
import transformers

import gradscope

transformers.logging.set_verbosity_error()
VOCAB, SEQ, CLASSES = 64, 16, 3

FAST = os.environ.get("GRADSCOPE_EXAMPLE_FAST") == "1"  # the test suite runs every example: fewer steps


def batch(g: torch.Generator, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids ``[n, SEQ]`` and the label ``[n]``: the first id modulo 3."""
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return ids, ids[:, 0] % CLASSES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6 if FAST else 30)
    ap.add_argument("--log-dir", default=None, help="also write a TensorBoard run here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=CLASSES,
    )
    model = transformers.BertForSequenceClassification(config)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(0)

    with gradscope.watch(model, optimizer=opt, log_dir=args.log_dir) as scope:
        for _ in range(args.steps):
            ids, labels = batch(g)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()
    report = scope.report()

    print(report)
    print(f"\nfrozen ({len(report.frozen)}): {', '.join(report.frozen)}")
    df = report.stats.query("stat == 'l2_norm' and param == '*' and layer != '*'")
    layer = df.layer.str.extract(r"^(bert\.encoder\.layer\.\d+)\.", expand=False).fillna(df.layer)
    norms = df.assign(group=layer, sq=df.value**2).groupby(["group"], sort=False).sq.mean().pow(0.5)
    print("\nroot-mean-square over steps of the gradient l2 norm, per encoder layer / head:")
    print(norms.to_string(float_format=lambda v: f"{v:.3g}"))
    loss = report.scalars["loss"]
    print(f"\nloss: {loss.iloc[:3].mean():.3f} -> {loss.iloc[-3:].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
