"""The scope follows the optimizer and the model after watch() (issue 14, item 5)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope import GradscopeWarning


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _batches(n: int):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)) for _ in range(n)]


def _stat(report, step, layer, stat):
    df = report.stats
    sel = df[(df.step == step) & (df.layer == layer) & (df.param == "*") & (df.stat == stat)]
    assert len(sel) == 1, (step, layer, stat)
    return float(sel.value.iloc[0])


def _messages(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, GradscopeWarning)]


@pytest.mark.parametrize("explicit", [False, True])
def test_a_recreated_optimizer_is_followed_and_no_step_reads_as_skipped(explicit):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    norms = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, optimizer=opt, rules="none", sample_every=1) as scope:
            for step, (x, y) in enumerate(_batches(12), start=1):
                if step == 5:  # resume / new phase: a new optimizer over the same parameters
                    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                    if explicit:
                        scope.attach_optimizer(opt)
                nn.functional.mse_loss(model(x), y).backward()
                norms[step] = float(model[2].weight.grad.double().norm())
                opt.step()
                scope.step()
                opt.zero_grad()
    report = scope.report()
    followed = [m for m in _messages(caught) if "not the optimizer passed to watch" in m]
    assert len(followed) == (0 if explicit else 1)
    assert report.skipped_steps == []
    assert sorted(report.stats.step.unique()) == list(range(1, 13))
    assert scope.optimizer is opt and report.meta["optimizer"] == "Adam"
    for step in (4, 5, 12):
        df = report.stats
        sel = df[(df.step == step) & (df.layer == "2") & (df.param == "weight") & (df.stat == "l2_norm")]
        assert float(sel.value.iloc[0]) == pytest.approx(norms[step], rel=1e-6)
    assert _stat(report, 12, "2", "update_ratio") > 0  # measured on the new optimizer's steps


def _usual_loop(steps: int, *, twice: bool = False, set_to_none: bool = True):
    """backward, opt.step(), scope.step() (twice: the mistake), zero_grad; the scope and its warnings."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, optimizer=opt, rules="none") as scope:
            for x, y in _batches(steps):
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                scope.step()
                if twice:
                    scope.step()
                opt.zero_grad(set_to_none=set_to_none)
    return scope, _messages(caught)


def test_calling_step_twice_per_optimizer_step_warns_once():
    scope, messages = _usual_loop(6, twice=True)
    repeated = [m for m in messages if "called again" in m]
    assert len(repeated) == 1 and "once per optimizer step" in repeated[0]
    assert scope.step_count == 12


def test_a_gradscaler_style_skipped_step_is_not_mistaken_for_a_repeat():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, optimizer=opt, rules="none") as scope:
            for i, (x, y) in enumerate(_batches(4)):
                nn.functional.mse_loss(model(x), y).backward()
                if i != 1:  # step 2: the optimizer step is skipped, a backward ran
                    opt.step()
                scope.step()
                opt.zero_grad()
    assert not [m for m in _messages(caught) if "called again" in m]
    assert scope.report().skipped_steps == [2]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_backward_between_optimizer_step_and_scope_step_warns_once(set_to_none):
    # The next batch's backward runs before scope.step(): the gradients captured at opt.step() were
    # written over in place (same tensor, new version), so the statistics land one step late.
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = _batches(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, optimizer=opt, rules="none") as scope:
            x, y = batches[0]
            nn.functional.mse_loss(model(x), y).backward()
            for x, y in batches[1:]:
                opt.step()
                nn.functional.mse_loss(model(x), y).backward()  # the mistake: before scope.step()
                scope.step()
            opt.zero_grad(set_to_none=set_to_none)
    late = [m for m in _messages(caught) if "A backward pass ran between" in m]
    assert len(late) == 1 and "one step late" in late[0]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_usual_loop_neither_warns_of_a_late_backward_nor_of_a_repeat(set_to_none):
    # zero_grad(set_to_none=True) frees the gradients: the next ones may take the freed tensors' ids
    # (the markers hold weak references, not ids); set_to_none=False keeps the tensors (versions change).
    scope, messages = _usual_loop(8, set_to_none=set_to_none)
    assert not [m for m in messages if "A backward pass ran between" in m or "called again" in m], messages
    assert scope.report().skipped_steps == []


