"""The numerical fallback: no false alarm on correct modules, a single wrong entry caught, and its edge cases.

Modules here have no registered reference on purpose (custom classes), so that ``verify`` checks them
with finite differences (``on_unsupported="finite_difference"``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.reference.sampled import DirectionalGradient, rademacher

DTYPES = [torch.float64, torch.float32]


class Gate(nn.Module):
    """y = x σ(w x), w per channel (dim 1): smooth, any rank."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * torch.sigmoid(self.w.view(1, -1, *([1] * (x.dim() - 2))) * x)


class MyLinear(nn.Module):
    """A linear layer of our own (no reference): a weight, a bias and a custom forward."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(fan_out))

    def forward(self, x):
        return torch.tanh(x @ self.weight.T + self.bias)


class MyConv(nn.Module):
    """A 2-d convolution of our own: a 4-d kernel."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) / (3 * cin**0.5))

    def forward(self, x):
        return torch.tanh(nn.functional.conv2d(x, self.weight, padding=1))


class Float32Inside(nn.Module):
    """An RMS norm that computes in float32 whatever the model's dtype (as HF's LlamaRMSNorm does)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def _flip(grad: torch.Tensor, seed: int) -> torch.Tensor:
    """``grad`` with the sign of one entry flipped: a seeded pick among the entries ≥ 1% of the largest."""
    flat = grad.reshape(-1)
    candidates = (flat.abs() >= 0.01 * flat.abs().max()).nonzero().reshape(-1)
    pick = candidates[torch.randint(len(candidates), (1,), generator=torch.Generator().manual_seed(seed))]
    out = flat.clone()
    out[pick] = -out[pick]
    return out.reshape(grad.shape)


def _planted(kind: str, seed: int) -> nn.Module:
    """A module without reference whose backward flips one entry of the gradient of ``kind``."""

    class Flipped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight, bias)
            return torch.tanh(x @ weight.T + bias)

        @staticmethod
        def backward(ctx, grad_out):
            x, weight, bias = ctx.saved_tensors
            pre = x @ weight.T + bias
            grad_pre = grad_out * (1 - torch.tanh(pre) ** 2)
            grads = {"input": grad_pre @ weight, "weight": grad_pre.T @ x, "bias": grad_pre.sum(0)}
            grads[kind] = _flip(grads[kind], seed)
            return grads["input"], grads["weight"], grads["bias"]

    class Buggy(MyLinear):
        def forward(self, x):
            return Flipped.apply(x, self.weight, self.bias)

    return Buggy(12, 10)


def _verify(model, x, y, dtype=torch.float64, **kwargs):
    return gradscope.verify(
        model, x, y, nn.CrossEntropyLoss(), dtype=dtype, on_unsupported="finite_difference", **kwargs
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["input", "weight", "bias"])
def test_a_one_entry_sign_flip_is_caught_at_every_seed(kind, dtype):
    # 20 seeds: a different model, batch, flipped entry and set of directions each time. The input
    # ([16, 12]) and weight ([10, 12]) are checked along random directions, the bias entry by entry.
    caught = 0
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 12), _planted(kind, seed), nn.Linear(10, 3))
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        report = _verify(model, x, y, dtype=dtype, seed=seed)
        name = {"input": "1", "weight": "1.weight", "bias": "1.bias"}[kind]
        row = next(c for c in report.gradients if c.name == name)
        assert row.method == "finite_difference"
        caught += row.status == "differs"
    assert caught == 20


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_a_one_entry_sign_flip_in_a_conv_kernel_is_caught_at_every_seed(dtype):
    class Flipped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, seed):
            ctx.save_for_backward(x, weight)
            ctx.seed = seed
            return nn.functional.conv2d(x, weight, padding=1)

        @staticmethod
        def backward(ctx, grad_out):
            x, weight = ctx.saved_tensors
            grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, padding=1)
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, padding=1)
            return grad_x, _flip(grad_w, ctx.seed), None

    class BuggyConv(MyConv):
        seed = 0

        def forward(self, x):
            return torch.tanh(Flipped.apply(x, self.weight, self.seed))

    caught = 0
    for seed in range(20):
        torch.manual_seed(seed)
        conv = BuggyConv(2, 3)
        conv.seed = seed
        model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
        report = _verify(model, torch.randn(4, 2, 5, 5), torch.randint(0, 2, (4,)), dtype=dtype, seed=seed)
        caught += next(c for c in report.gradients if c.name == "0.weight").status == "differs"
    assert caught == 20


class ReluBlock(nn.Module):
    """conv -> ReLU -> conv, plus the input, then ReLU: kinks everywhere (a ResNet basic block without norms)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


