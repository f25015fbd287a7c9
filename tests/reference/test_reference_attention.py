"""Attention references against autograd in float64: masks, causal, cross-attention, SDPA, decoder blocks.

``nn.MultiheadAttention`` and the transformer blocks take more than one input (key, value, memory,
masks); a composite reference passes them by configuring the child's reference. These tests do what
such a composite does, on a reference pass of the block alone, and compare every output and gradient
(query, key, value, memory and every parameter) with autograd on the same call.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gradscope
from gradscope.errors import UnsupportedLayerError
from gradscope.reference import ReferenceLayer, manual_backward
from gradscope.reference.attention import ScaledDotProductAttentionReference
from gradscope.reference.backprop import Tape
from gradscope.reference.registry import REFERENCES, register_reference
from gradscope.reference.verify import DEFAULT_RTOL

D = torch.float64
RTOL = 1e-10
# The dtype under test and verify's default rtol for it (gradscope.reference.verify.DEFAULT_RTOL); the float32
# runs of the random-shape tests swap both through `in_dtype`.
TOLERANCE = {torch.float64: (1e-10, 1e-13), torch.float32: (DEFAULT_RTOL[torch.float32], 0.0)}
SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


@contextlib.contextmanager
def in_dtype(dtype: torch.dtype):
    """Run the module's checks in ``dtype``: float64 at 1e-10, float32 at verify's rtol plus 256 ulp."""
    global D, RTOL
    saved = D, RTOL
    D, RTOL = dtype, TOLERANCE[dtype][0]
    try:
        yield
    finally:
        D, RTOL = saved


def _close(got: Tensor | None, want: Tensor, what: str) -> None:
    assert got is not None, f"{what}: no gradient from the reference"
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    assert got.dtype == want.dtype == D, f"{what}: dtypes {got.dtype}, {want.dtype}, expected {D}"
    scale = max(got.abs().max().item(), want.abs().max().item())
    err = (got - want).abs().max().item()
    # float32: verify's rule (rtol 1e-4) and a floor of 256 ulp of the tensor's scale for entries that are
    # zero in exact arithmetic; float64: 1e-10 and an absolute 1e-13.
    floor = TOLERANCE[D][1] if D == torch.float64 else 256 * torch.finfo(D).eps * scale
    assert err <= RTOL * scale + floor, f"{what} ({D}): max abs err {err:.3g}, scale {scale:.3g}"


def _autograd(module: nn.Module, inputs: list[Tensor], call, grad_out: Tensor | None = None):
    """Output, d loss / d each input, d loss / d each parameter for loss = Σ output ⊙ grad_out."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    output = call(*leaves)
    grad_out = torch.randn_like(output) if grad_out is None else grad_out
    params = dict(module.named_parameters())
    grads = torch.autograd.grad((output * grad_out).sum(), leaves + list(params.values()))
    return output.detach(), grad_out, list(grads[: len(leaves)]), dict(zip(params, grads[len(leaves) :]))


def _reference_pass(module: nn.Module, x: Tensor, grad_out: Tensor, **settings):
    """What a composite does: configure the block's reference, run its node forward, then backward."""
    tape = Tape(module)
    with torch.no_grad():
        node = tape.node(module, "")
        for name, value in settings.items():
            setattr(node.reference, name, value)
        y = node.forward(x)
        grad_x = node.backward(grad_out)
    return y, grad_x, tape.param_grads, node.reference


# --- nn.MultiheadAttention -------------------------------------------------------------------------------


def _mask(kind: str | None, n: int, heads: int, length: int, keys: int) -> Tensor | None:
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(length, keys) < 0.4
        mask[:, 0] = False  # every query keeps one key: PyTorch's weights path would give NaN otherwise
        return mask
    if kind == "float":
        return torch.randn(length, keys, dtype=D)
    if kind == "causal":
        return torch.ones(length, keys, dtype=torch.bool).triu(1)
    mask = torch.rand(n * heads, length, keys) < 0.4  # "per-head": one mask per (sample, head)
    mask[..., 0] = False
    return mask


