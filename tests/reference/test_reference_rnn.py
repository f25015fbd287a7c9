"""RNN, LSTM and GRU references against autograd in float64: BPTT in every configuration.

Each check differentiates the module's full output, ``(output, h_n)`` or ``(output, (h_n, c_n))``, with
random weights on every output, so the gradients of the input, of the initial state and of every
parameter are all compared, not just those a language model's loss reaches.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradscope
from gradscope.errors import UnsupportedLayerError
from gradscope.reference import manual_backward
from gradscope.reference.registry import REFERENCES, register_reference
from gradscope.reference.rnn import GRUReference, LSTMReference, Recurrent, RNNReference

# PyTorch notes that its oneDNN kernels do not do proj_size and that it uses its own: not a concern here.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

D = torch.float64
RTOL = 1e-10
SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
KINDS = {
    "rnn-tanh": lambda i, h, **kw: nn.RNN(i, h, **kw),
    "rnn-relu": lambda i, h, **kw: nn.RNN(i, h, nonlinearity="relu", **kw),
    "lstm": lambda i, h, **kw: nn.LSTM(i, h, **kw),
    "lstm-proj": lambda i, h, **kw: nn.LSTM(i, h + 1, proj_size=h, **kw),
    "gru": lambda i, h, **kw: nn.GRU(i, h, **kw),
}
REFERENCE_OF = {nn.RNN: RNNReference, nn.LSTM: LSTMReference, nn.GRU: GRUReference}


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = max(got.abs().max().item(), want.abs().max().item(), 1e-300)
    err = (got - want).abs().max().item()
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    assert err <= RTOL * scale + 1e-13, f"{what}: max abs err {err:.3g}, scale {scale:.3g}"


def check_against_autograd(module: nn.RNNBase, x: torch.Tensor, hx) -> None:
    """Forward outputs and every gradient of ``module(x, hx)`` from the reference and from autograd."""
    module = module.double()
    reference = REFERENCE_OF[type(module)](module)
    with torch.no_grad():
        output, state = reference.run(x, hx)

    x_leaf = x.clone().requires_grad_()
    hx_leaves = None if hx is None else [t.clone().requires_grad_() for t in _flat(hx)]
    hx_arg = None if hx_leaves is None else (tuple(hx_leaves) if isinstance(hx, tuple) else hx_leaves[0])
    want_output, want_state = module(x_leaf, hx_arg)
    grad_output = torch.randn_like(want_output)
    grad_state = [torch.randn_like(t) for t in _flat(want_state)]
    loss = (want_output * grad_output).sum() + sum((t * g).sum() for t, g in zip(_flat(want_state), grad_state))
    params = dict(module.named_parameters())
    leaves = [x_leaf, *(hx_leaves or []), *params.values()]
    want = dict(
        zip(["x", *[f"hx[{i}]" for i in range(len(hx_leaves or []))], *params], torch.autograd.grad(loss, leaves))
    )

    with torch.no_grad():
        grad_x, grad_hx, grads = reference.backward_through_time(
            grad_output, tuple(grad_state) if isinstance(want_state, tuple) else grad_state[0]
        )
    _close(output, want_output.detach(), "output")
    for i, (got_t, want_t) in enumerate(zip(_flat(state), _flat(want_state))):
        _close(got_t, want_t.detach(), f"final state [{i}]")
    _close(grad_x, want["x"], "d input")
    for i, got_t in enumerate(_flat(grad_hx) if hx is not None else []):
        _close(got_t, want[f"hx[{i}]"], f"d initial state [{i}]")
    assert set(grads) == set(params), f"parameters without a gradient: {set(params) ^ set(grads)}"
    for name in params:
        _close(grads[name], want[name], name)


def _inputs(module: nn.RNNBase, length: int, batch: int, unbatched: bool, initial: bool):
    size, directions = module.input_size, 2 if module.bidirectional else 1
    if unbatched:
        x = torch.randn(length, size, dtype=D)
    else:
        x = (
            torch.randn(batch, length, size, dtype=D)
            if module.batch_first
            else torch.randn(length, batch, size, dtype=D)
        )
    if not initial:
        return x, None
    lead = (module.num_layers * directions,) + (() if unbatched else (batch,))
    out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    h0 = torch.randn(*lead, out, dtype=D)
    return x, ((h0, torch.randn(*lead, module.hidden_size, dtype=D)) if isinstance(module, nn.LSTM) else h0)


GRID = list(itertools.product(KINDS, [False, True], [False, True], [1, 2], [True, False], [False, True]))


@pytest.mark.parametrize(
    "kind, batch_first, bidirectional, layers, bias, initial",
    GRID,
    ids=[
        f"{k}-{'bf' if bf else 'sf'}-{'bi' if bi else 'uni'}-l{n}-{'bias' if b else 'nobias'}-{'h0' if h else 'zero'}"
        for k, bf, bi, n, b, h in GRID
    ],
)
def test_every_configuration_matches_autograd(kind, batch_first, bidirectional, layers, bias, initial):
    torch.manual_seed(GRID.index((kind, batch_first, bidirectional, layers, bias, initial)))
    module = KINDS[kind](3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    check_against_autograd(module.double(), *_inputs(module, 5, 2, unbatched=False, initial=initial))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("initial", [False, True])
def test_unbatched_input(kind, initial):
    torch.manual_seed(3)
    module = KINDS[kind](2, 3, num_layers=2, bidirectional=True).double()
    check_against_autograd(module, *_inputs(module, 4, 1, unbatched=True, initial=initial))


@SETTINGS
@given(
    kind=st.sampled_from(sorted(KINDS)),
    seed=st.integers(0, 2**16),
    length=st.integers(1, 6),
    batch=st.integers(1, 3),
    size=st.integers(1, 4),
    hidden=st.integers(1, 4),
    layers=st.integers(1, 3),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans()),
)
def test_random_shapes_match_autograd(kind, seed, length, batch, size, hidden, layers, flags):
    batch_first, bidirectional, bias, initial, unbatched = flags
    torch.manual_seed(seed)
    module = KINDS[kind](
        size, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
    ).double()
    check_against_autograd(module, *_inputs(module, length, batch, unbatched, initial))


def test_dropout_between_layers_is_the_identity_in_eval_mode():
    torch.manual_seed(0)
    module = nn.LSTM(3, 4, num_layers=3, dropout=0.5).double().eval()
    check_against_autograd(module, *_inputs(module, 4, 2, unbatched=False, initial=True))


def _language_model(rnn: nn.RNNBase, vocab: int = 7) -> nn.Sequential:
    torch.manual_seed(0)
    width = rnn.proj_size if getattr(rnn, "proj_size", 0) > 0 else rnn.hidden_size
    head = nn.Linear(width * (2 if rnn.bidirectional else 1), vocab)
    return nn.Sequential(nn.Embedding(vocab, rnn.input_size), Recurrent(rnn), head, nn.Flatten(0, 1)).double()


def _tokens(vocab: int = 7):
    torch.manual_seed(1)
    return torch.randint(0, vocab, (3, 5)), torch.randint(0, vocab, (15,))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_language_model_through_the_reference_pass(kind):
    model = _language_model(KINDS[kind](4, 5, num_layers=2, bidirectional=kind == "gru", batch_first=True))
    tokens, targets = _tokens()
    result = manual_backward(model, tokens, targets, nn.CrossEntropyLoss())

    loss = nn.CrossEntropyLoss()(model(tokens), targets)
    loss.backward()
    for name, param in model.named_parameters():
        _close(result.param_grads[name], param.grad, name)
    _close(result.loss, loss.detach(), "loss")
    # The wrapped layer is a node of its own: its input gradient and outputs are recorded under "1.rnn".
    assert ("1.rnn", 0) in result.input_grads and ("1.rnn", 0) in result.outputs


def test_verify_passes_an_lstm_language_model_on_the_reference_path():
    model = _language_model(nn.LSTM(4, 5, batch_first=True))
    report = gradscope.verify(model, *_tokens(), nn.CrossEntropyLoss())
    assert report.ok, str(report)
    assert all(c.method == "reference" for c in report.gradients)
    assert {c.name for c in report.comparisons if c.kind == "parameter"} == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_verify_passes_in_float32_with_its_default_tolerance(kind):
    model = _language_model(KINDS[kind](4, 5, num_layers=2, bidirectional=True, batch_first=True)).float()
    report = gradscope.verify(model, *_tokens(), nn.CrossEntropyLoss(), dtype=torch.float32)
    assert report.ok, str(report)
    assert all(c.method == "reference" for c in report.gradients)


def test_dropout_between_layers_in_training_mode_is_named_as_unsupported():
    model = _language_model(nn.GRU(4, 5, num_layers=2, dropout=0.3, batch_first=True)).train()
    with pytest.raises(UnsupportedLayerError, match=r"GRU '1\.rnn' with dropout p=0\.3 between layers in training"):
        manual_backward(model, *_tokens(), nn.CrossEntropyLoss())


def test_initial_and_final_state_through_the_node_attributes():
    """A composite passes h0 and the final state's gradient by setting them on the reference."""
    torch.manual_seed(2)
    module = nn.LSTM(3, 4, num_layers=2).double()
    x, (h0, c0) = _inputs(module, 4, 2, unbatched=False, initial=True)
    reference = LSTMReference(module)
    reference.initial_state = (h0, c0)
    with torch.no_grad():
        output = reference.forward(x)
        grad_h_n = torch.randn(2, 2, 4, dtype=D)
        reference.grad_final_state = (grad_h_n, torch.zeros(2, 2, 4, dtype=D))
        grad_out = torch.randn_like(output)
        grad_x, grads = reference.backward(grad_out)

    leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
    want_output, (h_n, _) = module(leaves[0], (leaves[1], leaves[2]))
    loss = (want_output * grad_out).sum() + (h_n * grad_h_n).sum()
    want_x, want_h0, want_c0, want_w = torch.autograd.grad(loss, [*leaves, module.weight_hh_l0])
    _close(output, want_output.detach(), "output")
    _close(reference.final_state[0], h_n.detach(), "h_n")
    _close(grad_x, want_x, "d input")
    _close(reference.grad_initial_state[0], want_h0, "d h0")
    _close(reference.grad_initial_state[1], want_c0, "d c0")
    _close(grads["weight_hh_l0"], want_w, "weight_hh_l0")


