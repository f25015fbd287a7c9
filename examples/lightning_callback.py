"""gradscope in a PyTorch Lightning fit: one callback, statistics in the trainer's TensorBoard run.

Run:  python examples/lightning_callback.py [--log-dir runs/lightning] [--epochs 3]
Then: tensorboard --logdir runs/lightning   (Lightning's scalars and gradscope's, in one run)
Needs: pip install 'gradscope[lightning]'

The fit accumulates gradients over 2 batches and clips them at norm 1.0: gradscope records one step
per optimizer step, with the accumulated, clipped gradients the optimizer used, the mean loss of the
two batches and the validation loss of each epoch.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradscope.integrations.lightning import GradscopeCallback

FAST = os.environ.get("GRADSCOPE_EXAMPLE_FAST") == "1"  # the test suite runs every example: fewer steps


class Classifier(pl.LightningModule):
    def __init__(self, d: int = 20, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))  # GradscopeCallback reads "val_loss"

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n: int, seed: int, shuffle: bool) -> torch.utils.data.DataLoader:
    """A learnable synthetic task: labels from a random nonlinear teacher (the same teacher for every split)."""
    teacher = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = torch.tanh(x @ teacher).argmax(dim=1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=shuffle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-dir", default=None, help="TensorBoard root (default: a temporary folder, removed)")
    ap.add_argument("--epochs", type=int, default=1 if FAST else 3)
    args = ap.parse_args(argv)
    if args.log_dir is None:
        with tempfile.TemporaryDirectory(prefix="gradscope-lightning-") as tmp:
            return run(tmp, args.epochs)
    return run(args.log_dir, args.epochs)


def run(log_root: str, epochs: int) -> int:
    pl.seed_everything(0, verbose=False)
    callback = GradscopeCallback(sample_every=5)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        logger=pl.loggers.TensorBoardLogger(log_root, name="example"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    trainer.fit(Classifier(), loader(1024, seed=1, shuffle=True), loader(256, seed=2, shuffle=False))

    report = callback.report
    print(report)
    print(f"\noptimizer steps: {trainer.global_step}, gradscope steps: {report.steps}")
    sc = report.scalars
    print(f"training loss: {sc.loss.iloc[0]:.3f} at step 1 -> {sc.loss.iloc[-1]:.3f} at step {report.steps}")
    # a validation run's loss is recorded at the first optimizer step after it (the last one has none)
    val = sc["val_loss"].dropna().items() if "val_loss" in sc else ()
    print("validation loss:", ", ".join(f"{v:.3f} (step {s})" for s, v in val) or "none recorded yet")
    print(f"\nTensorBoard run: {trainer.logger.log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
