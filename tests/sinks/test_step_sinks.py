"""Sinks on the hot path: ``on_step`` gets the gradients the optimizer uses, when ``wants_grads`` asks."""

from __future__ import annotations

import torch
from sinkhelp import small_mlp, train

from gradscope.sinks import Sink


class _Seen(Sink):
    """Keeps, per recorded step, the names and float64 copies of the gradients ``on_step`` was given."""

    def __init__(self, every: int | None = None) -> None:
        self.every = every
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def wants_grads(self, step: int) -> bool:
        return True if self.every is None else step % self.every == 0

    def on_step(self, step, grads):
        self.seen[step] = {p.name: g.detach().double().clone() for p, g in grads}

    def write(self, update):
        pass


def test_a_sink_gets_the_gradients_at_the_steps_it_asks_for_and_an_empty_list_at_the_others():
    always, sometimes = _Seen(), _Seen(every=3)
    run = train(small_mlp(), 7, capture=range(1, 8), sinks=[always, sometimes], flush_every=4)
    assert sorted(always.seen) == sorted(sometimes.seen) == list(range(1, 8))  # on_step at every step
    names = [n for n, p in small_mlp().named_parameters()]
    for step in range(1, 8):
        assert list(always.seen[step]) == names
        for name, g in always.seen[step].items():  # the gradients the optimizer used at that step
            torch.testing.assert_close(g, run.grads[step][name], rtol=0, atol=0)
        if step % 3:
            assert sometimes.seen[step] == {}
        else:
            assert list(sometimes.seen[step]) == names
            assert all(torch.equal(sometimes.seen[step][n], always.seen[step][n]) for n in names)
