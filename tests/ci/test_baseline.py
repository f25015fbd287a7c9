"""Gradient-profile baselines: values against autograd by hand, the JSON format, and the comparison rule."""

from __future__ import annotations

import json
import math
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ci_helpers import EXAMPLES

import gradscope
from gradscope.baseline import (
    DEFAULT_TOLERANCE,
    PROFILE_SCHEMA,
    PROFILE_VERSION,
    GradientProfile,
    LayerProfile,
    compare,
    snapshot,
)
from gradscope.errors import ConfigurationError, GradientHealthError


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import broken_model
        import healthy_model

        yield healthy_model, broken_model
    finally:
        sys.path.remove(str(EXAMPLES))


class Net(nn.Module):
    def __init__(self, init_std: float | None = None, extra: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)
        self.extra = nn.Linear(3, 3) if extra else None
        if init_std is not None:
            for m in (self.fc1, self.fc2, self.out):
                nn.init.normal_(m.weight, std=init_std)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_net(init_std=None, extra=False):
    return Net(init_std, extra), (torch.randn(20, 6), torch.randint(0, 3, (20,))), F.cross_entropy


def _by_hand(factory, seed):
    """Layer gradient norms of one fresh model, seeded as snapshot documents, computed in float64."""
    torch.manual_seed(seed)
    model, (x, y), loss_fn = factory()[:3]
    torch.manual_seed(seed)
    model.double()
    loss = loss_fn(model(x.double()), y)
    loss.backward()
    return {
        name: math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in mod.parameters()))
        for name, mod in model.named_children()
        if mod is not None and any(p.grad is not None for p in mod.parameters())
    }, float(loss.detach())


def test_snapshot_values_match_autograd_by_hand():
    profile = snapshot(make_net, seeds=[0, 4])
    assert profile.seeds == [0, 4]
    assert [lp.layer for lp in profile.layers] == ["fc1", "fc2", "out"]  # forward order
    assert [lp.numel for lp in profile.layers] == [6 * 12 + 12, 12 * 12 + 12, 12 * 3 + 3]
    for k, seed in enumerate([0, 4]):
        norms, loss = _by_hand(make_net, seed)
        for lp in profile.layers:
            assert lp.norms[k] == pytest.approx(norms[lp.layer], rel=1e-5)
            assert lp.rms[k] == pytest.approx(norms[lp.layer] / math.sqrt(lp.numel), rel=1e-5)
        assert profile.losses[k] == pytest.approx(loss, rel=1e-6)
    fc1 = profile.layer("fc1")
    logs = np.log10([fc1.norms[0], fc1.norms[1]])
    assert fc1.log10_mean == pytest.approx(logs.mean()) and fc1.log10_std == pytest.approx(logs.std(ddof=1))


def test_snapshot_restores_the_random_state_and_is_deterministic():
    torch.manual_seed(99)
    random.seed(99)
    state, py = torch.get_rng_state(), random.getstate()
    a, b = snapshot(make_net, seeds=2), snapshot(make_net, seeds=2)
    assert torch.equal(state, torch.get_rng_state()) and py == random.getstate()
    assert [lp.norms for lp in a.layers] == [lp.norms for lp in b.layers]
    assert a.seeds == [0, 1]


def test_json_round_trip_and_format(tmp_path):
    profile = snapshot(make_net, seeds=3)
    path = tmp_path / "sub" / "profile.json"
    text = profile.to_json(path)
    data = json.loads(path.read_text())
    assert text == path.read_text()
    assert (data["schema"], data["version"], data["stat"]) == (PROFILE_SCHEMA, PROFILE_VERSION, "l2_norm")
    assert data["layers"][0]["layer"] == "fc1" and len(data["layers"][0]["l2_norm"]) == 3
    assert data["layers"][0]["log10_norm_mean"] == pytest.approx(profile.layers[0].log10_mean)
    back = GradientProfile.from_json(path)
    assert [(lp.layer, lp.numel, lp.norms, lp.rms) for lp in back.layers] == [
        (lp.layer, lp.numel, lp.norms, lp.rms) for lp in profile.layers
    ]
    assert back.seeds == [0, 1, 2] and back.losses == profile.losses
    assert compare(path, profile).ok


