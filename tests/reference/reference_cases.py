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

from gradscope.reference import ReferenceLayer, Residual, SelfAttention
from gradscope.reference.registry import register_reference
from gradscope.reference.rnn import Recurrent

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


class Seq2Seq(nn.Module):
    """Encoder-decoder on one input: a TransformerDecoder reads x as its target and encoder(x) as its memory."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.decoder = nn.TransformerDecoder(layer, num_layers=2, norm=nn.LayerNorm(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[-2], dtype=x.dtype)
        y = self.decoder(x, self.encoder(x), tgt_mask=causal, tgt_is_causal=True)
        return self.head(y).reshape(-1, 3)


@register_reference(Seq2Seq)
class Seq2SeqReference(ReferenceLayer):
    """x forks into the decoder's target and the encoder's input, so its gradient is the sum of both paths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.encoder, self.decoder, self.head = self.child("encoder"), self.child("decoder"), self.child("head")
        self.decoder.reference.memory = self.encoder.forward(x)
        self.decoder.reference.tgt_mask = nn.Transformer.generate_square_subsequent_mask(x.shape[-2], dtype=x.dtype)
        self.decoder.reference.tgt_is_causal = True
        y = self.head.forward(self.decoder.forward(x))
        self.shape = y.shape
        return y.reshape(-1, 3)

    def backward(self, grad_out: torch.Tensor):
        grad_x = self.decoder.backward(self.head.backward(grad_out.reshape(self.shape)))
        return grad_x + self.encoder.backward(self.decoder.reference.grad_memory), {}


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
    # --- Activations added with issue 15, each in-place where the module can be ---
    *[
        case(f"{name}{'-inplace' if inplace else ''}", mlp_head(factory(inplace)), VECTOR_BATCH, CE)
        for name, factory in [
            ("elu", lambda inplace: nn.ELU(0.7, inplace=inplace)),
            ("hardtanh", lambda inplace: nn.Hardtanh(-0.4, 0.6, inplace=inplace)),
            ("relu6", lambda inplace: nn.ReLU6(inplace=inplace)),
            ("hardswish", lambda inplace: nn.Hardswish(inplace=inplace)),
            ("mish", lambda inplace: nn.Mish(inplace=inplace)),
            ("silu", lambda inplace: nn.SiLU(inplace=inplace)),
            ("leaky-relu", lambda inplace: nn.LeakyReLU(0.3, inplace=inplace)),
        ]
        for inplace in (False, True)
        if not (name in ("silu", "leaky-relu") and not inplace)  # the plain ones have cases above
    ],
    case("softplus", mlp_head(nn.Softplus()), VECTOR_BATCH, CE),
    case("softplus-beta-threshold", mlp_head(nn.Softplus(beta=2.5, threshold=1.0)), VECTOR_BATCH, CE),
    case(
        "relu6-scaled",
        lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU6(), nn.Linear(6, 3)),
        lambda: (_randn(7, 5) * 8, _classes(7, 3)),
        CE,
    ),
    # --- Normalization added with issue 15 ---
    case(
        "groupnorm",
        _conv_net(nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6)), 6),
        lambda: (_randn(3, 2, 5, 5), _classes(3, 3)),
        CE,
    ),
    case("groupnorm-no-affine-1d", mlp_head(nn.GroupNorm(2, 6, affine=False)), VECTOR_BATCH, CE),
    case(
        "groupnorm-one-group-3d",
        _conv_net(nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(1, 4)), 4),
        lambda: (_randn(3, 2, 6), _classes(3, 3)),
        CE,
    ),
    case(
        "instancenorm1d",
        _conv_net(nn.Sequential(nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3)), 3),
        lambda: (_randn(3, 2, 7), _classes(3, 3)),
        CE,
    ),
    case(
        "instancenorm2d-affine",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True)), 3),
        lambda: (_randn(3, 2, 5, 6), _classes(3, 3)),
        CE,
    ),
    case(
        "instancenorm2d-running-stats-train",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True, track_running_stats=True)), 3),
        lambda: (_randn(3, 2, 5, 6), _classes(3, 3)),
        CE,
    ),
    case(
        "instancenorm3d-running-stats-eval",
        _conv_net(nn.Sequential(nn.Conv3d(2, 3, 2), nn.InstanceNorm3d(3, affine=True, track_running_stats=True)), 3),
        lambda: (_randn(2, 2, 4, 4, 3), _classes(2, 3)),
        CE,
        train=False,
    ),
    case(
        "instancenorm3d",
        _conv_net(nn.Sequential(nn.Conv3d(2, 3, 2), nn.InstanceNorm3d(3)), 3),
        lambda: (_randn(2, 2, 4, 4, 3), _classes(2, 3)),
        CE,
    ),
    case(
        "batchnorm3d",
        _conv_net(nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), 3),
        lambda: (_randn(3, 2, 3, 4, 3), _classes(3, 3)),
        CE,
    ),
    case("rmsnorm", mlp_head(nn.RMSNorm(6)), VECTOR_BATCH, CE),
    case("rmsnorm-eps-no-affine", mlp_head(nn.RMSNorm(6, eps=1e-3, elementwise_affine=False)), VECTOR_BATCH, CE),
    case(
        "rmsnorm-2d",
        lambda: nn.Sequential(nn.RMSNorm((2, 5)), nn.Flatten(), nn.Linear(10, 3)),
        lambda: (_randn(4, 2, 5), _classes(4, 3)),
        CE,
    ),
    # --- Convolutions added with issue 15: padding modes, Conv3d, transposed ---
    *[
        case(
            f"conv{dims}d-{mode}",
            _conv_net(
                {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](
                    4, 4, 3, padding=padding, dilation=dilation, groups=2, padding_mode=mode
                ),
                4,
            ),
            (lambda dims=dims: (_randn(2, 4, *(6, 5, 4)[:dims]), _classes(2, 3))),
            CE,
        )
        for dims in (1, 2, 3)
        for mode, padding, dilation in [("reflect", 1, 1), ("replicate", 2, 2), ("circular", "same", 1)]
    ],
    case(
        "conv3d",
        _conv_net(nn.Conv3d(2, 4, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1)), 4),
        lambda: (_randn(2, 2, 4, 5, 3), _classes(2, 3)),
        CE,
    ),
    case(
        "conv3d-unbatched-groups-dilation",
        lambda: nn.Sequential(nn.Conv3d(2, 4, 2, dilation=2, groups=2, bias=False), nn.Flatten(0), nn.LazyLinear(3)),
        lambda: (_randn(2, 4, 4, 5), torch.tensor(1)),
        CE,
    ),
    case(
        "conv-transpose1d",
        _conv_net(nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), 4),
        lambda: (_randn(2, 3, 5), _classes(2, 3)),
        CE,
    ),
    case(
        "conv-transpose2d-groups-dilation",
        _conv_net(
            nn.ConvTranspose2d(
                4, 6, (3, 2), stride=(2, 3), padding=(0, 1), output_padding=(1, 2), groups=2, dilation=(2, 1)
            ),
            6,
        ),
        lambda: (_randn(2, 4, 3, 4), _classes(2, 3)),
        CE,
    ),
    case(
        "conv-transpose2d-no-bias-unbatched",
        lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 2, stride=2, bias=False), nn.Flatten(0), nn.LazyLinear(3)),
        lambda: (_randn(2, 3, 3), torch.tensor(0)),
        CE,
    ),
    case(
        "conv-transpose3d",
        _conv_net(nn.ConvTranspose3d(2, 3, 2, stride=2, padding=1, output_padding=1), 3),
        lambda: (_randn(2, 2, 3, 2, 3), _classes(2, 3)),
        CE,
    ),
    # --- Pooling in 1 and 3 dimensions, and adaptive max pooling ---
    case(
        "maxpool1d",
        _conv_net(nn.Sequential(nn.Conv1d(2, 3, 1), nn.MaxPool1d(3, 2, 1, dilation=1, ceil_mode=True)), 3),
        lambda: (_randn(3, 2, 8), _classes(3, 3)),
        CE,
    ),
    case(
        "maxpool3d",
        _conv_net(
            nn.Sequential(nn.Conv3d(2, 3, 1), nn.MaxPool3d(2, stride=(1, 2, 2), padding=(1, 0, 1), dilation=(1, 1, 2))),
            3,
        ),
        lambda: (_randn(2, 2, 4, 5, 6), _classes(2, 3)),
        CE,
    ),
    case(
        "avgpool1d",
        _conv_net(nn.Sequential(nn.Conv1d(2, 3, 1), nn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False)), 3),
        lambda: (_randn(3, 2, 8), _classes(3, 3)),
        CE,
    ),
    case(
        "avgpool3d",
        _conv_net(nn.Sequential(nn.Conv3d(2, 3, 1), nn.AvgPool3d(2, 1, 1, divisor_override=3)), 3),
        lambda: (_randn(2, 2, 3, 4, 3), _classes(2, 3)),
        CE,
    ),
    case(
        "adaptive-avgpool1d",
        _conv_net(nn.Sequential(nn.Conv1d(2, 3, 1), nn.AdaptiveAvgPool1d(3)), 3),
        lambda: (_randn(3, 2, 7), _classes(3, 3)),
        CE,
    ),
    case(
        "adaptive-avgpool3d",
        _conv_net(nn.Sequential(nn.Conv3d(2, 3, 1), nn.AdaptiveAvgPool3d((2, None, 3))), 3),
        lambda: (_randn(2, 2, 5, 3, 4), _classes(2, 3)),
        CE,
    ),
    case(
        "adaptive-maxpool1d",
        _conv_net(nn.Sequential(nn.Conv1d(2, 3, 1), nn.AdaptiveMaxPool1d(3)), 3),
        lambda: (_randn(3, 2, 7), _classes(3, 3)),
        CE,
    ),
    case(
        "adaptive-maxpool2d-relu-ties",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.AdaptiveMaxPool2d((3, None))), 3),
        lambda: (_randn(2, 2, 7, 4), _classes(2, 3)),
        CE,
    ),
    case(
        "adaptive-maxpool3d",
        _conv_net(nn.Sequential(nn.Conv3d(2, 3, 1), nn.AdaptiveMaxPool3d(2)), 3),
        lambda: (_randn(2, 2, 5, 3, 4), _classes(2, 3)),
        CE,
    ),
    # --- Resampling ---
    *[
        case(
            f"upsample-{name}",
            _conv_net(nn.Sequential(nn.Conv2d(2, 3, 1), layer), 3),
            lambda: (_randn(2, 2, 4, 3), _classes(2, 3)),
            CE,
        )
        for name, layer in [
            ("nearest", nn.Upsample(scale_factor=2)),
            ("nearest-size", nn.Upsample(size=(7, 5))),
            ("nearest-exact", nn.Upsample(scale_factor=1.5, mode="nearest-exact")),
            ("bilinear", nn.Upsample(scale_factor=2, mode="bilinear")),
            ("bilinear-align-corners", nn.Upsample(size=(6, 7), mode="bilinear", align_corners=True)),
            ("bilinear-fractional", nn.Upsample(scale_factor=(1.7, 2.5), mode="bilinear")),
            ("nearest2d", nn.UpsamplingNearest2d(scale_factor=3)),
            ("bilinear2d", nn.UpsamplingBilinear2d(scale_factor=2)),
            ("pixel-shuffle", nn.Sequential(nn.Conv2d(3, 12, 1), nn.PixelShuffle(2))),
            ("pixel-unshuffle", nn.Sequential(nn.Upsample(scale_factor=2), nn.PixelUnshuffle(2))),
        ]
    ],
    case(
        "upsample-linear-1d",
        _conv_net(nn.Sequential(nn.Conv1d(2, 3, 1), nn.Upsample(scale_factor=2.5, mode="linear")), 3),
        lambda: (_randn(2, 2, 5), _classes(2, 3)),
        CE,
    ),
    case(
        "upsample-trilinear-3d",
        _conv_net(
            nn.Sequential(nn.Conv3d(2, 3, 1), nn.Upsample(size=(3, 4, 5), mode="trilinear", align_corners=True)), 3
        ),
        lambda: (_randn(2, 2, 2, 3, 3), _classes(2, 3)),
        CE,
    ),
    # --- Channel dropout (eval here; training, with the recorded masks, in test_reference_layers.py) ---
    case(
        "dropout1d-eval",
        _conv_net(nn.Sequential(nn.Conv1d(2, 3, 1), nn.Dropout1d(0.5)), 3),
        lambda: (_randn(2, 2, 5), _classes(2, 3)),
        CE,
        train=False,
    ),
    case(
        "dropout2d-eval",
        _conv_net(nn.Sequential(nn.Conv2d(2, 3, 1), nn.Dropout2d(0.5)), 3),
        lambda: (_randn(2, 2, 4, 3), _classes(2, 3)),
        CE,
        train=False,
    ),
    case(
        "dropout3d-p0-train",
        _conv_net(nn.Sequential(nn.Conv3d(2, 3, 1), nn.Dropout3d(0.0)), 3),
        lambda: (_randn(2, 2, 2, 3, 2), _classes(2, 3)),
        CE,
    ),
    # --- EmbeddingBag on 2-d input (one bag per row; offsets and per-sample weights in test_reference_layers.py) ---
    *[
        case(
            f"embedding-bag-{mode}",
            lambda mode=mode: nn.Sequential(nn.EmbeddingBag(9, 4, mode=mode, padding_idx=1), nn.Linear(4, 3)),
            lambda: (torch.randint(0, 9, (6, 4)), _classes(6, 3)),
            CE,
        )
        for mode in ("sum", "mean", "max")
    ],
    # --- Recurrent layers: backpropagation through time, each wrapped as Recurrent(rnn) to keep rnn(x)[0] ---
    case(
        "lstm-language-model",
        lambda: nn.Sequential(
            nn.Embedding(7, 4), Recurrent(nn.LSTM(4, 5, batch_first=True)), nn.Linear(5, 7), nn.Flatten(0, 1)
        ),
        lambda: (torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (15,))),
        CE,
    ),
    case(
        "gru-bidirectional-2-layers-seq-first",
        lambda: nn.Sequential(
            Recurrent(nn.GRU(3, 4, num_layers=2, bidirectional=True)), nn.Linear(8, 3), nn.Flatten(0, 1)
        ),
        lambda: (_randn(5, 2, 3), _classes(10, 3)),
        CE,
    ),
    case(
        "rnn-relu-no-bias-dropout-eval-unbatched",
        lambda: nn.Sequential(
            Recurrent(nn.RNN(5, 4, num_layers=2, nonlinearity="relu", bias=False, dropout=0.5)), nn.Linear(4, 3)
        ),
        VECTOR_BATCH,
        CE,
        train=False,
    ),
    case(
        "lstm-proj-tanh-rnn",
        lambda: nn.Sequential(Recurrent(nn.LSTM(5, 6, proj_size=3)), Recurrent(nn.RNN(3, 4)), nn.Linear(4, 3)),
        VECTOR_BATCH,
        CE,
    ),
    # --- Encoder-decoder: the decoder reads encoder(x) as its memory (Seq2Seq's composite reference) ---
    case(
        "seq2seq-decoder-stack",
        lambda: Seq2Seq(norm_first=False),
        lambda: (_randn(2, 5, 8), _classes(10, 3)),
        CE,
    ),
    case(
        "seq2seq-decoder-prenorm-unbatched",
        lambda: Seq2Seq(norm_first=True),
        lambda: (_randn(5, 8), _classes(5, 3)),
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
    *[
        case(f"{name}-{reduction}", lambda: nn.Linear(5, 3), lambda: (_randn(6, 5), _randn(6, 3)), loss(reduction))
        for name, loss in [
            ("l1", lambda r: nn.L1Loss(reduction=r)),
            ("smooth-l1-beta", lambda r: nn.SmoothL1Loss(reduction=r, beta=0.7)),
            ("huber-delta", lambda r: nn.HuberLoss(reduction=r, delta=0.4)),
        ]
        for reduction in ("mean", "sum")
    ],
    case(
        "kl-div-batchmean",
        lambda: nn.Sequential(nn.Linear(5, 4), nn.LogSoftmax(dim=1)),
        lambda: (_randn(6, 5), torch.softmax(_randn(6, 4), 1)),
        nn.KLDivLoss(reduction="batchmean"),
    ),
    case(
        "kl-div-log-target-sum-functional",
        lambda: nn.Sequential(nn.Linear(5, 4), nn.LogSoftmax(dim=1)),
        lambda: (_randn(6, 5), torch.log_softmax(_randn(6, 4), 1)),
        functools.partial(F.kl_div, reduction="sum", log_target=True),
    ),
    case(
        "bce-weight",
        lambda: nn.Sequential(nn.Linear(5, 3), nn.Sigmoid()),
        lambda: (_randn(6, 5), torch.rand(6, 3, dtype=D)),
        nn.BCELoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=D)),
    ),
    case(
        "bce-with-logits-pos-weight-mean",
        lambda: nn.Linear(5, 3),
        lambda: (_randn(6, 5), torch.randint(0, 2, (6, 3)).to(D)),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5, 1.0], dtype=D)),
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