def _padding(kind: str | None, n: int, keys: int) -> Tensor | None:
    if kind is None:
        return None
    mask = torch.rand(n, keys) < 0.4
    mask[:, -1] = False
    return mask if kind == "bool" else torch.randn(n, keys, dtype=D).masked_fill(mask, -math.inf)


def _additive(mask: Tensor) -> Tensor:
    return torch.zeros(mask.shape, dtype=D).masked_fill(mask, -math.inf)


def check_mha(
    *,
    layout: str,
    cross: bool,
    kvdim: bool,
    mask: str | None,
    padding: str | None,
    bias: bool,
    n: int = 3,
    length: int = 4,
    keys: int = 5,
    embed: int = 6,
    heads: int = 2,
) -> None:
    keys = keys if cross else length
    extra = {"kdim": 3, "vdim": 5} if kvdim else {}
    mha = nn.MultiheadAttention(embed, heads, bias=bias, batch_first=layout == "batch_first", **extra).to(D)

    def seq(count: int, width: int) -> Tensor:
        shape = {"unbatched": (count, width), "batch_first": (n, count, width), "seq_first": (count, n, width)}
        return torch.randn(*shape[layout], dtype=D)

    x = seq(length, embed)
    key, value = (seq(keys, extra.get("kdim", embed)), seq(keys, extra.get("vdim", embed))) if cross else (x, x)
    batch = 1 if layout == "unbatched" else n
    attn_mask = _mask(mask, batch, heads, length, keys)
    key_padding = _padding(padding, batch, keys)
    if attn_mask is not None and key_padding is not None and attn_mask.dtype != key_padding.dtype:
        # PyTorch deprecates mixing a bool and a float mask: make both float, -∞ where masked
        attn_mask, key_padding = (m if m.is_floating_point() else _additive(m) for m in (attn_mask, key_padding))
    if layout == "unbatched" and key_padding is not None:
        key_padding = key_padding[0]
    causal = mask == "causal"

    inputs = [x, key, value] if cross else [x]
    want_y, grad_out, want_in, want_params = _autograd(
        mha,
        inputs,
        lambda *t: mha(
            *(t if cross else t * 3),
            attn_mask=attn_mask,
            key_padding_mask=key_padding,
            need_weights=False,
            is_causal=causal,
        )[0],
    )
    settings = {"attn_mask": attn_mask, "key_padding_mask": key_padding, "causal": causal}
    if cross:
        settings.update(key=key, value=value)
    y, grad_x, grads, reference = _reference_pass(mha, x, grad_out, **settings)

    _close(y, want_y, "output")
    _close(grad_x, want_in[0], "d query")
    if cross:
        _close(reference.grad_key, want_in[1], "d key")
        _close(reference.grad_value, want_in[2], "d value")
    else:
        assert reference.grad_key is None and reference.grad_value is None  # already summed into d query
    assert set(grads) == set(want_params)
    for name, want in want_params.items():
        _close(grads[name], want, name)


MHA_GRID = [
    (layout, cross, kvdim, mask, padding, bias)
    for layout, cross, kvdim, mask, padding, bias in itertools.product(
        ["batch_first", "seq_first", "unbatched"],
        [False, True],
        [False, True],
        [None, "bool", "float", "causal", "per-head"],
        [None, "bool", "float"],
        [True, False],
    )
    if (cross or not kvdim) and not (layout == "unbatched" and mask == "per-head")
]


