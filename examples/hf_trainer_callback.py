"""gradscope in a Hugging Face Trainer run: one callback, statistics in the Trainer's TensorBoard run.

Run:  python examples/hf_trainer_callback.py [--output-dir out/hf_trainer] [--steps 20]
Then: tensorboard --logdir out/hf_trainer/runs   (the Trainer's scalars and gradscope's, in one run)
Needs: pip install 'gradscope[hf]'

A small GPT-2 (random weights from a GPT2Config, nothing downloaded) learns sequences of token ids
in arithmetic progression. The Trainer accumulates 2 micro-batches per optimizer step and clips the
gradient norm at 1.0, and evaluates twice; gradscope records one step per optimizer step with the gradients the optimizer
used, the loss the Trainer logs (every step here: logging_steps=1) and each evaluation's loss.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config: nothing to download

import torch
import transformers

from gradscope.integrations.huggingface import GradscopeTrainerCallback

transformers.logging.set_verbosity_error()
VOCAB, SEQ = 64, 16

FAST = os.environ.get("GRADSCOPE_EXAMPLE_FAST") == "1"  # the test suite runs every example: fewer steps


class Progressions(torch.utils.data.Dataset):
    """Token ids ``(start + k * stride) % VOCAB``; the model learns to continue them."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(0, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default=None, help="the Trainer's output_dir (default: temporary, removed)")
    ap.add_argument("--steps", type=int, default=4 if FAST else 20)
    args = ap.parse_args(argv)
    if args.output_dir is None:
        with tempfile.TemporaryDirectory(prefix="gradscope-hf-") as tmp:
            return run(tmp, args.steps)
    return run(args.output_dir, args.steps)


def run(output_dir: str, steps: int) -> int:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    callback = GradscopeTrainerCallback(sample_every=5)
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config),
        args=transformers.TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            learning_rate=3e-3,
            max_grad_norm=1.0,
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=max(1, steps // 2),
            save_strategy="no",
            report_to=["tensorboard"],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=Progressions(512, seed=0),
        eval_dataset=Progressions(64, seed=1),
        callbacks=[callback],
    )
    trainer.train()

    report = callback.report
    print(report)
    sc = report.scalars
    print(f"\noptimizer steps: {trainer.state.global_step}, gradscope steps: {report.steps}")
    print(f"training loss (as logged by the Trainer): {sc.loss.iloc[0]:.3f} -> {sc.loss.iloc[-1]:.3f}")
    print("eval loss:", ", ".join(f"{v:.3f} (step {s})" for s, v in sc.val_loss.dropna().items()))
    print(f"TensorBoard run (shared with the Trainer's own scalars): {callback.log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
