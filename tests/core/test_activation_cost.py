"""Activation statistics of a sampled step, by each path the monitor takes, against NumPy on the same outputs.

The monitor measures each watched module at its forward hook (the compiled CPU kernel in one call,
or a mask and a reduction of operators) and writes the rows of a step together. These tests check
every statistic of every kind of module against NumPy on a copy of the output taken at that moment,
outputs changed in place later in the forward, modules that run out of registration order or not at
all, outputs the kernel cannot read, and how many operators a sampled forward dispatches per module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradscope
from gradscope.capture import activations as acts_mod

from .helpers import value

_SAT = 0.01  # SATURATION_DERIVATIVE


def _inactive_np(y: np.ndarray, module: nn.Module) -> np.ndarray:
    """NumPy's mask of inactive outputs; thresholds in the output's dtype, as torch compares with a number."""
    t = y.dtype.type
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU)):
        return y <= 0
    if isinstance(module, nn.Tanh):
        return np.abs(y) > t(np.sqrt(1 - _SAT))
    if isinstance(module, nn.Sigmoid):
        low = (1 - np.sqrt(1 - _SAT)) / 2  # 4 y (1 - y) = 0.01
        return (y < t(low)) | (y > t(1 - low))
    if isinstance(module, nn.Hardtanh):
        return (y <= t(module.min_val)) | (y >= t(module.max_val))
    assert isinstance(module, nn.Hardsigmoid)
    return (y <= 0) | (y >= 1)


def _expected(y: np.ndarray, module: nn.Module, unit_axis: int | None) -> tuple[float, float, float]:
    """(zero, dead, saturated) fractions as float32 divisions of exact counts (NaN where not applicable)."""
    ina = _inactive_np(y, module)
    frac = float(np.float32(ina.sum()) / np.float32(ina.size))
    if unit_axis is None or ina.size // ina.shape[unit_axis] < acts_mod.MIN_UNIT_SAMPLES:
        dead = float("nan")  # no units, or too few samples per unit to call one dead
    else:
        other = tuple(a for a in range(ina.ndim) if a != unit_axis)
        per_unit = np.all(ina, axis=other)
        dead = float(np.float32(per_unit.sum()) / np.float32(per_unit.size))
        # and the plain definitions in float64, to the float32 rounding
        assert dead == pytest.approx(float(np.mean(per_unit)), abs=1e-6)
    assert frac == pytest.approx(float(np.mean(ina)), abs=1e-6)
    relu = isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU))
    nan = float("nan")
    return (frac, dead, nan) if relu else (nan, dead, frac)


class _Scale(nn.Module):
    """Changes its input in place (as the next layer of a ReLU(inplace=True) may)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(0.0).add_(1.0)  # every entry 1: none inactive any more


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)  # a non-contiguous output: the kernel cannot read it


