"""How long ``gradscope.verify`` takes on real models, against one float64 training step of the same model.

Models: Hugging Face BERT, GPT-2 and Llama built from tiny configs (no download), a torchvision-style
ResNet (its basic blocks written here, so torchvision is not needed), a small U-Net (Conv -> Upsample,
skip connections) and an LSTM language model. Layers without a reference (the HF model classes, the
basic blocks, the U-Net, the LSTM model's custom forward) are checked numerically, which is verify's
default; the table names them.

    python benchmarks/verify_time.py            # the table
    python benchmarks/verify_time.py --quick    # smaller models, fewer repeats

``tests/reference/test_verify_real_models.py`` imports the builders below, at tiny sizes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

import gradscope

#: What a builder returns: the model, its inputs, its targets and the loss.
Workload = tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]


class Logits(nn.Module):
    """A Hugging Face model as verify takes it: token ids in, ``[batch * length, vocab]`` logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits.flatten(0, 1)


def _tokens(vocab: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab, (batch, length))
    ids[0, -1] = 0  # a padding token, for the models that have one
    return ids, torch.randint(0, vocab, (batch * length,))


def bert(hidden: int = 32, layers: int = 2, batch: int = 2, length: int = 8, vocab: int = 64) -> Workload:
    """``BertForMaskedLM`` from a tiny config (padding_idx 0 in its word embedding), in training mode."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=2 * length,
    )
    return Logits(BertForMaskedLM(config).train()), *_tokens(vocab, batch, length), nn.CrossEntropyLoss()


def gpt2(hidden: int = 32, layers: int = 2, batch: int = 2, length: int = 8, vocab: int = 64) -> Workload:
    """``GPT2LMHeadModel`` from a tiny config, in training mode (dropout replayed by verify)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=2 * length,
        bos_token_id=0,
        eos_token_id=0,
    )
    return Logits(GPT2LMHeadModel(config).train()), *_tokens(vocab, batch, length), nn.CrossEntropyLoss()


def llama(hidden: int = 32, layers: int = 2, batch: int = 2, length: int = 8, vocab: int = 64) -> Workload:
    """``LlamaForCausalLM`` from a tiny config: its RMSNorm computes in float32 inside a float64 model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2 * length,
        bos_token_id=0,
        eos_token_id=0,
    )
    return Logits(LlamaForCausalLM(config).train()), *_tokens(vocab, batch, length), nn.CrossEntropyLoss()


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv-bn-relu-conv-bn, plus the shortcut, then an in-place ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet(blocks: int = 8, width: int = 8, batch: int = 8, size: int = 16, classes: int = 10) -> Workload:
    """A torchvision-style ResNet: a stem the reference covers, then ``blocks`` basic blocks (numerical)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    channels = width
    for i in range(blocks):
        stride = 2 if i in (blocks // 2,) else 1
        out = channels * stride
        layers.append(BasicBlock(channels, out, stride))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    x = torch.randn(batch, 3, size, size)
    return nn.Sequential(*layers).train(), x, torch.randint(0, classes, (batch,)), nn.CrossEntropyLoss()


class UNet(nn.Module):
    """A two-level U-Net: conv blocks, max-pool down, bilinear Upsample up, skip connections by concatenation."""

    def __init__(self, width: int = 8, classes: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(2, cout), nn.SiLU())

        self.down1, self.down2 = block(3, width), block(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.middle = block(2 * width, 2 * width)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.up2, self.up1 = block(4 * width, width), block(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(self.pool(d1))
        m = self.middle(self.pool(d2))
        u2 = self.up2(torch.cat([self.up(m), d2], dim=1))
        u1 = self.up1(torch.cat([self.up(u2), d1], dim=1))
        return self.head(u1)


def unet(width: int = 8, batch: int = 2, size: int = 16, classes: int = 3) -> Workload:
    """A small U-Net for per-pixel classification."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    return UNet(width, classes).train(), x, torch.randint(0, classes, (batch, size, size)), nn.CrossEntropyLoss()


class LSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear over the vocabulary, logits flattened over batch and time."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(ids))
        return self.head(out).flatten(0, 1)


def lstm_lm(hidden: int = 32, batch: int = 4, length: int = 12, vocab: int = 64) -> Workload:
    """An LSTM language model."""
    torch.manual_seed(0)
    return LSTMLanguageModel(vocab, hidden).train(), *_tokens(vocab, batch, length), nn.CrossEntropyLoss()


#: name -> (builder, benchmark sizes, quick sizes)
MODELS: dict[str, tuple[Callable[..., Workload], dict[str, Any], dict[str, Any]]] = {
    "HF BERT": (bert, {"hidden": 64, "layers": 4}, {}),
    "HF GPT-2": (gpt2, {"hidden": 64, "layers": 4}, {}),
    "HF Llama": (llama, {"hidden": 64, "layers": 4}, {}),
    "ResNet (8 blocks, batch 8)": (resnet, {"blocks": 8, "batch": 8}, {"blocks": 2, "batch": 4}),
    "U-Net": (unet, {"width": 16, "size": 32}, {}),
    "LSTM LM": (lstm_lm, {"hidden": 64}, {}),
}


def training_step_seconds(workload: Workload, repeats: int) -> float:
    """Median time of one float64 forward, backward and SGD step."""
    model, x, y, loss_fn = workload
    model = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def verify_seconds(workload: Workload, dtype: torch.dtype) -> tuple[float, gradscope.VerificationReport]:
    """Wall time of ``gradscope.verify`` with default options, and its report."""
    model, x, y, loss_fn = workload
    start = time.perf_counter()
    report = gradscope.verify(model, x, y, loss_fn, dtype=dtype)
    return time.perf_counter() - start, report


def numerical_layers(report: gradscope.VerificationReport) -> list[str]:
    """The layers checked numerically (finite differences), as the report names them."""
    return sorted({c.layer or c.name for c in report.numerical})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, one repeat")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # comparable numbers on a shared machine
    header = f"{'model':28} {'train step f64':>15} {'verify f64':>11} {'ratio':>6} {'verify f32':>11}  result / numerical layers"
    print(header)
    print("-" * len(header))
    failed = False
    for name, (builder, sizes, quick) in MODELS.items():
        try:
            workload = builder(**(quick if args.quick else sizes))
        except ImportError as error:
            print(f"{name:28} skipped: {error}")
            continue
        step = training_step_seconds(workload, repeats=1 if args.quick else 3)
        t64, r64 = verify_seconds(workload, torch.float64)
        t32, r32 = verify_seconds(workload, torch.float32)
        verdict = "ok" if r64.ok and r32.ok and r64.comparable and r32.comparable else "FAIL"
        failed |= verdict != "ok"
        layers = numerical_layers(r64)
        shown = ", ".join(layers[:4]) + (f" (+{len(layers) - 4})" if len(layers) > 4 else "")
        print(f"{name:28} {step * 1e3:12.0f} ms {t64:10.2f}s {t64 / step:5.0f}x {t32:10.2f}s  {verdict}: {shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