def test_reading_bad_profiles(tmp_path):
    with pytest.raises(ConfigurationError, match=r"Cannot find the baseline profile .*gradscope snapshot"):
        GradientProfile.from_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigurationError, match="is not valid JSON"):
        GradientProfile.from_json(bad)
    bad.write_text(json.dumps({"schema": "gradscope.report", "version": 1}))
    with pytest.raises(ConfigurationError, match="is not a gradscope gradient profile"):
        GradientProfile.from_json(bad)
    data = snapshot(make_net, seeds=1).to_dict()
    data["version"] = PROFILE_VERSION + 1
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigurationError, match=f"version {PROFILE_VERSION + 1}; this gradscope .* reads versions"):
        GradientProfile.from_json(bad)
    del data["layers"]
    data["version"] = 1
    with pytest.raises(ConfigurationError, match="damaged gradient profile"):
        GradientProfile.from_dict(data)


def _profile(**layers):
    """A profile from {layer: [norm per seed]} (numel 10; None = no gradient)."""
    seeds = len(next(iter(layers.values())))
    return GradientProfile(
        layers=[
            LayerProfile(k, 10, list(v), [None if x is None else x / math.sqrt(10) for x in v])
            for k, v in layers.items()
        ],
        seeds=list(range(seeds)),
    )


def test_comparison_rule_worked_by_hand():
    # Baseline without spread: the allowance is the tolerance alone.
    flat = _profile(a=[1.0, 1.0, 1.0])
    assert compare(flat, _profile(a=[10**0.29])).ok
    moved = compare(flat, _profile(a=[10**0.31]))
    assert not moved.ok and moved.layers[0].status == "moved"
    assert moved.layers[0].delta == pytest.approx(0.31) and moved.layers[0].allowed == pytest.approx(0.3)
    assert compare(flat, _profile(a=[10**-0.29])).ok and not compare(flat, _profile(a=[10**-0.31])).ok
    # Baseline log10 norms 0, 0.1, -0.1: mean 0, sample std 0.1, so 0.3 + 3 * 0.1 = 0.6 is allowed.
    noisy = _profile(a=[1.0, 10**0.1, 10**-0.1])
    assert noisy.layers[0].log10_std == pytest.approx(0.1)
    assert compare(noisy, _profile(a=[10**0.59])).ok
    assert not compare(noisy, _profile(a=[10**0.61])).ok
    assert compare(noisy, _profile(a=[10**0.61]), noise_sigmas=4).ok
    assert compare(noisy, _profile(a=[10**0.39]), noise_sigmas=0, tolerance=0.4).ok
    # The current profile is averaged in log space over its seeds: 10**0.5 and 10**0.1 average to 10**0.3.
    assert compare(flat, _profile(a=[10**0.5, 10**0.1]), tolerance=0.301).ok
    assert DEFAULT_TOLERANCE == 0.3


def test_comparison_statuses():
    base = _profile(keep=[1.0], gone=[1.0], lose=[1.0], gain=[None], none=[None], nan=[1.0], wide=[1.0])
    now = GradientProfile(
        layers=[
            LayerProfile("keep", 10, [1.1], [0.3]),
            LayerProfile("lose", 10, [None], [None]),
            LayerProfile("gain", 10, [0.5], [0.1]),
            LayerProfile("none", 10, [None], [None]),
            LayerProfile("nan", 10, [math.nan], [math.nan]),
            LayerProfile("wide", 20, [1.0], [0.2]),
            LayerProfile("fresh", 10, [1.0], [0.3]),
        ],
        seeds=[5],
    )
    result = compare(base, now)
    status = {lc.layer: lc.status for lc in result.layers}
    assert status == {
        "keep": "ok",
        "gone": "missing",
        "lose": "lost_gradient",
        "gain": "gained_gradient",
        "none": "ok",
        "nan": "nonfinite",
        "wide": "resized",
        "fresh": "new",
    }
    assert not result.ok
    assert {lc.layer for lc in result.mismatches} == {"gone", "lose", "gain", "nan", "wide", "fresh"}
    text = str(result)
    for name in ("'gone'", "'lose'", "'gain'", "'nan'", "'wide'", "'fresh'"):
        assert name in text.splitlines()[0]
    assert "20 gradient elements now and 10 in the baseline" in text
    assert "record a new baseline" in text
    assert result.to_dict()["layers"][0] == {
        "layer": "keep",
        "status": "ok",
        "baseline": 1.0,
        "current": pytest.approx(1.1),
        "delta_log10": pytest.approx(math.log10(1.1)),
        "allowed_log10": pytest.approx(0.3),
        "message": "",
    }


def test_invalid_comparison_arguments():
    flat = _profile(a=[1.0])
    with pytest.raises(ConfigurationError, match="Expected `tolerance` to be a non-negative number"):
        compare(flat, flat, tolerance=-1)
    with pytest.raises(ConfigurationError, match="Expected `seeds` to be a positive int or a list of ints"):
        snapshot(make_net, seeds=0)
    with pytest.raises(ConfigurationError, match="Expected distinct seeds"):
        snapshot(make_net, seeds=[1, 1])
    with pytest.raises(ConfigurationError, match="so it needs to build the model, not receive one"):
        snapshot(Net())


