"""gradscope.verify's contract: arguments, the report, and a user's model left exactly as it was."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.reference import GradientComparison, VerificationReport


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.25), nn.Linear(6, 3))


def _batch():
    torch.manual_seed(1)
    return torch.randn(8, 4), torch.randint(0, 3, (8,))


def test_float32_model_is_verified_in_float64_and_left_untouched():
    model = _model().train()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # a stale gradient the user still has
    handle = model[4].weight.register_hook(lambda g: g)
    before = copy.deepcopy(model.state_dict())

    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())

    assert report.ok, str(report)
    assert report.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())
    for name, value in model.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(value, before[name]), name
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert model[4].weight._backward_hooks  # the user's hook is still there
    handle.remove()


def test_eval_mode_is_respected():
    model = _model().eval()
    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())
    assert report.ok and not model.training


def test_float32_verification_uses_float32_tolerances():
    report = gradscope.verify(_model().eval(), *_batch(), nn.CrossEntropyLoss(), dtype=torch.float32)
    assert report.ok and report.rtol == 1e-4
    largest = max(c.scale for c in report.gradients)
    # In float32 the floor is 256 machine epsilons of the largest gradient (1e-3 * rtol would be below one ε).
    assert report.atol == pytest.approx(256 * torch.finfo(torch.float32).eps * largest)
    assert report.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rtol": -1}, "Expected `rtol` to be a non-negative float, but got -1."),
        ({"atol": "1e-3"}, "Expected `atol` to be a non-negative float, but got '1e-3'."),
        ({"dtype": torch.float16}, "Expected `dtype` to be torch.float64 or torch.float32, but got torch.float16."),
        (
            {"on_unsupported": "skip"},
            "Expected `on_unsupported` to be one of 'error', 'finite_difference', but got 'skip'.",
        ),
        ({"fd_coordinates": 0}, "Expected `fd_coordinates` to be a positive int, but got 0."),
        ({"fd_directions": 0}, "Expected `fd_directions` to be a positive int, but got 0."),
        ({"fd_rtol": -1.0}, "Expected `fd_rtol` to be a non-negative float, but got -1.0."),
    ],
)
def test_configuration_is_validated_eagerly(kwargs, message):
    with pytest.raises(gradscope.ConfigurationError) as info:
        gradscope.verify(_model(), *_batch(), nn.CrossEntropyLoss(), **kwargs)
    assert str(info.value) == message


def test_non_scalar_loss_is_rejected():
    with pytest.raises(gradscope.ConfigurationError, match="reduction='none'"):
        gradscope.verify(_model(), *_batch(), nn.CrossEntropyLoss(reduction="none"))


def test_tuple_inputs_are_rejected():
    with pytest.raises(gradscope.ConfigurationError, match="Expected `inputs` to be a tensor"):
        gradscope.verify(_model(), (torch.randn(2, 4),), torch.zeros(2), nn.MSELoss())


@pytest.mark.parametrize(
    ("loss_fn", "method"),
    [
        (F.cross_entropy, "reference"),
        (functools.partial(F.cross_entropy, label_smoothing=0.2, weight=torch.tensor([1.0, 2.0, 0.5])), "reference"),
        (lambda out, y: F.cross_entropy(out, y) + out.pow(2).mean(), "autograd"),
    ],
    ids=["functional", "partial", "lambda"],
)
def test_loss_recognition(loss_fn, method):
    report = gradscope.verify(_model().eval(), *_batch(), loss_fn)
    assert report.ok, str(report)
    assert report.loss_method == method
    if method == "autograd":
        assert "by autograd on the loss alone" in str(report)


def test_report_table_and_json():
    report = gradscope.verify(_model().eval(), *_batch(), nn.CrossEntropyLoss())
    assert isinstance(report, VerificationReport)
    text = str(report)
    assert text.splitlines()[0] == (
        f"gradscope.verify: reference backprop vs autograd in float64 (rtol=1e-10, atol={report.atol:.3g})"
    )
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"):
        assert any(line.split()[:2] == [name, "parameter"] for line in text.splitlines()), name
    assert text.rstrip().endswith("PASS: All 13 gradients agree.")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["first_mismatch"] is None
    assert {c["name"] for c in data["comparisons"] if c["kind"] == "parameter"} == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "4.weight",
        "4.bias",
    }
    assert all(isinstance(c, GradientComparison) for c in report.comparisons)
    report.raise_for_status()  # passes silently


def test_frozen_parameters_are_not_compared():
    model = _model().eval()
    model[0].weight.requires_grad_(False)
    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())
    names = {c.name for c in report.comparisons if c.kind == "parameter"}
    assert report.ok and "0.weight" not in names and "0.bias" in names


def test_top_level_exports():
    assert gradscope.verify is gradscope.reference.verify
    assert {"verify", "VerificationReport", "register_reference"} <= set(gradscope.__all__)


class Triple(nn.Module):
    def forward(self, x):
        return 3 * x


def test_a_reference_that_computes_another_function_is_a_forward_mismatch():
    class DoubleReference(gradscope.reference.ReferenceLayer):  # wrong: the module triples
        def forward(self, x):
            return 2 * x

        def backward(self, grad_out):
            return 2 * grad_out, {}

    gradscope.register_reference(Triple)(DoubleReference)
    try:
        model = nn.Sequential(nn.Linear(4, 3), Triple(), nn.Linear(3, 3))
        report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())
    finally:
        gradscope.registry.REFERENCES.unregister(Triple)
    first = report.first_mismatch
    assert (first.kind, first.name) == ("forward", "1")
    assert "forward output of '1' differs" in report.summary()
    assert "1  " in str(report) and "forward" in str(report)


def test_a_model_that_does_not_fit_its_batch_is_a_configuration_error_that_says_so():
    model = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(gradscope.ConfigurationError) as info:
        gradscope.verify(model, torch.randn(4, 4), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss())
    message = str(info.value)
    assert message.startswith("The model failed on the batch, before anything could be compared: RuntimeError: ")
    assert "Check that the inputs fit the model" in message and "\n" not in message


def test_out_of_range_targets_name_the_range_and_the_classes():
    targets = torch.tensor([0, 1, 5, 2])
    with pytest.raises(gradscope.ConfigurationError) as info:
        gradscope.verify(nn.Linear(4, 3), torch.randn(4, 4), targets, nn.CrossEntropyLoss())
    assert "The targets hold class indices from 0 to 5, but the model output has 3 classes" in str(info.value)


def test_a_model_output_object_gets_the_logits_hint():
    class Output:
        def __init__(self, logits):
            self.logits = logits

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return Output(self.fc(x))

    with pytest.raises(gradscope.ConfigurationError, match=r"returned Output.*forward returns `\.logits`"):
        gradscope.verify(Model(), torch.randn(4, 4), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss())


def test_nan_on_one_side_only_differs():
    model = _model()
    model[0].weight.register_hook(lambda grad: grad * float("nan"))  # autograd's side only
    report = gradscope.verify(model, *_batch(), nn.CrossEntropyLoss())
    assert not report.ok and report.verdict == "differ" and report.comparable
    assert report.first_mismatch.name == "0.weight"


def test_nan_entries_on_both_sides_are_left_out_of_a_comparison():
    from gradscope.reference.report import compare

    ref = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    auto = torch.tensor([1.0, float("nan"), 3.0 + 1e-3], dtype=torch.float64)
    row = compare(ref, auto, name="w", kind="parameter", rtol=1e-10, atol=0.0)
    assert row.status == "differs" and row.compared == 2 and row.abs_error == pytest.approx(1e-3)
    assert "1 entries non-finite on both sides left out" in row.detail
    both = compare(ref[1:2], auto[1:2], name="w", kind="parameter", rtol=1e-10, atol=0.0)
    assert both.ok and both.status == "not comparable"