class _ForgetGateSignBug(LSTMReference):
    """The planted bug: the forget gate's derivative with the wrong sign (dc ⊙ c_prev negated)."""

    def _cell_backward(self, dh, dc, h_prev, c_prev, step, w, cell_grads):
        grad_xw, _, _, grad_c = super()._cell_backward(dh, dc, h_prev, c_prev, step, w, cell_grads)
        hidden = step["f"].shape[-1]
        flipped = grad_xw.clone()
        flipped[..., hidden : 2 * hidden] *= -1  # i, f, g, o: the second chunk is f
        return flipped, flipped, flipped @ w["weight_hh"], grad_c


def test_a_wrong_gate_sign_is_caught_and_named():
    register_reference(nn.LSTM, overwrite=True)(_ForgetGateSignBug)
    try:
        model = _language_model(nn.LSTM(4, 5, batch_first=True))
        report = gradscope.verify(model, *_tokens(), nn.CrossEntropyLoss())
    finally:
        register_reference(nn.LSTM, overwrite=True)(LSTMReference)
    assert REFERENCES.get(nn.LSTM) is LSTMReference

    assert not report.ok
    assert report.first_mismatch is not None and report.first_mismatch.layer == "1.rnn"
    wrong = {c.name for c in report.mismatches if c.kind == "parameter"}
    # The layer's own weights differ, those downstream of it agree.
    assert {"1.rnn.weight_ih_l0", "1.rnn.weight_hh_l0"} <= wrong
    assert not wrong & {"2.weight", "2.bias"}
    assert "The disagreement starts at parameter '1.rnn.weight_ih_l0' (layer '1.rnn')" in str(report)
