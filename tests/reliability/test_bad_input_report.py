"""Bad input to the Report's public methods: each gives a clear error that names the argument (or JSON key) and the fix.

Table-driven: one row per bad argument, asserting the exception type and the words of its message; and one row
per hostile mutation of a real JSON report, asserting a ``ValueError`` subclass that names the key (never a
``KeyError``/``AttributeError``/``TypeError`` traceback from deep inside).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.errors import ConfigurationError, RegistryError
from gradscope.report import Report, ReportFormatError


class _Flag(gradscope.Rule):
    name = "exploding_gradients"
    severity = "error"

    def check(self, ctx):
        if not (ctx.steps >= 2).any():
            return []
        return [self.finding(step=2, layer="0", message="m", suggestion="s", evidence={"value": 2.0})]


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, rules=[_Flag()]) as scope:
        for _ in range(4):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            scope.step(loss=1.0, lr=0.1)
            opt.zero_grad()
    return scope.report()


# (call, exception type, words the message must contain)
BAD_CALLS = [
    ("to_json(indent='x')", lambda r, d: r.to_json(indent="x"), ConfigurationError, ["indent", "'x'", "int"]),
    ("to_json(indent=-1)", lambda r, d: r.to_json(indent=-1), ConfigurationError, ["indent", "-1"]),
    ("to_json(indent=True)", lambda r, d: r.to_json(indent=True), ConfigurationError, ["indent", "True"]),
    ("save_plots(kinds='flow')", lambda r, d: r.save_plots(d, kinds="flow"), ConfigurationError, ["kinds", "['flow']"]),
    ("save_plots(kinds=5)", lambda r, d: r.save_plots(d, kinds=5), ConfigurationError, ["kinds", "5"]),
    ("save_plots(kinds=['nope'])", lambda r, d: r.save_plots(d, kinds=["nope"]), RegistryError, ["nope", "flow"]),
    ("save_plots(fmt='xyz')", lambda r, d: r.save_plots(d, fmt="xyz"), ConfigurationError, ["fmt", "xyz", "png"]),
    ("save_plots(dpi=0)", lambda r, d: r.save_plots(d, dpi=0), ConfigurationError, ["dpi", "positive"]),
    ("plot('nope')", lambda r, d: r.plot("nope"), RegistryError, ["nope", "flow", "heatmap"]),
    (
        "plot('heatmap', stat='nope')",
        lambda r, d: r.plot("heatmap", stat="nope"),
        ConfigurationError,
        ["stat", "nope", "l2_norm"],
    ),
    (
        "plot('norms', stat='nope')",
        lambda r, d: r.plot("norms", stat="nope"),
        ConfigurationError,
        ["stat", "nope", "rms"],
    ),
    ("plot('flow', step=999)", lambda r, d: r.plot("flow", step=999), ConfigurationError, ["step", "999", "1..4"]),
    ("plot('flow', step='2')", lambda r, d: r.plot("flow", step="2"), ConfigurationError, ["step", "'2'"]),
    ("plot('flow', stpe=2)", lambda r, d: r.plot("flow", stpe=2), ConfigurationError, ["stpe", "step"]),
    ("plot('loss', stat='x')", lambda r, d: r.plot("loss", stat="x"), ConfigurationError, ["'stat'", "(none)"]),
    ("raise_for_status('fatal')", lambda r, d: r.raise_for_status("fatal"), ValueError, ["fail_on", "fatal"]),
    ("to_csv(table='nope')", lambda r, d: r.to_csv(d / "x.csv", table="nope"), ValueError, ["table", "nope"]),
    ("from_json()", lambda r, d: Report.from_json(), ConfigurationError, ["source", "text="]),
    ("from_json(5)", lambda r, d: Report.from_json(5), ConfigurationError, ["source", "int"]),
    ("from_json(text=5)", lambda r, d: Report.from_json(text=5), ConfigurationError, ["text", "5"]),
    ("from_json(both)", lambda r, d: Report.from_json("{}", text="{}"), ConfigurationError, ["exactly one"]),
    ("from_json(missing path)", lambda r, d: Report.from_json(str(d / "none.json")), FileNotFoundError, ["none.json"]),
    ("from_json(text='{')", lambda r, d: Report.from_json(text="{"), ReportFormatError, ["not valid JSON"]),
    ("from_json('[1]' text)", lambda r, d: Report.from_json(text="[1]"), ReportFormatError, ["JSON object", "list"]),
    ("from_json(deep)", lambda r, d: Report.from_json(text="[" * 200_000), ReportFormatError, ["nested too deeply"]),
    ("from_json(latin-1 bytes)", lambda r, d: Report.from_json(text=b'{"a": "\xff"}'), ReportFormatError, ["UTF-8"]),
]


@pytest.mark.parametrize(("call", "exc_type", "words"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_name_the_argument(report, tmp_path, call, exc_type, words):
    with pytest.raises(exc_type) as info:
        call(report, tmp_path)
    message = str(info.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{message!r} lacks {missing}"
    if exc_type is not FileNotFoundError:
        assert not list(tmp_path.iterdir()), "nothing is written before the arguments are checked"


def _set(path, value):
    def mutate(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value

    return mutate


def _delete(path):
    def mutate(d):
        *head, last = path
        for k in head:
            d = d[k]
        del d[last]

    return mutate


# (mutation, words the message must contain)
HOSTILE = [
    ("schema missing", _delete(["schema"]), ["schema"]),
    ("version is text", _set(["version"], "1"), ["'version'", "int"]),
    ("version from the future", _set(["version"], 99), ["version 99", "Upgrade"]),
    ("stats is an object", _set(["stats"], {}), ["'stats'", "list"]),
    ("stats[0] is a number", _set(["stats", 0], 5), ["stats[0]", "object"]),
    ("stats[0].layer missing", _delete(["stats", 0, "layer"]), ["'stats[0].layer'", "missing"]),
    ("stats[0].stat is a number", _set(["stats", 0, "stat"], 5), ["'stats[0].stat'", "string", "int 5"]),
    ("stats[0].steps is text", _set(["stats", 0, "steps"], "x"), ["stats[0].steps", "list"]),
    ("stats[0].steps[0] is a float", _set(["stats", 0, "steps", 0], 1.5), ["stats[0].steps[0]", "int"]),
    ("stats[0].steps[0] is too large", _set(["stats", 0, "steps", 0], 10**30), ["stats[0].steps[0]", "2**63"]),
    ("stats[0].values too short", _set(["stats", 0, "values"], [1.0]), ["stats[0].values", "1 values"]),
    ("stats[0].values[1] is an object", _set(["stats", 0, "values", 1], {}), ["stats[0].values[1]", "number"]),
    ("stats[0].values[0] is text", _set(["stats", 0, "values", 0], "big"), ["stats[0].values[0]", "'big'"]),
    ("findings is text", _set(["findings"], "x"), ["'findings'", "list"]),
    ("findings[0] is a list", _set(["findings", 0], []), ["findings[0]", "object"]),
    ("findings[0].kind missing", _delete(["findings", 0, "kind"]), ["findings[0]", "'kind'", "missing"]),
    ("findings[0].step is text", _set(["findings", 0, "step"], "2"), ["findings[0]", "'step'", "int"]),
    ("findings[0].severity unknown", _set(["findings", 0, "severity"], "fatal"), ["findings[0]", "severity", "fatal"]),
    ("findings[0].evidence is a list", _set(["findings", 0, "evidence"], []), ["findings[0]", "'evidence'"]),
    ("findings[0].layer is a number", _set(["findings", 0, "layer"], 3), ["findings[0]", "'layer'"]),
    ("findings[0].provisional is text", _set(["findings", 0, "provisional"], "no"), ["'provisional'"]),
    ("scalars is a list", _set(["scalars"], []), ["'scalars'", "object"]),
    ("scalars.values is a list", _set(["scalars", "values"], []), ["scalars.values", "object"]),
    ("scalars.values.loss is text", _set(["scalars", "values", "loss"], "x"), ["scalars.values.loss", "list"]),
    ("scalars.steps[0] is null", _set(["scalars", "steps", 0], None), ["scalars.steps[0]", "int"]),
    ("meta is a list", _set(["meta"], []), ["'meta'", "object"]),
    ("meta.steps is text", _set(["meta", "steps"], "many"), ["'meta.steps'", "int"]),
    ("meta.layers_by_depth is a number", _set(["meta", "layers_by_depth"], 3), ["meta.layers_by_depth", "list"]),
    ("meta.layers_by_depth[1] is null", _set(["meta", "layers_by_depth", 1], None), ["meta.layers_by_depth[1]"]),
    ("frozen[0] is a number", _set(["frozen"], [1]), ["frozen[0]", "string"]),
    ("errors is text", _set(["errors"], "e"), ["'errors'", "list"]),
    ("skipped_steps[0] is null", _set(["skipped_steps"], [None]), ["skipped_steps[0]", "int"]),
]


@pytest.mark.parametrize(("mutate", "words"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_json_gives_a_value_error_naming_the_key(report, tmp_path, mutate, words):
    data = copy.deepcopy(report.to_dict())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    for source in (data, json.dumps(data), path):
        with pytest.raises(ReportFormatError) as info:
            Report.from_json(source)
        assert isinstance(info.value, ValueError)
        message = str(info.value)
        missing = [w for w in words if w not in message]
        assert not missing, f"{message!r} lacks {missing}"


def test_every_form_of_from_json_reads_the_same_report(report, tmp_path):
    text = report.to_json(tmp_path / "r.json", indent=2)
    forms = [
        str(tmp_path / "r.json"),  # a str path (as before)
        tmp_path / "r.json",  # a Path
        text,  # JSON text (as before: starts with "{")
        "\n  " + text,  # JSON text after blanks
        json.loads(text),  # the dict
    ]
    expected = report.to_dict()
    for form in forms:
        assert Report.from_json(form).to_dict() == expected
    assert Report.from_json(text=text).to_dict() == expected
    assert Report.from_json(text=text.encode()).to_dict() == expected
    assert report.findings and report.scalars.shape[1] == 2  # the table above ran on a report with both
