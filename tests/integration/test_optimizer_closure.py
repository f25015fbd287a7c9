"""``optimizer.step(closure)``: the statistics are those of the gradients the closure computed.

Lightning (and LBFGS) run forward and backward *inside* ``optimizer.step``, through a closure. The
optimizer's step pre-hook fires before the closure, when ``.grad`` still holds the previous step's
gradients (or None); gradscope must read them after the closure returns.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _norms64(model: nn.Module) -> dict[str, float]:
    out = {}
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        out[layer] = out.get(layer, 0.0) + float(p.grad.double().pow(2).sum())
    out["*"] = sum(out.values())
    return {k: math.sqrt(v) for k, v in out.items()}


def _by_step(report: gradscope.Report, stat: str = "l2_norm") -> dict[int, dict[str, float]]:
    df = report.stats
    df = df[(df.stat == stat) & (df.param == "*")]
    return {int(s): dict(zip(g.layer, g.value)) for s, g in df.groupby("step")}


@pytest.mark.parametrize("as_kwarg", [True, False], ids=["closure=", "positional"])
def test_sgd_step_with_closure_records_the_closure_gradients(as_kwarg):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(5)]
    expected = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradscope.GradscopeWarning)
        scope = gradscope.watch(model, optimizer=opt, sample_every=2)
        for x, y in data:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                expected.append(_norms64(model))
                return loss

            loss = opt.step(closure=closure) if as_kwarg else opt.step(closure)
            scope.step(loss=loss)
        scope.close()
    report = scope.report()
    got = _by_step(report)
    assert report.skipped_steps == []
    assert sorted(got) == [1, 2, 3, 4, 5]  # step 1 included: its gradients exist only after the closure
    for step, ref in enumerate(expected, start=1):
        for layer in ("0", "2", "*"):
            np.testing.assert_allclose(got[step][layer], ref[layer], rtol=1e-6, err_msg=f"step {step} {layer}")
    # the update ratio needs the weights before and after the update of the same step
    ur = report.stats.query("stat == 'update_ratio' and layer == '*'")
    assert list(ur.step) == [1, 3, 5] and (ur.value > 0).all()


def test_lbfgs_records_the_first_closure_evaluation():
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    first: list[dict[str, float]] = []
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradscope.GradscopeWarning)  # no "backward ran between" warning
        scope = gradscope.watch(model, optimizer=opt)
        for _ in range(2):
            calls.append(0)

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                if calls[-1] == 0:
                    first.append(_norms64(model))
                calls[-1] += 1
                return loss

            opt.step(closure)
            scope.step()
        scope.close()
    got = _by_step(scope.report())
    assert min(calls) > 1  # LBFGS evaluated the closure several times per step
    for step, ref in enumerate(first, start=1):
        np.testing.assert_allclose(got[step]["*"], ref["*"], rtol=1e-6)