@pytest.mark.parametrize(
    "layout, cross, kvdim, mask, padding, bias",
    MHA_GRID,
    ids=[
        f"{lay}-{'cross' if c else 'self'}{'-kvdim' if kv else ''}-mask_{m}-pad_{p}-{'bias' if b else 'nobias'}"
        for lay, c, kv, m, p, b in MHA_GRID
    ],
)
def test_multihead_attention_matches_autograd(layout, cross, kvdim, mask, padding, bias):
    torch.manual_seed(MHA_GRID.index((layout, cross, kvdim, mask, padding, bias)))
    check_mha(layout=layout, cross=cross, kvdim=kvdim, mask=mask, padding=padding, bias=bias)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 3),
    length=st.integers(1, 5),
    keys=st.integers(1, 5),
    head_dim=st.integers(1, 3),
    heads=st.integers(1, 3),
    layout=st.sampled_from(["batch_first", "seq_first", "unbatched"]),
    cross=st.booleans(),
    mask=st.sampled_from([None, "bool", "float", "causal"]),
    padding=st.sampled_from([None, "bool"]),
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_random_attention_shapes_match_autograd(
    dtype, seed, n, length, keys, head_dim, heads, layout, cross, mask, padding
):
    torch.manual_seed(seed)
    kvdim = cross and seed % 2 == 1
    with in_dtype(dtype):
        _random_mha(seed, n, length, keys, head_dim, heads, layout, cross, kvdim, mask, padding)


def _random_mha(seed, n, length, keys, head_dim, heads, layout, cross, kvdim, mask, padding):
    check_mha(
        layout=layout,
        cross=cross,
        kvdim=kvdim,
        mask=mask,
        padding=padding,
        bias=seed % 3 != 0,
        n=n,
        length=length,
        keys=keys,
        embed=head_dim * heads,
        heads=heads,
    )


