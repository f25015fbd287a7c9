"""What a record means: one per optimizer step, accumulated, frozen, tied, unused, skipped; clean removal."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.errors import ConfigurationError

from .helpers import mlp, value


def _batches(n, seed=0, d_in=6, classes=3, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def test_gradient_accumulation_gives_one_record_of_the_accumulated_gradient():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    micro = _batches(8)
    expected = []
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        for step in range(2):
            for x, y in micro[4 * step : 4 * step + 4]:
                (nn.functional.cross_entropy(model(x), y) / 4).backward()
            expected.append(np.linalg.norm(model[0].weight.grad.double().numpy()))
            opt.step()
            scope.step()
            opt.zero_grad()
    df = scope.report().stats
    assert sorted(df.step.unique()) == [1, 2]
    for step in (1, 2):
        assert value(df, step, "0", "weight", "l2_norm") == pytest.approx(expected[step - 1], rel=1e-6)
    # the accumulated gradient is not the last micro-batch's
    x, y = micro[7]
    m2 = copy.deepcopy(model)
    m2.zero_grad()
    (nn.functional.cross_entropy(m2(x), y) / 4).backward()
    assert np.linalg.norm(m2[0].weight.grad.numpy()) != pytest.approx(expected[1], rel=1e-3)


def test_without_optimizer_statistics_are_taken_at_scope_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, rules="none") as scope:
        x, y = _batches(1)[0]
        nn.functional.cross_entropy(model(x), y).backward()
        ref = np.linalg.norm(model[2].weight.grad.double().numpy())
        opt.step()
        scope.step()
        opt.zero_grad()
    df = scope.report().stats
    assert value(df, 1, "2", "weight", "l2_norm") == pytest.approx(ref, rel=1e-6)
    assert "update_ratio" not in set(df.stat)


def test_with_optimizer_zero_grad_may_come_before_scope_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        x, y = _batches(1)[0]
        nn.functional.cross_entropy(model(x), y).backward()
        ref = np.linalg.norm(model[2].weight.grad.double().numpy())
        opt.step()
        opt.zero_grad()
        scope.step()
    assert value(scope.report().stats, 1, "2", "weight", "l2_norm") == pytest.approx(ref, rel=1e-6)


def test_frozen_parameters_are_listed_and_never_recorded():
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with gradscope.watch(model, optimizer=opt) as scope:
        for x, y in _batches(3):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            scope.step()
            opt.zero_grad()
    report = scope.report()
    assert report.frozen == ["0.weight", "0.bias"]
    assert "0" not in set(report.stats.layer)
    assert scope.frame.trainable[:, :2].sum() == 0
    assert [f for f in report.findings if f.layer == "0"] == []


def test_unfreezing_during_training_is_followed():
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        for i, (x, y) in enumerate(_batches(4)):
            if i == 2:
                model[0].weight.requires_grad_(True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            scope.step()
            opt.zero_grad()
    df = scope.report().stats
    assert sorted(df[(df.layer == "0") & (df.param == "weight")].step.unique()) == [3, 4]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, 11)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


def test_tied_parameters_are_counted_once_under_every_owner():
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        idx = torch.randint(0, 11, (4, 7))
        nn.functional.cross_entropy(model(idx).reshape(-1, 11), idx.reshape(-1)).backward()
        unique = {id(p): p for p in model.parameters()}.values()
        total = np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in unique))
        tied = np.linalg.norm(model.emb.weight.grad.double().numpy())
        opt.step()
        scope.step()
    df = scope.report().stats
    layers = set(df.layer)
    assert "emb+head" in layers and "emb" not in layers
    assert len(df[(df.step == 1) & (df.stat == "l2_norm") & (df.param == "weight") & (df.layer == "emb+head")]) == 1
    assert value(df, 1, "emb+head", "weight", "l2_norm") == pytest.approx(tied, rel=1e-6)
    assert value(df, 1, "*", "*", "l2_norm") == pytest.approx(total, rel=1e-6)
    assert scope.layout.params[0].aliases == ("emb.weight", "head.weight")


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def test_a_parameter_without_gradient_is_recorded_as_such():
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            scope.step()
            opt.zero_grad()
    frame = scope.frame
    names = frame.schema.param_names
    has = dict(zip(names, frame.has_grad.T))
    assert has["used.weight"].all() and not has["unused.weight"].any() and not has["unused.bias"].any()
    assert frame.trainable.all()
    assert "unused" not in set(scope.report().stats.layer)


def _hook_state(model, opt):
    mods = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]
    params = [len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters()]
    params += [len(p._backward_hooks or {}) for p in model.parameters()]
    optim = (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks))
    return mods, params, optim


def test_close_leaves_the_model_exactly_as_it_was():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_state(model, opt)
    attrs_before = {name: set(vars(m)) for name, m in model.named_modules()}
    pattrs_before = [set(vars(p)) for p in model.parameters()]
    scope = gradscope.watch(model, optimizer=opt, sample_every=1)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    assert _hook_state(model, opt) != before  # hooks were really attached
    opt.step()
    scope.step()
    opt.zero_grad()
    state = copy.deepcopy(model.state_dict())
    out = model(x)
    scope.close()
    scope.close()  # idempotent
    assert _hook_state(model, opt) == before
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs_before
    assert [set(vars(p)) for p in model.parameters()] == pattrs_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert torch.equal(model(x), out)
    # and it can be watched again
    gradscope.watch(model).close()


def test_close_removes_hooks_when_the_training_loop_raises():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_state(model, opt)
    with pytest.raises(RuntimeError, match="boom"):
        with gradscope.watch(model, optimizer=opt, sample_every=1):
            model(torch.randn(2, 6)).sum().backward()
            raise RuntimeError("boom")
    assert _hook_state(model, opt) == before


def test_watching_the_same_model_twice_raises_and_two_models_do_not_interfere():
    a, b = mlp(), mlp(hidden=7)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    sa = gradscope.watch(a, optimizer=oa, rules="none")
    with pytest.raises(ConfigurationError, match="already watched"):
        gradscope.watch(a)
    sb = gradscope.watch(b, optimizer=ob, rules="none")
    xa = torch.randn(4, 6)
    a(xa).sum().backward()
    ref_a = np.linalg.norm(a[2].weight.grad.numpy())
    oa.step()
    sa.step()
    for _ in range(2):
        b(torch.randn(4, 6)).sum().backward()
        ob.step()
        sb.step()
        ob.zero_grad()
    ra, rb = sa.close(), sb.close()
    assert ra.steps == 1 and rb.steps == 2
    assert value(ra.stats, 1, "2", "weight", "l2_norm") == pytest.approx(ref_a, rel=1e-6)
    assert set(rb.stats.step) == {1, 2} and set(ra.stats.step) == {1}


def test_every_records_steps_1_and_every_nth():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, every=3, sample_every=6, rules="none") as scope:
        for x, y in _batches(10):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            scope.step(loss=1.0)
            opt.zero_grad()
    df = scope.report().stats
    assert sorted(df.step.unique()) == [1, 4, 7, 10]
    assert sorted(df[df.stat == "update_ratio"].step.unique()) == [1, 7]
    assert list(scope.report().scalars.index) == [1, 4, 7, 10]


def test_a_step_the_optimizer_did_not_take_is_recorded_as_skipped():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, rules="none") as scope:
        for i, (x, y) in enumerate(_batches(4)):
            nn.functional.cross_entropy(model(x), y).backward()
            if i != 1:  # what GradScaler does when it finds inf: no optimizer.step()
                opt.step()
            scope.step()
            opt.zero_grad()
    report = scope.report()
    assert report.skipped_steps == [2]
    assert sorted(report.stats.step.unique()) == [1, 3, 4]
    assert scope.frame.skipped.tolist() == [False, True, False, False]


def test_an_optimizer_other_than_the_watched_one_is_followed_with_a_warning():
    # The optimizer passed to watch() never steps; another one steps the same parameters (re-created
    # after a resume, an LR finder): gradscope follows it, so no step reads as skipped.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(gradscope.GradscopeWarning, match="not the optimizer passed to watch"):
        with gradscope.watch(model, optimizer=other, rules="none") as scope:
            for x, y in _batches(25):
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                scope.step()
                opt.zero_grad()
    report = scope.report()
    assert report.skipped_steps == []
    assert sorted(report.stats.step.unique()) == list(range(1, 26))
    assert scope.optimizer is opt


def test_update_ratio_matches_the_weights_before_and_after_adam():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, sample_every=1, rules="none") as scope:
        for x, y in _batches(3):
            nn.functional.cross_entropy(model(x), y).backward()
            w0 = model[4].weight.detach().double().clone()
            opt.step()
            w1 = model[4].weight.detach().double().clone()
            scope.step()
            opt.zero_grad()
    ratio = float((w1 - w0).norm() / w0.norm())
    assert value(scope.report().stats, 3, "4", "weight", "update_ratio") == pytest.approx(ratio, rel=1e-5)


def test_layer_depth_order_is_the_forward_order_not_the_registration_order():
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.last = nn.Linear(4, 2)
            self.first = nn.Linear(3, 4)

        def forward(self, x):
            return self.last(torch.relu(self.first(x)))

    model = Backwards()
    with gradscope.watch(model, rules="none") as scope:
        model(torch.randn(2, 3)).sum().backward()
        scope.step()
        assert scope.layers_by_depth() == ["first", "last"]
        assert scope._hooks.count("order") == 0  # discovery hooks are gone after step 1
    assert scope.report().meta["layers_by_depth"] == ["first", "last"]


def test_wrapped_models_are_named_without_the_wrapper_prefix():
    model = mlp()
    dp = nn.DataParallel(model)  # on CPU it just wraps
    with gradscope.watch(dp, rules="none") as scope:
        dp(torch.randn(2, 6)).sum().backward()
        scope.step()
    assert {"0", "2", "4"} <= set(scope.report().stats.layer)
