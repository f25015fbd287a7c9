"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: backpropagation through time, one cell step at a time.

A recurrent layer applies the same cell at every time step, feeding each step's hidden state to the
next. Unrolled over L steps it is an L-layer network whose layers share their weights, so its
backward is the ordinary chain rule run backwards in time (BPTT): the gradient reaching the hidden
state h_t is the sum of what arrives from the output at step t and what step t+1 sends back, and the
gradient of each shared weight is the sum of its uses over all steps. PyTorch's cells, per batch row
(x_t the input, h the previous hidden state; gates are chunks of one packed ``weight_ih`` / ``weight_hh``):

    RNN   h' = tanh(W_ih x_t + b_ih + W_hh h + b_hh)                 (or relu)
    LSTM  i, f, g, o = σ, σ, tanh, σ of (W_ih x_t + b_ih + W_hh h + b_hh), in that order
          c' = f ⊙ c + i ⊙ g          h' = o ⊙ tanh(c')              (h' = W_hr h' with proj_size)
    GRU   r, z = σ of the first two chunks of (W_ih x_t + b_ih) + (W_hh h + b_hh)
          n = tanh(W_in x_t + b_in + r ⊙ (W_hn h + b_hn))    (b_hn inside the reset product)
          h' = (1 - z) ⊙ n + z ⊙ h

Multi-layer stacks feed each layer's output sequence to the next; a bidirectional layer runs a second
cell (the ``_reverse`` parameters) from the last step to the first and concatenates both outputs.

Walked as a node, a recurrent module computes its first output, ``rnn(x)[0]`` (as a language model
uses it: ``out, _ = self.lstm(x)``), so it can sit inside a :class:`Recurrent` block. A composite
reference that passes an initial state or uses the final state sets ``initial_state`` (and, before
the backward, ``grad_final_state``) on the node's reference and reads ``final_state`` and
``grad_initial_state`` from it, as attention's composites configure :class:`MultiheadAttentionReference`.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from gradscope.errors import UnsupportedLayerError
from gradscope.reference.base import ParamGrads, ReferenceLayer
from gradscope.reference.registry import register_reference

__all__ = ["GRUReference", "LSTMReference", "RNNReference", "Recurrent", "RecurrentReference"]

#: A hidden state: ``h`` for RNN and GRU, ``(h, c)`` for LSTM, shaped like the module's ``hx``.
State = Union[Tensor, tuple[Tensor, Tensor]]


class Recurrent(nn.Module):
    """A recurrent layer as a one-input module, so it can sit in ``nn.Sequential``: y = rnn(x)[0].

    ``nn.LSTM`` returns ``(output, (h_n, c_n))``; a language model keeps the output sequence and drops
    the final state. Wrapping the layer as ``Recurrent(nn.LSTM(...))`` says so in a form the reference
    pass can follow: ``nn.Sequential(nn.Embedding(V, d), Recurrent(nn.LSTM(d, h, batch_first=True)),
    nn.Linear(h, V))`` is a complete LSTM language model.

    Args:
        rnn: an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (kept as ``self.rnn``).

    Shape:
        x: what ``rnn`` accepts; y: its output sequence.
    """

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        """Compute the output sequence of ``rnn`` from a zero initial state."""
        return self.rnn(x)[0]


@register_reference(Recurrent)
class RecurrentReference(ReferenceLayer):
    """The wrapped layer's reference; its gradients are recorded under ``rnn``."""

    module: Recurrent

    def forward(self, x: Tensor) -> Tensor:
        """Run ``rnn``'s reference; its node keeps only the output sequence."""
        self.rnn = self.child("rnn")
        return self.rnn.forward(x)

    def backward(self, grad_out: Tensor) -> tuple[Tensor | None, ParamGrads]:
        """The final state is dropped, so no gradient reaches it; all parameters live in ``rnn``."""
        return self.rnn.backward(grad_out), {}


class _RecurrentReference(ReferenceLayer):
    """What every recurrent layer shares: layouts, layers, directions, and the BPTT loop around one cell.

    Subclasses write one time step (:meth:`_cell`) and its backward (:meth:`_cell_backward`).
    """

    module: nn.RNNBase

    #: Set by a composite before :meth:`forward`: the initial state (``hx``), ``None`` for zeros.
    initial_state: State | None = None
    #: Set by a composite before :meth:`backward`: d loss / d final state, ``None`` when it is unused.
    grad_final_state: State | None = None
    #: The number of gate chunks in ``weight_ih`` (1 for RNN, 4 for LSTM, 3 for GRU).
    gates = 1

    # --- forward -------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """The output sequence; the final state is kept as ``final_state`` (``h_n`` or ``(h_n, c_n)``)."""
        output, self.final_state = self.run(x, self.initial_state)
        return output

    def run(self, x: Tensor, hx: State | None = None) -> tuple[Tensor, State]:
        """Compute ``module(x, hx)``: the output sequence and the final state, keeping what BPTT needs.

        Args:
            x: ``[L, N, H_in]``, ``[N, L, H_in]`` (``batch_first``) or unbatched ``[L, H_in]``.
            hx: the initial state in the module's layout (``[layers · directions, N, H]``), or ``None``.
        """
        m = self.module
        self._check_supported(x)
        self.unbatched = x.dim() == 2
        self.batch_first = m.batch_first and not self.unbatched
        seq = x.unsqueeze(1) if self.unbatched else (x.transpose(0, 1) if self.batch_first else x)  # [L, N, I]
        h0, c0 = self._initial(hx, seq)
        self.directions = 2 if m.bidirectional else 1
        self.saved: list[list[dict[str, object]]] = []
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        layer_input = seq
        for layer in range(m.num_layers):
            outputs, saved_layer = [], []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                out, h, c, saved = self._layer_forward(layer_input, layer, direction, h0[k], c0[k] if c0 else None)
                outputs.append(out)
                saved_layer.append(saved)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            self.saved.append(saved_layer)
            layer_input = torch.cat(outputs, dim=-1)  # both directions side by side feed the next layer
        output = (
            layer_input.squeeze(1)
            if self.unbatched
            else (layer_input.transpose(0, 1) if self.batch_first else layer_input)
        )
        final_h = torch.stack(h_n)
        final_h = final_h.squeeze(1) if self.unbatched else final_h
        if c0 is None:
            return output, final_h
        final_c = torch.stack(c_n)
        return output, (final_h, final_c.squeeze(1) if self.unbatched else final_c)

    def _layer_forward(
        self, inp: Tensor, layer: int, direction: int, h: Tensor, c: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, object]]:
        """One direction of one layer over the whole sequence ``inp`` ``[L, N, I]``."""
        w = self._weights(layer, direction)
        xw = inp @ w["weight_ih"].T  # every step's input projection at once: [L, N, gates·H]
        if "bias_ih" in w:
            xw = xw + w["bias_ih"]
        steps = range(inp.shape[0])
        order = list(reversed(steps)) if direction == 1 else list(steps)
        outputs: list[Tensor] = [inp.new_empty(0)] * inp.shape[0]
        cache = []
        for t in order:
            h_prev, c_prev = h, c
            h, c, step = self._cell(xw[t], h, c, w)
            cache.append((t, h_prev, c_prev, step))
            outputs[t] = h
        return torch.stack(outputs), h, c, {"input": inp, "cache": cache, "weights": w}

    # --- backward ------------------------------------------------------------------------------------

    def backward(self, grad_out: Tensor) -> tuple[Tensor, ParamGrads]:
        """BPTT from d loss / d output (and ``grad_final_state`` when set); d loss / d hx lands in ``grad_initial_state``."""
        grad_x, self.grad_initial_state, grads = self.backward_through_time(grad_out, self.grad_final_state)
        return grad_x, grads

    def backward_through_time(
        self, grad_output: Tensor, grad_state: State | None = None
    ) -> tuple[Tensor, State, ParamGrads]:
        """Backpropagate through every layer and time step.

        Args:
            grad_output: d loss / d output sequence, the output's shape.
            grad_state: d loss / d final state (``h_n`` or ``(h_n, c_n)``), or ``None`` for zero.

        Returns:
            ``(grad_x, grad_hx, param_grads)``: d loss / d input, d loss / d initial state (the layout of
            ``hx``), and the gradient of every parameter by name.
        """
        g = (
            grad_output.unsqueeze(1)
            if self.unbatched
            else (grad_output.transpose(0, 1) if self.batch_first else grad_output)
        )
        grad_h_n, grad_c_n = self._split_state(grad_state)
        if grad_h_n is not None and self.unbatched:
            grad_h_n = grad_h_n.unsqueeze(1)
            grad_c_n = grad_c_n.unsqueeze(1) if grad_c_n is not None else None
        layers = self.module.num_layers
        grad_h0: list[Tensor] = [g.new_empty(0)] * (layers * self.directions)
        grad_c0: list[Tensor] = list(grad_h0)
        grads: ParamGrads = {}
        for layer in reversed(range(layers)):
            width = g.shape[-1] // self.directions
            grad_input = None
            for direction in range(self.directions):
                k = layer * self.directions + direction
                dh = grad_h_n[k] if grad_h_n is not None else None
                dc = grad_c_n[k] if grad_c_n is not None else None
                grad_dir = g[..., direction * width : (direction + 1) * width]
                gi, gh, gc = self._layer_backward(
                    self.saved[layer][direction], grad_dir, dh, dc, layer, direction, grads
                )
                grad_input = gi if grad_input is None else grad_input + gi  # both directions read this input
                grad_h0[k], grad_c0[k] = gh, gc
            assert grad_input is not None
            g = grad_input
        grad_x = g.squeeze(1) if self.unbatched else (g.transpose(0, 1) if self.batch_first else g)
        h = torch.stack(grad_h0)
        h = h.squeeze(1) if self.unbatched else h
        if self.gates != 4:
            return grad_x, h, grads
        c = torch.stack(grad_c0)
        return grad_x, (h, c.squeeze(1) if self.unbatched else c), grads

    def _layer_backward(
        self,
        saved: dict[str, object],
        grad_out: Tensor,
        dh: Tensor | None,
        dc: Tensor | None,
        layer: int,
        direction: int,
        grads: ParamGrads,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """BPTT through one direction of one layer; returns d input, d h0, d c0 and fills ``grads``."""
        inp, cache, w = saved["input"], saved["cache"], saved["weights"]
        assert isinstance(inp, Tensor) and isinstance(cache, list) and isinstance(w, dict)
        first_h = cache[0][1]
        dh = torch.zeros_like(first_h) if dh is None else dh
        dc = None if cache[0][2] is None else (torch.zeros_like(cache[0][2]) if dc is None else dc)
        steps = len(cache)
        grad_xw: list[Tensor] = [inp.new_empty(0)] * steps  # d loss / d (W_ih x_t + b_ih), per step
        grad_hw: list[Tensor] = []  # d loss / d (W_hh h_{t-1} + b_hh), in backward order
        h_prevs: list[Tensor] = []
        cell_grads: dict[str, Tensor] = {}
        for t, h_prev, c_prev, step in reversed(cache):  # the last step first
            dh = dh + grad_out[t]  # h_t reaches the loss through the output at t and through step t+1
            # The step's backward: d (W_ih x_t + b_ih), d (W_hh h_{t-1} + b_hh), and dh becomes d h_{t-1}.
            grad_xw[t], grad_hw_t, dh, dc = self._cell_backward(dh, dc, h_prev, c_prev, step, w, cell_grads)
            grad_hw.append(grad_hw_t)
            h_prevs.append(h_prev)
        # Shared weights: each gradient is the sum over time of its per-step contributions.
        gxw_all = torch.stack(grad_xw).reshape(-1, grad_xw[0].shape[-1])  # [L·N, gates·H]
        ghw_all = torch.cat(grad_hw)  # [L·N, gates·H]
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        grads["weight_ih" + suffix] = gxw_all.T @ inp.reshape(-1, inp.shape[-1])
        grads["weight_hh" + suffix] = ghw_all.T @ torch.cat(h_prevs)
        if "bias_ih" in w:
            grads["bias_ih" + suffix] = gxw_all.sum(0)
            grads["bias_hh" + suffix] = ghw_all.sum(0)
        for name, grad in cell_grads.items():
            grads[name + suffix] = grad
        grad_input = torch.stack(grad_xw) @ w["weight_ih"]
        return grad_input, dh, (dc if dc is not None else dh.new_empty(0))

    # --- one cell, written by each subclass -----------------------------------------------------------

    def _cell(
        self, xw: Tensor, h: Tensor, c: Tensor | None, w: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        raise NotImplementedError

    def _cell_backward(
        self,
        dh: Tensor,
        dc: Tensor | None,
        h_prev: Tensor,
        c_prev: Tensor | None,
        step: dict[str, Tensor],
        w: dict[str, Tensor],
        cell_grads: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Return d(xw), d(hw), d h_prev and d c_prev for one step, from d h and d c after it."""
        raise NotImplementedError

    # --- helpers -------------------------------------------------------------------------------------

    def _weights(self, layer: int, direction: int) -> dict[str, Tensor]:
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.module.bias else [])
        names += ["weight_hr"] if getattr(self.module, "proj_size", 0) > 0 else []
        return {name: getattr(self.module, name + suffix) for name in names}

    def _initial(self, hx: State | None, seq: Tensor) -> tuple[list[Tensor], list[Tensor] | None]:
        m = self.module
        count = m.num_layers * (2 if m.bidirectional else 1)
        out = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
        h, c = self._split_state(hx)
        if h is None:
            h = seq.new_zeros(count, seq.shape[1], out)
            c = seq.new_zeros(count, seq.shape[1], m.hidden_size) if self.gates == 4 else None
        elif self.unbatched:
            h, c = h.unsqueeze(1), (c.unsqueeze(1) if c is not None else None)
        return list(h), (list(c) if c is not None else None)

    @staticmethod
    def _split_state(state: State | None) -> tuple[Tensor | None, Tensor | None]:
        if state is None:
            return None, None
        if isinstance(state, tuple):
            return state[0], state[1]
        return state, None

    def _check_supported(self, x: Tensor) -> None:
        m = self.module
        problem = None
        if not isinstance(x, Tensor):
            problem = f"a {type(x).__name__} input (packed sequences)"
        elif m.training and m.dropout > 0 and m.num_layers > 1:
            problem = f"dropout p={m.dropout} between layers in training mode (its random mask cannot be recorded)"
        if problem is not None:
            raise UnsupportedLayerError(
                f"No reference backward for {type(m).__name__} {self.path or '(model)'!r} with {problem}. "
                "Call model.eval() (or use dropout=0) and pass padded tensors, or use "
                "gradscope.verify(..., on_unsupported='finite_difference') to check it numerically."
            )


@register_reference(nn.RNN)
class RNNReference(_RecurrentReference):
    """Elman RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh); d pre = d h' ⊙ act'(pre)."""

    module: nn.RNN

    def _cell(
        self, xw: Tensor, h: Tensor, c: Tensor | None, w: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        pre = xw + h @ w["weight_hh"].T
        if "bias_hh" in w:
            pre = pre + w["bias_hh"]
        if self.module.nonlinearity == "relu":
            h_new = torch.relu(pre)
        else:
            h_new = torch.tanh(pre)
        return h_new, None, {"h": h_new}

    def _cell_backward(
        self,
        dh: Tensor,
        dc: Tensor | None,
        h_prev: Tensor,
        c_prev: Tensor | None,
        step: dict[str, Tensor],
        w: dict[str, Tensor],
        cell_grads: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        h = step["h"]
        if self.module.nonlinearity == "relu":
            dpre = torch.where(h > 0, dh, torch.zeros_like(dh))  # relu' = 1 where active
        else:
            dpre = dh * (1 - h * h)  # tanh' = 1 - tanh²
        # The same pre-activation holds both projections: W_ih x and W_hh h get the same gradient.
        return dpre, dpre, dpre @ w["weight_hh"], None


@register_reference(nn.LSTM)
class LSTMReference(_RecurrentReference):
    """LSTM with gates i, f, g, o (PyTorch's order), optionally projected (``proj_size``)."""

    module: nn.LSTM
    gates = 4

    def _cell(
        self, xw: Tensor, h: Tensor, c: Tensor | None, w: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        assert c is not None
        pre = xw + h @ w["weight_hh"].T
        if "bias_hh" in w:
            pre = pre + w["bias_hh"]
        i, f, g, o = pre.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        tanh_c = torch.tanh(c_new)
        h_new = o * tanh_c
        step = {"i": i, "f": f, "g": g, "o": o, "tanh_c": tanh_c, "h_unprojected": h_new}
        if "weight_hr" in w:
            h_new = h_new @ w["weight_hr"].T
        return h_new, c_new, step

    def _cell_backward(
        self,
        dh: Tensor,
        dc: Tensor | None,
        h_prev: Tensor,
        c_prev: Tensor | None,
        step: dict[str, Tensor],
        w: dict[str, Tensor],
        cell_grads: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        assert dc is not None and c_prev is not None
        i, f, g, o, tanh_c = step["i"], step["f"], step["g"], step["o"], step["tanh_c"]
        if "weight_hr" in w:  # h = W_hr h̃: a linear layer inside the step
            grad_hr = dh.T @ step["h_unprojected"]
            cell_grads["weight_hr"] = cell_grads["weight_hr"] + grad_hr if "weight_hr" in cell_grads else grad_hr
            dh = dh @ w["weight_hr"]
        do = dh * tanh_c  # h = o ⊙ tanh(c)
        dc = dc + dh * o * (1 - tanh_c * tanh_c)  # c reaches the loss through h and through step t+1
        di, dg, df = dc * g, dc * i, dc * c_prev  # c = f ⊙ c_prev + i ⊙ g
        dpre = torch.cat([di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], dim=-1)
        return dpre, dpre, dpre @ w["weight_hh"], dc * f


@register_reference(nn.GRU)
class GRUReference(_RecurrentReference):
    """GRU with gates r, z, n (PyTorch's order); the reset gate multiplies W_hn h + b_hn."""

    module: nn.GRU
    gates = 3

    def _cell(
        self, xw: Tensor, h: Tensor, c: Tensor | None, w: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        hw = h @ w["weight_hh"].T
        if "bias_hh" in w:
            hw = hw + w["bias_hh"]
        x_r, x_z, x_n = xw.chunk(3, dim=-1)
        h_r, h_z, h_n = hw.chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None, {"r": r, "z": z, "n": n, "h_n": h_n}

    def _cell_backward(
        self,
        dh: Tensor,
        dc: Tensor | None,
        h_prev: Tensor,
        c_prev: Tensor | None,
        step: dict[str, Tensor],
        w: dict[str, Tensor],
        cell_grads: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        r, z, n, h_n = step["r"], step["z"], step["n"], step["h_n"]
        dn_pre = dh * (1 - z) * (1 - n * n)  # h' = (1 - z) n + z h, n = tanh(...)
        dz_pre = dh * (h_prev - n) * z * (1 - z)
        dr_pre = dn_pre * h_n * r * (1 - r)  # n's pre-activation holds r ⊙ (W_hn h + b_hn)
        grad_xw = torch.cat([dr_pre, dz_pre, dn_pre], dim=-1)
        grad_hw = torch.cat([dr_pre, dz_pre, dn_pre * r], dim=-1)  # only the n chunk differs: r scales it
        return grad_xw, grad_hw, dh * z + grad_hw @ w["weight_hh"], None