class _Net(nn.Module):
    """Every kind of watched module, 2-D/3-D/4-D outputs, an in-place change after a ReLU, a non-contiguous
    output, an unused activation, and a forward that runs two activations out of registration order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_relu = nn.ReLU(inplace=True)  # changes the convolution's output in place
        self.conv_leaky = nn.LeakyReLU(0.2)
        self.scale = _Scale()  # changes conv_leaky's output in place
        self.conv1d = nn.Conv1d(4, 3, 3)
        self.hardsig = nn.Hardsigmoid()  # [N, C, L], channel first
        self.fc = nn.Linear(3 * 4, 16)
        self.later = nn.Tanh()  # registered before `earlier`, runs after it
        self.earlier = nn.LeakyReLU(0.1)
        self.fc2 = nn.Linear(16, 16)
        self.relu6 = nn.ReLU6()
        self.sig = nn.Sigmoid()
        self.hardtanh = nn.Hardtanh(-0.5, 0.7)
        self.transpose = _Transpose()
        self.relu_t = nn.ReLU()
        self.unused = nn.ReLU()  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.scale(self.conv_leaky(self.conv_relu(self.conv(x))))  # [N, 4, 6, 6]
        h = self.hardsig(self.conv1d(h.mean(dim=3)))  # [N, 3, 4]
        h = self.fc(h.flatten(1))  # [N, 16]
        h = self.later(self.earlier(h) * 3)
        h = self.fc2(h) * 4
        a = self.relu6(h)
        b = self.sig(h)
        c = self.hardtanh(h)
        d = self.relu_t(self.transpose(h))  # [16, N], the units on the last axis
        return a.sum(1) + b.sum(1) + c.sum(1) + d.sum(0)


_UNIT_AXIS = {
    "conv_relu": 1,
    "conv_leaky": 1,
    "hardsig": 1,
    "later": 1,
    "earlier": 1,
    "relu6": 1,
    "sig": 1,
    "hardtanh": 1,
    "relu_t": 1,
}


def _kernel_available() -> bool:
    return acts_mod._cpu_kernel() is not None


def _choose(path: str, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if path == "operators":
        monkeypatch.setattr(acts_mod, "_cpu_kernel", lambda: None)
    elif not _kernel_available():
        pytest.skip("the compiled CPU kernel with activation_into is not built on this machine")


@pytest.mark.parametrize("path, device", [("operators", "cpu"), ("kernel", "cpu"), ("operators", "cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_activation_statistic_matches_numpy_on_the_output_at_hook_time(
    path: str, device: str, dtype, monkeypatch
):
    _choose(path, device, monkeypatch)
    torch.manual_seed(0)
    model = _Net().to(device=device, dtype=dtype)
    with torch.no_grad():
        model.fc.bias[:3] = -40.0  # units 0-2 of `earlier` are <= 0 for every sample
        model.fc2.bias[:2] = 30.0  # units 0-1 saturate the sigmoid, clamp relu6 and hardtanh
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    names = [n for n in _UNIT_AXIS]
    outputs: dict[str, np.ndarray] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            outputs[name] = output.detach().cpu().numpy().copy()  # before any later in-place change

        return hook

    handles = [getattr(model, n).register_forward_hook(keep(n)) for n in names]
    expected: dict[int, dict[str, tuple[float, float, float]]] = {}
    with gradscope.watch(model, optimizer=opt, sample_every=2, rules="none") as scope:
        for step in range(1, 5):
            x = torch.randn(8, 2, 6, 6, dtype=dtype).to(device)
            model(x).sum().backward()
            expected[step] = {n: _expected(outputs[n], getattr(model, n), _UNIT_AXIS[n]) for n in names}
            opt.step()
            scope.step()
            opt.zero_grad()
    for h in handles:
        h.remove()
    df = scope.report().stats
    act = df[df.stat.str.startswith("act_")]
    assert sorted(act.step.unique()) == [1, 3]  # sampled steps only
    assert "unused" not in set(act.layer)  # never ran: nothing recorded
    # conv_leaky's output was changed in place after its hook: what was measured is the output before
    assert expected[1]["conv_leaky"][0] > 0.2 and expected[3]["conv_leaky"][0] > 0.2
    stats = ("act_zero_fraction", "act_dead_fraction", "act_saturated_fraction")
    checked = 0
    for step in (1, 3):
        for n in names:
            for stat, want in zip(stats, expected[step][n]):
                sel = act[(act.step == step) & (act.layer == n) & (act.stat == stat)]
                if np.isnan(want):
                    assert sel.value.isna().all(), (step, n, stat)
                    continue
                assert value(df, step, n, "*", stat) == want, (step, n, stat)
                checked += 1
    assert checked == 2 * (len(names) * 2)  # two statistics per module and sampled step
    dead = {n: value(df, 1, n, "*", "act_dead_fraction") for n in ("earlier", "sig", "relu6", "hardtanh")}
    assert dead["earlier"] >= 3 / 16 and dead["sig"] >= 2 / 16 and dead["relu6"] >= 2 / 16
    assert dead["hardtanh"] >= 2 / 16


@pytest.mark.parametrize("counter", ["bool", "float"])
def test_each_way_of_counting_matches_numpy_on_odd_shapes(counter):
    # the bool mask (accelerators, huge outputs) and the float mask (a CPU without the kernel), 1-D included
    count = acts_mod._unit_counts if counter == "bool" else acts_mod._unit_counts_cpu
    torch.manual_seed(3)
    cases = [
        (nn.ReLU(), (7,), None, False),
        (nn.Tanh(), (5, 3), 1, False),
        (nn.Sigmoid(), (4, 6, 5), 2, False),
        (nn.Hardsigmoid(), (4, 6, 5), 1, True),
        (nn.Hardtanh(-0.25, 2.0), (3, 4, 5, 6), 1, False),
        (nn.LeakyReLU(), (2, 3, 4, 5, 2), 1, False),
    ]
    for module, shape, axis, cf3 in cases:
        y = module(torch.randn(*shape) * 4)
        kind = acts_mod._kind(module)
        assert kind is not None
        got = tuple(float(t) for t in acts_mod._statistics(y, kind, module, cf3, count))
        want = _expected(y.numpy(), module, axis)
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=f"{module} {shape}")


def _threshold_cases() -> list[tuple[nn.Module, str, int, float, float]]:
    """One module of each family: ``(module, kind, the kernel's test code, threshold a, threshold b)``."""
    cases = []
    for module in (nn.Tanh(), nn.Sigmoid(), nn.Hardtanh(-0.3, 0.1), nn.Hardsigmoid(), nn.ReLU()):
        kind = acts_mod._kind(module)
        assert kind is not None
        code, a, b = acts_mod._KERNEL_TEST[kind]
        if kind == "hardtanh":
            a, b = acts_mod._hard_bounds(module)
        cases.append((module, kind, code, a, b))
    return cases


@pytest.mark.parametrize("path", ["bool", "float", "kernel"])
@pytest.mark.parametrize("np_dtype", [np.float16, np.float32, np.float64])
def test_thresholds_compare_in_the_outputs_dtype_at_the_boundaries(path, np_dtype, monkeypatch):
    # outputs on either side of each threshold as the output's dtype rounds it (as torch compares)
    _choose("kernel" if path == "kernel" else "operators", "cpu", monkeypatch)
    for module, kind, code, a, b in _threshold_cases():
        vals = []
        for c in (a, b, -a, 0.0, 1.0):
            f = np_dtype(c)
            vals += [np.nextafter(f, np_dtype(-10)), f, np.nextafter(f, np_dtype(10))]
        # (as many samples per unit as a dead fraction needs)
        rows = acts_mod.MIN_UNIT_SAMPLES
        y = torch.tensor(np.array(vals * rows, dtype=np_dtype).reshape(rows, -1))
        if path == "kernel":
            out = torch.full((2, 3), float("nan"), dtype=torch.float64)
            acts_mod._cpu_kernel()(y, rows, y.shape[1], 1, code, a, b, True, out, 1)
            got = tuple(out[1].tolist())
        else:
            count = acts_mod._unit_counts if path == "bool" else acts_mod._unit_counts_cpu
            got = tuple(float(t) for t in acts_mod._statistics(y, kind, module, False, count))
        np.testing.assert_array_equal(np.array(got), np.array(_expected(y.numpy(), module, 1)), err_msg=str(module))


def _bf16_neighbours(c: float) -> list[float]:
    """``c`` rounded to bfloat16 and the bfloat16 numbers either side of it (NumPy has no bfloat16)."""
    if c == 0.0:
        return [-(2.0**-133), 0.0, 2.0**-133]  # the smallest subnormals
    bits = torch.tensor([abs(c)], dtype=torch.bfloat16).view(torch.int16)  # magnitude order is bit order
    near = torch.cat([bits - 1, bits, bits + 1]).view(torch.bfloat16).tolist()
    return near if c > 0 else [-v for v in reversed(near)]


def test_the_kernel_counts_bfloat16_outputs_as_torch_compares_them_at_the_boundaries():
    """A bfloat16 output, read by the kernel in float with its thresholds rounded to bfloat16: the same
    statistics as torch's own comparisons (both operator paths), at and either side of each threshold."""
    if not _kernel_available():
        pytest.skip("the compiled CPU kernel with activation_into is not built on this machine")
    g = torch.Generator().manual_seed(0)
    for module, kind, code, a, b in _threshold_cases():
        vals = [v for c in (a, b, -a, 0.0, 1.0) for v in _bf16_neighbours(c)]
        edge = torch.tensor(vals * acts_mod.MIN_UNIT_SAMPLES, dtype=torch.bfloat16).reshape(
            acts_mod.MIN_UNIT_SAMPLES, -1
        )
        for y in (edge, torch.randn(16, 40, generator=g).to(torch.bfloat16)):
            out = torch.full((1, 3), float("nan"), dtype=torch.float64)
            acts_mod._cpu_kernel()(y, y.shape[0], y.shape[1], 1, code, a, b, True, out, 0)
            got = out[0].tolist()
            for count in (acts_mod._unit_counts, acts_mod._unit_counts_cpu):
                want = [float(t) for t in acts_mod._statistics(y, kind, module, False, count)]
                np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=f"{module} {count.__name__}")
            # and the definition in float64, the thresholds rounded to bfloat16 first
            x = y.double()
            lo, hi = (float(torch.tensor(t, dtype=torch.bfloat16)) for t in (a, b))
            ina = {0: x <= lo, 1: x.abs() > lo, 2: (x < lo) | (x > hi), 3: (x <= lo) | (x >= hi)}[code]
            frac = float(np.float32(int(ina.sum())) / np.float32(ina.numel()))
            assert got[0 if code == 0 else 2] == frac, module


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_of_sampled_forward(blocks: int) -> int:
    """ATen operators a sampled training forward dispatches beyond the same forward unwatched."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(8, 8), nn.ReLU())])
    x = torch.randn(acts_mod.MIN_UNIT_SAMPLES, 8)
    with _OpCounter() as bare:
        model(x)
    with gradscope.watch(model, sample_every=1, rules="none") as scope:
        model(x)  # step 1 (sampled): the constants of the finish are made once
        scope.step()
        with _OpCounter() as watched:
            model(x)  # step 2, sampled: the hook is armed
        scope.step()
    assert value(scope.report().stats, 2, str(2 * blocks - 1), "*", "act_zero_fraction") >= 0  # measured
    return watched.n - bare.n


@pytest.mark.parametrize("path", ["operators", "kernel"])
def test_a_sampled_forward_dispatches_few_operators_per_module_and_a_fixed_number_per_step(path, monkeypatch):
    _choose(path, "cpu", monkeypatch)
    two, ten = _ops_of_sampled_forward(2), _ops_of_sampled_forward(10)
    per_module = (ten - two) / 8
    if path == "kernel":
        # one call per module reads the output and writes its row: no operator at all
        assert two == ten == 0, (two, ten)
        return
    # a mask (its allocation on a CPU) and a reduction, of a detached output (it was 15 per module and step)
    assert per_module <= 4, (two, ten)
    assert two - 2 * per_module <= 14, (two, ten)  # the one finish and write of the step
