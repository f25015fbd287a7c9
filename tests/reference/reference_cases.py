"""Shared cases: one small model per reference layer and loss option, in float64.

Each case is a plain dict (backpack's settings style): ``model`` and ``batch`` build everything from a
fixed seed, ``loss`` is the loss_fn. The registry-coverage test requires every built-in reference type
to appear in some case's model or loss.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradscope.reference import Residual, SelfAttention

D = torch.float64

# Some factories below close over layers built right here; seed so their initial weights repeat.
torch.manual_seed(0)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=D)


def _classes(n: int, c: int) -> torch.Tensor:
    return torch.randint(0, c, (n,))


def case(
    id: str,
    model: Callable[[], nn.Module],
    batch: Callable[[], tuple[Any, Any]],
    loss: Any,
    *,
    train: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    return {"id": id, "model": model, "batch": batch, "loss": loss, "train": train, "seed": seed}


def mlp_head(*layers: nn.Module, width: int = 6, out: int = 3) -> Callable[[], nn.Module]:
    """Linear -> layers -> Linear: an activation under test between two trainable layers."""
    return lambda: nn.Sequential(nn.Linear(5, width), *layers, nn.Linear(width, out))


VECTOR_BATCH = lambda: (_randn(7, 5), _classes(7, 3))  # noqa: E731
CE = nn.CrossEntropyLoss()


def _conv_net(conv: nn.Module, channels: int) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))


CASES: list[dict[str, Any]] = [
    # --- Linear and activations ---
    case("linear", lambda: nn.Linear(5, 3), VECTOR_BATCH, CE),
    case(
        "linear-no-bias-3d",
        lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Flatten(), nn.Linear(8, 3)),
        lambda: (_randn(6, 2, 5), _classes(6, 3)),
        CE,
    ),
    case("relu", mlp_head(nn.ReLU()), VECTOR_BATCH, CE),
    case("relu-inplace", mlp_head(nn.ReLU(inplace=True)), VECTOR_BATCH, CE),
    case("leaky-relu", mlp_head(nn.LeakyReLU(0.2)), VECTOR_BATCH, CE),
    case("gelu-exact", mlp_head(nn.GELU()), VECTOR_BATCH, CE),
    case("gelu-tanh", mlp_head(nn.GELU(approximate="tanh")), VECTOR_BATCH, CE),
    case("silu", mlp_head(nn.SiLU()), VECTOR_BATCH, CE),
    case("tanh", mlp_head(nn.Tanh()), VECTOR_BATCH, CE),
    case("sigmoid", mlp_head(nn.Sigmoid()), VECTOR_BATCH, CE),
    case("softmax", mlp_head(nn.Softmax(dim=-1)), VECTOR_BATCH, CE),
    case("log-softmax-nll", lambda: nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=1)), VECTOR_BATCH, nn.NLLLoss()),
    case("identity", mlp_head(nn.Identity()), VECTOR_BATCH, CE),
    # --- Dropout: eval, and training with the mask replayed ---
    case("dropout-eval", mlp_head(nn.Dropout(0.5)), VECTOR_BATCH, CE, train=False),
    case("dropout-train", mlp_head(nn.Tanh(), nn.Dropout(0.4)), VECTOR_BATCH, CE),
    case("dropout-train-after-relu", mlp_head(nn.ReLU(), nn.Dropout(0.5)), VECTOR_BATCH, CE, seed=1),
    # --- Normalization ---
    case("layernorm", mlp_head(nn.LayerNorm(6)), VECTOR_BATCH, CE),
    case(
        "layernorm-2d-no-bias",
        lambda: nn.Sequential(nn.LayerNorm((2, 5), bias=False), nn.Flatten(), nn.Linear(10, 3)),
        lambda: (_randn(4, 2, 5), _classes(4, 3)),
        CE,
    ),
    case("layernorm-no-affine", mlp_head(nn.LayerNorm(6, elementwise_affine=False)), VECTOR_BATCH, CE),
    case("batchnorm1d-train", mlp_head(nn.BatchNorm1d(6)), VECTOR_BATCH, CE),
    case("batchnorm1d-eval", mlp_head(nn.BatchNorm1d(6)), VECTOR_BATCH, CE, train=False),
    case(
        "batchnorm1d-3d-no-affine",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3, affine=False), nn.Flatten(), nn.Linear(12, 3)),
        lambda: (_randn(5, 2, 6), _classes(5, 3)),
        CE,
    ),
    case(
        "batchnorm2d-train",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), 3),
        lambda: (_randn(4, 2, 5, 5), _classes(4, 3)),
        CE,
    ),
    case(
        "batchnorm2d-eval",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), 3),
        lambda: (_randn(4, 2, 5, 5), _classes(4, 3)),
        CE,
        train=False,
    ),
    # --- Convolutions ---
    case(
        "conv1d", _conv_net(nn.Conv1d(2, 4, 3, stride=2, padding=1), 4), lambda: (_randn(3, 2, 9), _classes(3, 3)), CE
    ),
    case(
        "conv1d-same-dilated-groups",
        _conv_net(nn.Conv1d(4, 6, 4, padding="same", dilation=2, groups=2), 6),
        lambda: (_randn(3, 4, 7), _classes(3, 3)),
        CE,
    ),
    case("conv2d", _conv_net(nn.Conv2d(3, 4, 3), 4), lambda: (_randn(2, 3, 6, 6), _classes(2, 3)), CE),
    case(
        "conv2d-stride-pad-dilation-groups",
        _conv_net(nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), 6),
        lambda: (_randn(2, 4, 7, 6), _classes(2, 3)),
        CE,
    ),
    case(
        "conv2d-depthwise-valid",
        _conv_net(nn.Conv2d(3, 3, 3, groups=3, padding="valid", bias=False), 3),
        lambda: (_randn(2, 3, 5, 5), _classes(2, 3)),
        CE,
    ),
    case(
        "conv2d-same-even-kernel",
        _conv_net(nn.Conv2d(2, 3, 4, padding="same"), 3),
        lambda: (_randn(2, 2, 5, 5), _classes(2, 3)),
        CE,
    ),
    # --- Pooling ---
    case(
        "maxpool2d",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2)), 3),
        lambda: (_randn(2, 2, 6, 6), _classes(2, 3)),
        CE,
    ),
    case(
        "maxpool2d-relu-ties",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)), 3),
        lambda: (_randn(2, 2, 7, 7), _classes(2, 3)),
        CE,
    ),
    case(
        "maxpool2d-ceil-dilation",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 1), nn.MaxPool2d(2, stride=2, dilation=2, ceil_mode=True)), 3),
        lambda: (_randn(2, 2, 8, 7), _classes(2, 3)),
        CE,
    ),
    case(
        "avgpool2d",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 1), nn.AvgPool2d(2)), 3),
        lambda: (_randn(2, 2, 6, 5), _classes(2, 3)),
        CE,
    ),
    case(
        "avgpool2d-pad-ceil-exclude-pad",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 1), nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)), 3),
        lambda: (_randn(2, 2, 6, 6), _classes(2, 3)),
        CE,
    ),
    case(
        "avgpool2d-divisor-override",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 1), nn.AvgPool2d(2, 1, 1, divisor_override=3)), 3),
        lambda: (_randn(2, 2, 4, 5), _classes(2, 3)),
        CE,
    ),
    case(
        "adaptive-avgpool2d",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d((3, None))), 3),
        lambda: (_randn(2, 2, 7, 5), _classes(2, 3)),
        CE,
    ),
    case(
        "adaptive-avgpool2d-gap",
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
        lambda: (_randn(3, 2, 6, 6), _classes(3, 3)),
        CE,
    ),
    # --- Embedding ---
    case(
        "embedding",
        lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)),
        lambda: (torch.randint(0, 10, (5, 3)), _classes(5, 3)),
        CE,
    ),
    case(
        "embedding-padding-idx-freq",
        lambda: nn.Sequential(
            nn.Embedding(6, 4, padding_idx=0, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(16, 3)
        ),
        lambda: (torch.randint(0, 6, (5, 4)), _classes(5, 3)),
        CE,
    ),
    case(
        "embedding-sparse",
        lambda: nn.Sequential(nn.Embedding(8, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)),
        lambda: (torch.randint(0, 8, (4, 2)), _classes(4, 2)),
        CE,
    ),
    # --- Containers ---
    case(
        "nested-sequential",
        lambda: nn.Sequential(
            nn.Sequential(nn.Linear(5, 6), nn.Sequential(nn.Tanh(), nn.Linear(6, 6))), nn.Linear(6, 3)
        ),
        VECTOR_BATCH,
        CE,
    ),
    case(
        "residual-identity",
        lambda: nn.Sequential(
            nn.Linear(5, 6), Residual(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.GELU())), nn.Linear(6, 3)
        ),
        VECTOR_BATCH,
        CE,
    ),
    case(
        "residual-projection",
        lambda: nn.Sequential(Residual(nn.Sequential(nn.Linear(5, 6), nn.ReLU()), nn.Linear(5, 6)), nn.Linear(6, 3)),
        VECTOR_BATCH,
        CE,
    ),
    case(
        "shared-layer",
        lambda: (lambda lin: nn.Sequential(nn.Linear(5, 6), lin, nn.Tanh(), lin, nn.Linear(6, 3)))(nn.Linear(6, 6)),
        VECTOR_BATCH,
        CE,
    ),
    case(
        "tied-embedding-and-head",
        lambda: (lambda emb, head: (setattr(head, "weight", emb.weight), nn.Sequential(emb, nn.Tanh(), head))[1])(
            nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
        ),
        lambda: (torch.randint(0, 7, (5,)), _classes(5, 7)),
        CE,
    ),
    # --- Attention and transformer blocks (eval mode: their attention dropout is functional) ---
    case(
        "transformer-prenorm",
        lambda: nn.Sequential(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True),
            nn.Flatten(),
            nn.Linear(24, 3),
        ),
        lambda: (_randn(4, 3, 8), _classes(4, 3)),
        CE,
    ),
    case(
        "transformer-postnorm-gelu-seq-first",
        lambda: nn.Sequential(
            nn.TransformerEncoderLayer(8, 4, 12, dropout=0.0, activation="gelu"), nn.Flatten(), nn.Linear(40, 3)
        ),
        lambda: (_randn(2, 5, 8), _classes(2, 3)),
        CE,
    ),
    case(
        "transformer-dropout-train",
        lambda: nn.Sequential(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True),
            nn.Dropout(0.3),
            nn.Flatten(),
            nn.Linear(24, 3),
        ),
        lambda: (_randn(4, 3, 8), _classes(4, 3)),
        CE,
    ),
    case(
        "transformer-encoder-stack",
        lambda: nn.Sequential(
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    8, 2, 16, batch_first=True, norm_first=True, activation=nn.GELU(approximate="tanh"), bias=False
                ),
                num_layers=2,
                norm=nn.LayerNorm(8),
                enable_nested_tensor=False,
            ),
            nn.Flatten(),
            nn.Linear(24, 3),
        ),
        lambda: (_randn(3, 3, 8), _classes(3, 3)),
        CE,
        train=False,
    ),
    # --- Unbatched inputs: conv, pooling and attention accept a single sample ---
    case(
        "unbatched-conv-pool",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.MaxPool2d(2),
            nn.AvgPool2d(1),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(0),
            nn.Linear(12, 3),
        ),
        lambda: (_randn(2, 6, 6), torch.tensor(1)),
        CE,
    ),
    case(
        "unbatched-conv1d",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2), nn.Flatten(0), nn.Linear(9, 3)),
        lambda: (_randn(2, 7), torch.tensor(2)),
        CE,
    ),
    case(
        "unbatched-transformer",
        lambda: nn.Sequential(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True),
            nn.Flatten(0),
            nn.Linear(40, 3),
        ),
        lambda: (_randn(5, 8), torch.tensor(0)),
        CE,
    ),
    # --- A GPT-style pre-norm block from Residual and causal SelfAttention ---
    case(
        "gpt-block-causal",
        lambda: nn.Sequential(
            nn.Embedding(9, 8),
            Residual(nn.Sequential(nn.LayerNorm(8), SelfAttention(8, 2, causal=True))),
            Residual(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 8))),
            nn.LayerNorm(8),
            nn.Linear(8, 9),
            nn.Flatten(0, 1),
        ),
        lambda: (torch.randint(0, 9, (3, 5)), torch.randint(0, 9, (15,))),
        CE,
    ),
    case(
        "self-attention-seq-first-unbatched",
        lambda: nn.Sequential(SelfAttention(6, 3, batch_first=False, bias=False), nn.Flatten(0), nn.Linear(24, 2)),
        lambda: (_randn(4, 6), torch.tensor(1)),
        CE,
    ),
    # --- Losses and their options ---
    case("mse-mean", lambda: nn.Linear(5, 2), lambda: (_randn(6, 5), _randn(6, 2)), nn.MSELoss()),
    case(
        "mse-sum-functional",
        lambda: nn.Linear(5, 2),
        lambda: (_randn(6, 5), _randn(6, 2)),
        functools.partial(F.mse_loss, reduction="sum"),
    ),
    case(
        "cross-entropy-weights-smoothing-ignore",
        lambda: nn.Linear(5, 4),
        lambda: (_randn(8, 5), torch.tensor([0, 1, 2, 3, -100, 1, 2, 0])),
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=D), label_smoothing=0.15),
    ),
    case(
        "cross-entropy-sum-ignore-index",
        lambda: nn.Linear(5, 4),
        lambda: (_randn(8, 5), torch.tensor([0, 1, 2, 3, 2, 1, 2, 0])),
        nn.CrossEntropyLoss(ignore_index=2, reduction="sum"),
    ),
    case(
        "cross-entropy-probabilities",
        lambda: nn.Linear(5, 4),
        lambda: (_randn(6, 5), torch.softmax(_randn(6, 4), 1)),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=D), label_smoothing=0.1),
    ),
    case(
        "cross-entropy-spatial",
        lambda: nn.Conv2d(2, 3, 1),
        lambda: (_randn(2, 2, 3, 4), torch.randint(0, 3, (2, 3, 4))),
        F.cross_entropy,
    ),
    case(
        "nll-weights",
        lambda: nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=-1)),
        VECTOR_BATCH,
        nn.NLLLoss(weight=torch.tensor([1.0, 3.0, 0.5], dtype=D)),
    ),
    case(
        "bce-with-logits",
        lambda: nn.Linear(5, 3),
        lambda: (_randn(6, 5), torch.randint(0, 2, (6, 3)).to(D)),
        nn.BCEWithLogitsLoss(),
    ),
    case(
        "bce-with-logits-weights",
        lambda: nn.Linear(5, 3),
        lambda: (_randn(6, 5), torch.rand(6, 3, dtype=D)),
        nn.BCEWithLogitsLoss(
            weight=torch.rand(3, dtype=D), pos_weight=torch.tensor([0.5, 2.0, 3.0], dtype=D), reduction="sum"
        ),
    ),
    case(
        "unknown-loss-callable",
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh()),
        lambda: (_randn(6, 5), _randn(6, 4)),
        lambda out, target: ((out - target) ** 4).mean(),
    ),
]


def build(c: dict[str, Any]) -> tuple[nn.Module, Any, Any]:
    """The case's float64 model (in the case's mode) and batch, from its seed."""
    torch.manual_seed(c["seed"])
    model = copy.deepcopy(c["model"]())  # never mutate layers that a factory closes over
    inputs, targets = c["batch"]()
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules()):
        with torch.no_grad():
            model(inputs.float() if inputs.is_floating_point() else inputs)  # materialize lazy shapes
    model = model.double().train(c["train"])
    return model, inputs, targets