def _random_model(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small correct model mixing referenced layers and modules checked numerically."""
    generator = torch.Generator().manual_seed(seed)

    def pick(n: int) -> int:
        return int(torch.randint(n, (1,), generator=generator))

    torch.manual_seed(seed)
    if pick(2):
        c = 2 + pick(3)
        body = [Gate(c), MyConv(c, c), ReluBlock(c)][pick(3)]
        layers = [nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), body, nn.Flatten(), nn.Linear(c * 36, 4)]
        x = torch.randn(2 + pick(4), 3, 6, 6)
    else:
        d = 4 + pick(12)
        layers = [nn.Linear(5, d), [Gate(d), Float32Inside(d), MyLinear(d, d)][pick(3)], nn.GELU(), MyLinear(d, 4)]
        x = torch.randn(2 + pick(8), 5)
    scale = [1e-3, 1.0, 30.0][pick(3)]  # inputs of very different magnitudes
    return nn.Sequential(*layers), scale * x, torch.randint(0, 4, (x.shape[0],), generator=generator)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_false_alarm_on_correct_random_models(dtype):
    # 20 seeded random models per dtype (kept modest for the test's time; benchmarks/verify_time.py and
    # the real-model tests add more). Every one is correct, so every comparison must agree.
    for seed in range(20):
        model, x, y = _random_model(seed)
        report = _verify(model, x, y, dtype=dtype, seed=seed)
        assert report.ok, f"seed {seed}:\n{report}"
        assert report.numerical


def test_a_non_contiguous_input_from_a_reference_conv_is_differenced():
    # The reference conv returns a non-contiguous tensor; the fallback perturbs out of place.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Gate(4), nn.Upsample(scale_factor=2), nn.Flatten(), nn.Linear(256, 2))
    report = _verify(model, torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))
    assert report.ok, str(report)
    assert {c.name for c in report.numerical} >= {"1", "1.w"}


class InplaceClamp(nn.Module):
    """Writes into its input, as ReLU6(inplace=True) does, but has no reference."""

    def forward(self, x):
        return x.clamp_(-0.5, 0.5).mul_(2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_module_without_reference_is_checked_and_upstream_too(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), InplaceClamp(), nn.Linear(8, 3))
    report = _verify(model, torch.randn(6, 4), torch.randint(0, 3, (6,)), dtype=dtype)
    assert report.ok, str(report)
    rows = {c.name: c for c in report.gradients}
    assert rows["1"].method == "finite_difference" and rows["1"].status == "agrees"
    # Upstream parameters compared against autograd's values, not against zeros, and they are nonzero.
    assert rows["0.weight"].method == "reference" and rows["0.weight"].scale > 0


def test_a_module_computing_in_float32_inside_a_float64_model_passes_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), Float32Inside(16), nn.Linear(16, 3))
    report = _verify(model, torch.randn(5, 6), torch.randint(0, 3, (5,)))
    assert report.ok, str(report)
    assert any("'1' computes internally in float32" in note for note in report.notes)


def test_a_bug_inside_a_float32_computing_module_is_still_caught():
    class Scaled(Float32Inside):
        def forward(self, x):
            out = super().forward(x)
            return out + (self.weight * 0.05 - (self.weight * 0.05).detach())  # d/dw wrong by 5%

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), Scaled(16), nn.Linear(16, 3))
    report = _verify(model, torch.randn(5, 6), torch.randint(0, 3, (5,)))
    assert not report.ok and report.first_mismatch.name == "1.weight"


class Bag(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 6, **kwargs)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.embedding(ids).mean(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_row_is_left_out_with_the_reason(dtype):
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (4, 5))
    ids[:, 0] = 0  # the padding row is used, so a numerical derivative there would be nonzero
    report = _verify(Bag(padding_idx=0), ids, torch.randint(0, 3, (4,)), dtype=dtype)
    assert report.ok, str(report)
    row = next(c for c in report.gradients if c.name == "embedding.weight")
    assert row.status == "agrees" and "row 0 is the padding_idx row" in row.detail


def test_max_norm_weight_is_not_checked_and_the_report_says_why():
    torch.manual_seed(0)
    report = _verify(Bag(max_norm=1.0), torch.randint(0, 10, (4, 5)), torch.randint(0, 3, (4,)))
    assert report.ok
    row = next(c for c in report.gradients if c.name == "embedding.weight")
    assert row.status == "not checked" and "renormalises its weight in place" in row.detail
    assert "1 could not be checked: 'embedding.weight'" in report.summary()


def test_the_pass_line_says_what_was_checked_numerically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Gate(8), nn.Linear(8, 3))
    report = _verify(model, torch.randn(6, 4), torch.randint(0, 3, (6,)))
    text = str(report)
    assert (
        "PASS: All 10 gradients agree. 2 of them were checked only numerically, by finite differences "
        "(2 along random directions), in the layers without a reference: '1'." in text
    )
    # '1' input [6, 8] and '1.w' [8] are differenced together: 4 directions over 56 entries.
    assert "ok (numerically: 4 random sign directions over 56 entries, jointly with 1 other tensor of '1')" in text


def test_directions_cover_every_entry_and_repeat():
    v = rademacher(50, 4, seed=7, device=torch.device("cpu"))
    assert v.shape == (4, 50) and set(v.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(v, rademacher(50, 4, seed=7, device=torch.device("cpu")))
    grad = DirectionalGradient(shape=torch.Size([5, 10]), seed=7, values=torch.zeros(4), errors=torch.zeros(4))
    g = torch.randn(5, 10, dtype=torch.float64)
    projected, reach = grad.project(g)
    torch.testing.assert_close(projected, v @ g.reshape(-1))
    torch.testing.assert_close(reach, torch.full((4,), 50**0.5, dtype=torch.float64))  # ‖v‖₂ of 50 signs


def test_nan_on_both_sides_is_not_comparable():
    class NaNGate(nn.Module):
        def forward(self, x):
            return x * float("nan")

    model = nn.Sequential(nn.Linear(4, 3), NaNGate())
    report = _verify(model, torch.randn(4, 4), torch.randint(0, 3, (4,)))
    assert report.ok and not report.comparable and report.verdict == "not comparable"
    assert "NOT COMPARABLE: " in str(report)
    assert all(c.status == "not comparable" for c in report.gradients)