def test_a_query_with_every_key_masked_gets_zero_output_and_no_gradient():
    """PyTorch's need_weights=False path returns 0 for such a row; the reference agrees, without NaN."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    x = torch.randn(2, 3, 4, dtype=D)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1] = True
    want_y, grad_out, want_in, want_params = _autograd(
        mha, [x], lambda t: mha(t, t, t, attn_mask=mask, need_weights=False)[0]
    )
    y, grad_x, grads, _ = _reference_pass(mha, x, grad_out, attn_mask=mask)
    assert not y.isnan().any()
    _close(y, want_y, "output")
    _close(grad_x, want_in[0], "d query")
    for name, want in want_params.items():
        _close(grads[name], want, name)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"add_bias_kv": True}, "add_bias_kv=True or add_zero_attn=True"),
        ({"dropout": 0.2}, r"attention dropout p=0\.2 in training mode"),
    ],
)
def test_unsupported_attention_is_named(settings, match):
    mha = nn.MultiheadAttention(4, 2, **settings).double().train()
    with pytest.raises(UnsupportedLayerError, match=match):
        _reference_pass(mha, torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D))


# --- F.scaled_dot_product_attention -------------------------------------------------------------------------

SDPA_GRID = list(
    itertools.product([None, "bool", "float", "causal"], [False, True], [None, 0.3], [(4, 4), (3, 5), (5, 3)])
)


def check_sdpa(mask: str | None, gqa: bool, scale: float | None, length: int, keys: int, lead=(2,)) -> None:
    q = torch.randn(*lead, 4, length, 3, dtype=D)
    kv_heads = 2 if gqa else 4
    k = torch.randn(*lead, kv_heads, keys, 3, dtype=D)
    v = torch.randn(*lead, kv_heads, keys, 5, dtype=D)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(length, keys) < 0.6  # True = may attend; some rows may have no key at all
    elif mask == "float":
        attn_mask = torch.randn(*lead, 1, length, keys, dtype=D)
    kwargs = {"attn_mask": attn_mask, "is_causal": mask == "causal", "scale": scale, "enable_gqa": gqa}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, **kwargs)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * grad_out).sum(), leaves)

    reference = ScaledDotProductAttentionReference()
    with torch.no_grad():
        got = reference.forward(q, k, v, **kwargs)
        got_grads = reference.backward(grad_out)
    _close(got, want.detach(), "output")
    for name, g, w in zip("qkv", got_grads, want_grads):
        _close(g, w, f"d {name}")


@pytest.mark.parametrize("mask, gqa, scale, shape", SDPA_GRID)
def test_scaled_dot_product_attention_matches_autograd(mask, gqa, scale, shape):
    torch.manual_seed(SDPA_GRID.index((mask, gqa, scale, shape)))
    check_sdpa(mask, gqa, scale, *shape)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    length=st.integers(1, 6),
    keys=st.integers(1, 6),
    mask=st.sampled_from([None, "bool", "float", "causal"]),
    gqa=st.booleans(),
    lead=st.sampled_from([(), (1,), (2,), (2, 3)]),
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_random_sdpa_shapes_match_autograd(dtype, seed, length, keys, mask, gqa, lead):
    torch.manual_seed(seed)
    with in_dtype(dtype):
        check_sdpa(mask, gqa, None, length, keys, lead)


def test_sdpa_dropout_is_refused():
    q = torch.randn(1, 2, 3, dtype=D)
    with pytest.raises(UnsupportedLayerError, match=r"dropout_p=0\.1"):
        ScaledDotProductAttentionReference().forward(q, q, q, dropout_p=0.1)


# --- transformer blocks with masks, and the decoder ---------------------------------------------------------


def _block_inputs(batch_first: bool, n: int = 2, length: int = 4, keys: int = 5, embed: int = 8):
    def seq(count):
        return torch.randn(n, count, embed, dtype=D) if batch_first else torch.randn(count, n, embed, dtype=D)

    return seq(length), seq(keys)


ENCODER_GRID = list(itertools.product([False, True], [False, True], ["relu", "gelu"], [False, True]))


@pytest.mark.parametrize("norm_first, batch_first, activation, masked", ENCODER_GRID)
def test_encoder_layer_with_masks_matches_autograd(norm_first, batch_first, activation, masked):
    torch.manual_seed(ENCODER_GRID.index((norm_first, batch_first, activation, masked)))
    layer = nn.TransformerEncoderLayer(
        8, 2, 12, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first
    ).double()
    x, _ = _block_inputs(batch_first)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1) if masked else None
    padding = torch.tensor([[False, False, True, False], [False, True, False, False]]) if masked else None
    want_y, grad_out, want_in, want_params = _autograd(
        layer, [x], lambda t: layer(t, src_mask=causal, src_key_padding_mask=padding, is_causal=masked)
    )
    y, grad_x, grads, _ = _reference_pass(
        layer, x, grad_out, src_mask=causal, src_key_padding_mask=padding, is_causal=masked
    )
    _close(y, want_y, "output")
    _close(grad_x, want_in[0], "d x")
    for name, want in want_params.items():
        _close(grads[name], want, name)


DECODER_GRID = list(
    itertools.product([False, True], [False, True], ["relu", "gelu", "module"], [False, True], [False, True])
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("norm_first, batch_first, activation, masked, bias", DECODER_GRID)
def test_decoder_layer_matches_autograd(norm_first, batch_first, activation, masked, bias, dtype):
    torch.manual_seed(DECODER_GRID.index((norm_first, batch_first, activation, masked, bias)))
    with in_dtype(dtype):
        _check_decoder_layer(norm_first, batch_first, activation, masked, bias)


def _check_decoder_layer(norm_first, batch_first, activation, masked, bias):
    act = nn.GELU(approximate="tanh") if activation == "module" else activation
    layer = nn.TransformerDecoderLayer(
        8, 2, 12, dropout=0.1, activation=act, batch_first=batch_first, norm_first=norm_first, bias=bias
    ).to(D)
    layer.eval()  # dropout off: the functional attention dropout has no mask to record
    tgt, memory = _block_inputs(batch_first)
    masks = {}
    if masked:
        masks = {
            "tgt_mask": nn.Transformer.generate_square_subsequent_mask(4, dtype=D),
            "tgt_is_causal": True,
            "tgt_key_padding_mask": _additive(
                torch.tensor([[False, False, True, False], [False] * 4])
            ),  # float, as tgt_mask
            "memory_mask": torch.rand(4, 5) < 0.3,
            "memory_key_padding_mask": torch.tensor([[False, True, False, False, False], [False] * 4 + [True]]),
        }
    want_y, grad_out, (want_tgt, want_memory), want_params = _autograd(
        layer, [tgt, memory], lambda t, m: layer(t, m, **masks)
    )
    y, grad_tgt, grads, reference = _reference_pass(layer, tgt, grad_out, memory=memory, **masks)
    _close(y, want_y, "output")
    _close(grad_tgt, want_tgt, "d tgt")
    _close(reference.grad_memory, want_memory, "d memory")
    assert set(grads) == set(want_params)
    for name, want in want_params.items():
        _close(grads[name], want, name)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_stack_sums_the_memory_gradient_over_layers(norm_first):
    torch.manual_seed(5)
    layer = nn.TransformerDecoderLayer(8, 4, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
    decoder = nn.TransformerDecoder(layer, num_layers=3, norm=nn.LayerNorm(8)).double()
    tgt, memory = _block_inputs(batch_first=True, n=3, length=5, keys=2)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=D)
    want_y, grad_out, (want_tgt, want_memory), want_params = _autograd(
        decoder, [tgt, memory], lambda t, m: decoder(t, m, tgt_mask=causal, tgt_is_causal=True)
    )
    y, grad_tgt, grads, reference = _reference_pass(
        decoder, tgt, grad_out, memory=memory, tgt_mask=causal, tgt_is_causal=True
    )
    _close(y, want_y, "output")
    _close(grad_tgt, want_tgt, "d tgt")
    _close(reference.grad_memory, want_memory, "d memory")
    for name, want in want_params.items():
        _close(grads[name], want, name)


def test_a_decoder_layer_without_its_memory_is_named():
    layer = nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0).double()
    with pytest.raises(UnsupportedLayerError, match=r"needs its memory input.*sets `memory`"):
        _reference_pass(layer, torch.randn(3, 8, dtype=D), torch.randn(3, 8, dtype=D))


class Seq2Seq(nn.Module):
    """An encoder-decoder over one input: the decoder reads x as its target and encoder(x) as its memory."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.decoder(x, self.encoder(x), tgt_mask=mask, tgt_is_causal=True)).flatten(0, 1)