def test_broken_init_fails_naming_the_layers():
    base = snapshot(make_net)
    with pytest.raises(GradientHealthError) as info:
        gradscope.assert_matches_baseline(lambda: make_net(init_std=1e-3), base)
    result = info.value.report
    assert {lc.layer for lc in result.mismatches} == {"fc1", "fc2"}  # the head's own gradient barely moves
    assert str(info.value).startswith("gradient profile: FAILED, 2 of 3 layers changed: 'fc1', 'fc2'")
    assert all(lc.delta < -1 for lc in result.mismatches)


def test_unchanged_code_matches_exactly_on_the_baseline_seeds(tmp_path):
    path = tmp_path / "p.json"
    snapshot(make_net).to_json(path)
    result = gradscope.assert_matches_baseline(make_net, path)
    assert result.ok and result.current_seeds == [0, 1, 2]
    assert max(abs(lc.delta) for lc in result.layers) < 1e-6
    assert result.baseline_source == str(path)


def test_layer_without_gradient_is_recorded_as_none():
    profile = snapshot(lambda: make_net(extra=True), seeds=2)
    extra = profile.layer("extra")
    assert extra.norms == [None, None] and extra.log10_mean is None
    assert json.loads(profile.to_json())["layers"][-1]["l2_norm"] == [None, None]
    assert compare(profile, profile).ok


def test_nonfinite_gradient_at_init_cannot_be_a_baseline():
    def nan_batch():
        model, (x, y), loss_fn = make_net()
        x[0, 0] = math.nan
        return model, (x, y), loss_fn

    with pytest.raises(GradientHealthError, match="not finite at initialisation for seed 0"):
        snapshot(nan_batch)


def test_nonfinite_gradient_now_fails_the_comparison(tmp_path):
    def nan_batch():
        model, (x, y), loss_fn = make_net()
        x[0, 0] = math.nan
        return model, (x, y), loss_fn

    current = snapshot(nan_batch, strict=False)  # measured, not refused
    assert all(v == math.inf for lp in current.layers for v in lp.norms)
    path = tmp_path / "current.json"
    current.to_json(path)  # non-finite norms are written as "inf", which JSON can hold
    assert json.loads(path.read_text())["layers"][0]["l2_norm"] == ["inf"] * 3
    assert GradientProfile.from_json(path).layers[0].norms == [math.inf] * 3
    with pytest.raises(GradientHealthError) as info:
        gradscope.assert_matches_baseline(nan_batch, snapshot(make_net))
    result = info.value.report
    assert [lc.status for lc in result.layers] == ["nonfinite"] * 3
    assert "its gradient is not finite (NaN or Inf) now." in str(info.value)
    json.dumps(result.to_dict(), allow_nan=False)  # the JSON outputs stay valid


def test_factory_must_build_the_same_layers_for_every_seed():
    calls = []

    def shifting():
        calls.append(1)
        return make_net(extra=len(calls) > 1)

    with pytest.raises(ConfigurationError, match="different layers for seed 0 and seed 1"):
        snapshot(shifting, seeds=2)


def test_examples_healthy_passes_ten_new_seeds_and_broken_init_fails(examples):
    healthy, broken = examples
    base = GradientProfile.from_json(EXAMPLES / "profile.json")
    assert [lp.layer for lp in base.layers] == ["hidden.0", "hidden.1", "hidden.2", "hidden.3", "head"]
    worst = 0.0
    for seed in range(10, 20):  # seeds the baseline never saw: only seed noise
        result = compare(base, snapshot(healthy.make, seeds=[seed]))
        assert result.ok, str(result)
        worst = max(worst, max(abs(lc.delta) / lc.allowed for lc in result.layers))
    assert worst < 0.6  # measured 0.38: the default tolerance leaves room
    moved = compare(base, snapshot(broken.make))
    assert [lc.layer for lc in moved.mismatches] == ["hidden.0", "hidden.1", "hidden.2", "hidden.3"]
    deltas = [lc.delta for lc in moved.mismatches]
    assert deltas == sorted(deltas)  # the earlier the layer, the further it fell
    assert deltas[0] < -4


def test_transformer_passes_ten_new_seeds(examples):
    healthy, _ = examples
    base = snapshot(healthy.make_transformer, seeds=3)
    assert base.layers[0].layer == "wte+head"  # tied embedding and head: one layer
    for seed in range(10, 20):
        result = compare(base, snapshot(healthy.make_transformer, seeds=[seed]))
        assert result.ok, str(result)