def test_a_module_replaced_before_step_one_is_watched_without_a_false_no_gradient():
    model = _mlp()
    with gradscope.watch(model, rules=["no_gradient"]) as scope:
        model[2] = nn.Linear(8, 2)  # a new head after watch(), before the first step
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in _batches(4):
            nn.functional.mse_loss(model(x), y).backward()
            norm = float(model[2].weight.grad.double().norm())
            opt.step()
            scope.step()
            opt.zero_grad()
    report = scope.report()
    assert not [f for f in report.findings if f.kind == "no_gradient"]
    df = report.stats
    sel = df[(df.step == 4) & (df.layer == "2") & (df.param == "weight") & (df.stat == "l2_norm")]
    assert float(sel.value.iloc[0]) == pytest.approx(norm, rel=1e-6)


def test_a_module_added_after_step_one_is_named_in_a_warning():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, optimizer=opt, rules="none", flush_every=2) as scope:
            for step, (x, y) in enumerate(_batches(6), start=1):
                if step == 3:
                    model.append(nn.Linear(2, 2))
                    opt.add_param_group({"params": model[3].parameters()})
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                scope.step()
                opt.zero_grad()
    changed = [m for m in _messages(caught) if "changed after watch()" in m]
    assert len(changed) == 1 and "3.weight" in changed[0] and "3.bias" in changed[0]


@pytest.fixture
def overwrite_on_conversion():
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    yield
    torch.__future__.set_overwrite_module_params_on_conversion(before)


def test_parameters_replaced_by_to_are_followed_before_step_one_and_named_after(overwrite_on_conversion):
    model = _mlp()
    with gradscope.watch(model, rules="none") as scope:
        model.to(torch.float64)  # replaces every parameter under the future flag
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in _batches(3):
            nn.functional.mse_loss(model(x.double()), y.double()).backward()
            norm = float(model[0].weight.grad.norm())
            opt.step()
            scope.step()
            opt.zero_grad()
    df = scope.report().stats
    sel = df[(df.step == 3) & (df.layer == "0") & (df.param == "weight") & (df.stat == "l2_norm")]
    assert float(sel.value.iloc[0]) == pytest.approx(norm, rel=1e-12)

    model = _mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, rules="none") as scope:
            for step, (x, _) in enumerate(_batches(3), start=1):
                if step == 2:
                    model.to(torch.float64)
                model(x.to(next(model.parameters()).dtype)).sum().backward()
                scope.step()
                model.zero_grad()
    changed = [m for m in _messages(caught) if "changed after watch()" in m]
    assert len(changed) == 1 and "0.weight" in changed[0]


def _grow_at(steps: int, at: int) -> tuple[list[str], list[int]]:
    """``steps`` steps flushing at each one, a module appended at step ``at``: the warnings, the steps that named it."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    named_at = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, optimizer=opt, rules="none", flush_every=1) as scope:
            for step, (x, y) in enumerate(_batches(steps), start=1):
                if step == at:
                    model.append(nn.Linear(2, 2))
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                scope.step()  # flush_every=1: flush number `step`
                opt.zero_grad()
                if any("changed after watch()" in m for m in _messages(caught)) and not named_at:
                    named_at.append(step)
    return [m for m in _messages(caught) if "changed after watch()" in m], named_at


def test_a_module_added_late_is_named_at_the_next_checked_flush_and_at_close():
    from gradscope.capture.lifecycle import UNWATCHED_CHECK_EVERY

    assert UNWATCHED_CHECK_EVERY == 8  # flushes 1-8 look, then 9, 17, 25... and the last
    changed, named_at = _grow_at(20, 12)
    assert named_at == [17] and len(changed) == 1 and "3.weight" in changed[0]
    # a change after the last checked flush is named by the last flush, at close()
    changed, named_at = _grow_at(12, 10)
    assert named_at == [] and len(changed) == 1 and "3.weight" in changed[0]