class Seq2SeqReference(ReferenceLayer):
    """A composite: x forks into the decoder's target and the encoder, so its gradient is the sum of both."""

    def forward(self, x: Tensor) -> Tensor:
        self.encoder, self.decoder, self.head = self.child("encoder"), self.child("decoder"), self.child("head")
        self.shape = x.shape[:2]
        memory = self.encoder.forward(x)
        self.decoder.reference.memory = memory
        self.decoder.reference.tgt_mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        self.decoder.reference.tgt_is_causal = True
        return self.head.forward(self.decoder.forward(x)).flatten(0, 1)

    def backward(self, grad_out: Tensor):
        grad = self.head.backward(grad_out.unflatten(0, self.shape))
        grad_x = self.decoder.backward(grad)
        return grad_x + self.encoder.backward(self.decoder.reference.grad_memory), {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_verify_follows_an_encoder_decoder_composite(dtype):
    register_reference(Seq2Seq)(Seq2SeqReference)
    try:
        torch.manual_seed(0)
        model = Seq2Seq().to(dtype).eval()
        x, y = torch.randn(2, 5, 8, dtype=dtype), torch.randint(0, 3, (10,))
        report = gradscope.verify(model, x, y, nn.CrossEntropyLoss(), dtype=dtype)
        result = manual_backward(model.double(), x.double(), y, nn.CrossEntropyLoss())
    finally:
        REFERENCES.unregister(Seq2Seq)
    assert report.ok, str(report)
    assert all(c.method == "reference" for c in report.gradients)
    compared = {c.name for c in report.comparisons if c.kind == "parameter"}
    assert compared == {n for n, _ in model.named_parameters()}
    assert {"decoder.multihead_attn.in_proj_weight", "encoder.self_attn.in_proj_weight"} <= compared
    assert math.isfinite(float(result.loss))
