"""Models used by the overhead benchmark: small ones for CPUs, GPT-2-small- and ResNet-50-sized ones for GPUs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: str = "sgd"
    description: str = ""


def mlp(width: int = 1024, depth: int = 3, d_in: int = 784, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def small_cnn(classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.MaxPool2d(2),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, classes),
    )


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU(approximate="tanh")
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(
                    p, std=0.02 / (math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 1)
                )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = mid * 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += idt
        return self.relu(out)


def resnet50(classes: int = 1000) -> nn.Module:
    """ResNet-50's layout (3-4-6-3 bottlenecks, 25.6M parameters), written out so no torchvision is needed."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    cin = 64
    for mid, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(n):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def block_mlp(blocks: int, width: int = 64, d_in: int = 64, classes: int = 10) -> nn.Module:
    """``blocks`` x (Linear(width, width) + ReLU), then a classifier: many small parameter tensors."""
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(blocks - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def digits_cnn(classes: int = 10) -> nn.Module:
    """A small CNN for 8x8 one-channel digits (the shape of scikit-learn's digits): about 3 ms per step."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


def small_tensor_workloads() -> list[Workload]:
    """Models with many small parameter tensors: the fixed per-step and per-tensor costs show here."""

    def mlp_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)

    def digits_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # synthetic data of the digits' shape (nothing is downloaded): 64 images of 1x8x8
        return torch.rand(64, 1, 8, 8, generator=g) * 16, torch.randint(0, 10, (64,), generator=g)

    return [
        Workload(
            "mlp8",
            lambda: block_mlp(8),
            mlp_batch,
            F.cross_entropy,
            "sgd",
            "8 blocks of Linear(64, 64)+ReLU and a classifier (18 tensors, 34k params), batch 32, SGD",
        ),
        Workload(
            "mlp128",
            lambda: block_mlp(128),
            mlp_batch,
            F.cross_entropy,
            "sgd",
            "128 blocks of Linear(64, 64)+ReLU and a classifier (258 tensors, 0.53M params), batch 32, SGD",
        ),
        Workload(
            "digits",
            digits_cnn,
            digits_batch,
            F.cross_entropy,
            "sgd",
            "3-conv CNN on 8x8 one-channel digits (synthetic), 10 tensors, 0.19M params, batch 64, SGD",
        ),
    ]


class SparseEmbeddingMLP(nn.Module):
    """A sparse ``nn.Embedding`` (its gradient a sparse COO tensor), averaged over a bag of lookups, before ``mlp8``."""

    def __init__(self, vocab: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, sparse=True)
        self.body = block_mlp(8, width, width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.body(self.emb(idx).mean(1))


def layout_workloads() -> list[Workload]:
    """Gradients the CPU kernel reads other than contiguous float32 ones (not in the default lists).

    ``digits-cl``: ``digits`` in channels-last memory format, as CPU training often runs a CNN (the
    convolution weights' gradients are dense but not contiguous). ``mlp8-bf16``: ``mlp8`` in
    bfloat16 (weights, gradients, activations). ``emb-mlp8``: a sparse embedding in front of ``mlp8``.
    """
    small = {w.name: w for w in small_tensor_workloads()}
    digits, mlp8 = small["digits"], small["mlp8"]

    def cl_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = digits.make_batch(g)
        return x.contiguous(memory_format=torch.channels_last), y

    def bf16_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = mlp8.make_batch(g)
        return x.to(torch.bfloat16), y

    def bag_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 1000, (32, 8), generator=g), torch.randint(0, 10, (32,), generator=g)

    return [
        Workload(
            "digits-cl",
            lambda: digits_cnn().to(memory_format=torch.channels_last),
            cl_batch,
            F.cross_entropy,
            "sgd",
            "digits in channels-last memory format (model and images)",
        ),
        Workload(
            "mlp8-bf16",
            lambda: block_mlp(8).to(torch.bfloat16),
            bf16_batch,
            lambda out, y: F.cross_entropy(out.float(), y),
            "sgd",
            "mlp8 in bfloat16 (weights, gradients and activations)",
        ),
        Workload(
            "emb-mlp8",
            SparseEmbeddingMLP,
            bag_batch,
            F.cross_entropy,
            "sgd",
            "a sparse Embedding(1000, 64), 8 lookups averaged per sample, before mlp8; batch 32, SGD",
        ),
    ]


def tanh_mlp(blocks: int = 16, width: int = 64, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def resnet_mini(blocks: int = 6, c: int = 16, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        *[_ResBlock(c) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, classes),
    )


def norm_mlp(blocks: int, width: int, act: type[nn.Module], d_in: int, classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width)]
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), act()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class RoutedExperts(nn.Module):
    """A mixture-of-experts MLP: a router sends each sample to its top ``k`` of ``n`` experts (as Mixtral's layers).

    The experts the router did not pick at a step get no gradient (``zero_grad`` sets them to None),
    so the set of tensors with a gradient changes at every step.
    """

    def __init__(self, n_experts: int, d: int = 64, hidden: int = 128, k: int = 2, d_in: int = 32, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.k = k
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d)) for _ in range(n_experts)
        )
        self.out = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        weights, picked = self.gate(h).softmax(-1).topk(self.k, dim=-1)
        mixed = torch.zeros_like(h)
        for e in picked.unique().tolist():
            rows, slot = (picked == e).nonzero(as_tuple=True)
            mixed = mixed.index_add(0, rows, self.experts[e](h[rows]) * weights[rows, slot, None])
        return self.out(h + mixed)


class RecurrentLM(nn.Module):
    """Embedding, a recurrent layer (``nn.LSTM`` or ``nn.GRU``), a vocabulary head."""

    def __init__(self, cell: type[nn.Module], vocab: int, width: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, width)
        self.rnn = cell(width, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0])


def _seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def extra_workloads() -> list[Workload]:
    """Models beyond the default lists: the shapes real training has, and noisy statistics.

    Meant to be run with fresh data (``--batches 64``): with the default 4 batches in turn, the batch to
    batch noise of the statistics repeats and hides. ``tanh16``: 16 blocks of Linear(64, 64) + Tanh,
    AdamW: the gradients of its early layers are small and their RMS moves most of a decade from one
    batch to the next, which the live screen must not mistake for the start of a collapse.
    ``deep-ln``: 48 blocks of Linear(16, 16) + LayerNorm + ReLU, many of whose ReLUs hover about the
    dead-units threshold. ``moe32``, ``moe128``: a mixture-of-experts layer (:class:`RoutedExperts`),
    most of whose experts have no gradient at a step. The others: a LayerNorm/GELU MLP of 194 tensors,
    an LSTM and a GRU language model, a residual CNN with BatchNorm, and (with transformers installed) a
    BERT classifier built from a config.
    """

    def vec(n: int, d: int, classes: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
        return lambda g: (torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))

    def tokens(n: int, t: int, vocab: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
        return lambda g: (torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, vocab, (n, t), generator=g))

    out = [
        Workload(
            "tanh16",
            tanh_mlp,
            vec(32, 64, 10),
            F.cross_entropy,
            "adamw",
            "16 blocks of Linear(64, 64)+Tanh and a classifier (34 tensors, 67k params), batch 32, AdamW",
        ),
        Workload(
            "deep-ln",
            lambda: norm_mlp(48, 16, nn.ReLU, 16, 4),
            vec(16, 16, 4),
            F.cross_entropy,
            "sgd",
            "48 blocks of Linear(16, 16)+LayerNorm+ReLU (196 tensors, 15k params), batch 16, SGD",
        ),
        Workload(
            "ln-mlp64",
            lambda: norm_mlp(64, 32, nn.GELU, 32, 10),
            vec(32, 32, 10),
            F.cross_entropy,
            "adamw",
            "64 blocks of Linear(32, 32)+LayerNorm+GELU (260 tensors, 73k params), batch 32, AdamW",
        ),
        Workload(
            "lstm",
            lambda: RecurrentLM(nn.LSTM, 500, 64, 128, 2),
            tokens(16, 32, 500),
            _seq_loss,
            "adamw",
            "Embedding(500, 64), 2-layer LSTM(128), a vocabulary head (0.33M params), 16 x 32 tokens, AdamW",
        ),
        Workload(
            "gru",
            lambda: RecurrentLM(nn.GRU, 200, 32, 64, 1),
            tokens(16, 24, 200),
            _seq_loss,
            "adamw",
            "Embedding(200, 32), GRU(64), a vocabulary head (38k params), 16 x 24 tokens, AdamW",
        ),
        Workload(
            "resnet-mini",
            resnet_mini,
            lambda g: (torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)),
            F.cross_entropy,
            "sgd",
            "a stem and 6 residual blocks of 16 channels with BatchNorm (29k params, 42 tensors), 32 x 3x16x16, SGD",
        ),
        *(
            Workload(
                f"moe{n}",
                lambda n=n: RoutedExperts(n),
                vec(32, 32, 10),
                F.cross_entropy,
                "adamw",
                f"a top-2 router over {n} ReLU-MLP experts of 64-128-64 ({4 * n + 5} tensors), batch 32, AdamW: "
                "the experts not picked have no gradient",
            )
            for n in (32, 128)
        ),
    ]
    try:
        import transformers
    except ModuleNotFoundError:
        return out

    def bert_tiny() -> nn.Module:
        config = transformers.BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=5,
        )
        return transformers.BertForSequenceClassification(config)

    out.append(
        Workload(
            "bert-tiny",
            bert_tiny,
            lambda g: (torch.randint(0, 1000, (16, 32), generator=g), torch.randint(0, 5, (16,), generator=g)),
            lambda o, y: F.cross_entropy(o.logits, y),
            "adamw",
            "transformers BertForSequenceClassification from a config: 6 layers, d=64 (0.27M params), 16 x 32 tokens",
        )
    )
    return out


def cpu_workloads() -> list[Workload]:
    return [
        *small_tensor_workloads(),
        Workload(
            "mlp",
            lambda: mlp(1024, 4),
            lambda g: (torch.randn(512, 784, generator=g), torch.randint(0, 10, (512,), generator=g)),
            F.cross_entropy,
            "sgd",
            "MLP with 3 hidden layers 784-1024-1024-1024-10 (2.9M params, 8 tensors), batch 512, SGD",
        ),
        Workload(
            "cnn",
            small_cnn,
            lambda g: (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)),
            F.cross_entropy,
            "sgd",
            "4-conv CNN with BatchNorm (0.29M params, 14 tensors), batch 64 of 3x32x32, SGD",
        ),
        Workload(
            "gpt",
            lambda: GPT(vocab=4096, ctx=128, d=256, layers=4, heads=4),
            lambda g: (torch.randint(0, 4096, (8, 128), generator=g), torch.randint(0, 4096, (8, 128), generator=g)),
            lm_loss,
            "adamw",
            "GPT-style transformer, 4 blocks, d=256, ctx 128, vocab 4096 tied (4.2M params), batch 8, AdamW",
        ),
    ]


def gpu_workloads() -> list[Workload]:
    return [
        Workload(
            "gpt2-small",
            lambda: GPT(vocab=50304, ctx=1024, d=768, layers=12, heads=12),
            lambda g: (
                torch.randint(0, 50304, (8, 1024), generator=g),
                torch.randint(0, 50304, (8, 1024), generator=g),
            ),
            lm_loss,
            "adamw",
            "GPT-2-small-sized transformer (124M params), batch 8 x 1024 tokens, AdamW",
        ),
        Workload(
            "resnet50",
            resnet50,
            lambda g: (torch.randn(64, 3, 224, 224, generator=g), torch.randint(0, 1000, (64,), generator=g)),
            F.cross_entropy,
            "sgd",
            "ResNet-50-sized CNN (25.6M params), batch 64 of 3x224x224, SGD with momentum",
        ),
    ]


def hf_gpt2(**config) -> nn.Module:
    """transformers' own GPT2LMHeadModel, random init from a GPT2Config (nothing is downloaded)."""
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))


def hf_lm_loss(output, targets: torch.Tensor) -> torch.Tensor:
    return lm_loss(output.logits, targets)


def hf_workloads() -> list[Workload]:
    """transformers GPT-2 workloads; empty when transformers is not installed (pip install 'gradscope[hf]')."""
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        return []
    return [
        Workload(
            "hf-gpt2",
            lambda: hf_gpt2(
                vocab_size=4096, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
            ),
            lambda g: (torch.randint(0, 4096, (8, 128), generator=g), torch.randint(0, 4096, (8, 128), generator=g)),
            hf_lm_loss,
            "adamw",
            "transformers GPT2LMHeadModel, 4 blocks, d=256, ctx 128, vocab 4096 tied (4.3M params), batch 8, AdamW",
        ),
        Workload(
            "hf-gpt2-small",
            hf_gpt2,  # GPT2Config() defaults: GPT-2 small, 124M parameters, vocab 50257, ctx 1024
            lambda g: (
                torch.randint(0, 50257, (8, 1024), generator=g),
                torch.randint(0, 50257, (8, 1024), generator=g),
            ),
            hf_lm_loss,
            "adamw",
            "transformers GPT2LMHeadModel from GPT2Config() (GPT-2 small, 124M params), batch 8 x 1024 tokens, AdamW",
        ),
    ]
