"""The Report: verdict, table, JSON round trip, flush cadence, the rule engine plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gradscope
from gradscope.errors import GradientHealthError, RegistryError
from gradscope.registry import RULES, Registry
from gradscope.report import Finding, Report
from gradscope.rules.engine import build_rules

from .helpers import mlp


class _BigLayerRule(gradscope.Rule):
    """Test rule: fires when a layer's l2_norm exceeds `limit`, at the first such step."""

    name = "big_layer_for_test"
    severity = "error"
    requires = ("l2_norm",)
    defaults = {"limit": 1.0}

    def check(self, ctx):
        vals = ctx.frame.layer_values("l2_norm")
        out = []
        for j, layer in enumerate(ctx.layers):
            hit = np.nonzero(vals[:, j] > self.thresholds["limit"])[0]
            if len(hit):
                s = int(ctx.steps[hit[0]])
                out.append(
                    self.finding(
                        step=s,
                        layer=layer,
                        message=f"Layer {layer!r} has gradient norm {vals[hit[0], j]:.3g} > {self.thresholds['limit']}.",
                        suggestion="Lower the learning rate.",
                        evidence={
                            "stat": "l2_norm",
                            "value": float(vals[hit[0], j]),
                            "threshold": self.thresholds["limit"],
                        },
                    )
                )
        return out


def _run(rule, steps=6, flush_every=2, scale_at=3):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, optimizer=opt, rules=[rule], flush_every=flush_every) as scope:
        for i in range(1, steps + 1):
            model(torch.randn(4, 6)).sum().backward()
            if i >= scale_at:
                model[2].weight.grad.mul_(1e4)
            opt.step()
            scope.step(loss=float(i))
            opt.zero_grad()
    return scope


def test_rules_see_host_numbers_and_findings_are_kept_once_at_their_first_step():
    scope = _run(_BigLayerRule(limit=100.0))
    report = scope.report()
    assert [(f.kind, f.layer, f.step, f.severity) for f in report.findings] == [("big_layer_for_test", "2", 3, "error")]
    assert not report.ok
    with pytest.raises(GradientHealthError, match="big_layer_for_test") as exc:
        report.raise_for_status()
    assert exc.value.report is report
    text = str(report)
    assert "UNHEALTHY" in text and "Layer '2' has gradient norm" in text and "try: Lower the learning rate." in text
    assert "2 !" in text  # the flagged layer is marked in the table


def test_warning_findings_fail_only_with_fail_on_warning():
    f = Finding("x", "warning", 3, "a", "msg.", "fix.", {})
    r = Report(findings=[f], meta={"steps": 3})
    assert r.ok
    r.raise_for_status()
    with pytest.raises(GradientHealthError):
        r.raise_for_status(fail_on="warning")
    with pytest.raises(ValueError, match="fail_on"):
        r.raise_for_status(fail_on="info")


def test_json_round_trip_keeps_findings_stats_and_scalars(tmp_path):
    scope = _run(_BigLayerRule(limit=100.0))
    report = scope.report()
    path = tmp_path / "sub" / "report.json"
    text = report.to_json(path, indent=1)
    data = json.loads(path.read_text())
    assert data["schema"] == "gradscope.report" and data["version"] == 1 and json.loads(text) == data
    back = Report.from_json(path)
    assert back.findings == report.findings
    a = report.stats.sort_values(["step", "layer", "param", "stat"]).reset_index(drop=True)
    b = back.stats.sort_values(["step", "layer", "param", "stat"]).reset_index(drop=True)
    assert a[["step", "layer", "param", "stat"]].equals(b[["step", "layer", "param", "stat"]])
    np.testing.assert_array_equal(a.value.to_numpy(), b.value.to_numpy())
    assert back.scalars["loss"].tolist() == report.scalars["loss"].tolist()
    assert back.ok == report.ok and back.steps == 6
    assert str(back).splitlines()[0] == str(report).splitlines()[0]
    assert not list(tmp_path.glob("sub/.*tmp"))  # atomic write left no temp file


def test_finding_to_dict_has_every_field_in_order_and_copies_the_evidence():
    # to_dict() is written field by field (it runs at every flush that writes findings): checked against
    # dataclasses.asdict, so that a field added to Finding cannot be left out of the JSON.
    import dataclasses

    evidence = {"ratio": np.float32(0.25), "window": (3, 9), "per_layer": {"a": np.arange(2)}, "v": float("-inf")}
    f = Finding("k", "warning", 3, "fc1", "m", "s", evidence, provisional=True, last_step=9, resolved_step=None)
    d = f.to_dict()
    assert list(d) == [x.name for x in dataclasses.fields(Finding)]
    assert d["evidence"] == {"ratio": 0.25, "window": [3, 9], "per_layer": {"a": [0, 1]}, "v": "-inf"}
    assert {k: v for k, v in d.items() if k != "evidence"} == {
        k: v for k, v in dataclasses.asdict(f).items() if k != "evidence"
    }
    d["evidence"]["per_layer"]["a"].append(5)  # the dictionary is the caller's: the finding is unchanged
    assert f.evidence["per_layer"]["a"].tolist() == [0, 1]
    json.dumps(d, allow_nan=False)


def test_nonfinite_values_survive_json():
    r = Report(findings=[Finding("x", "error", 1, None, "m", "s", {"value": float("nan"), "t": float("inf")})])
    back = Report.from_json(r.to_json())
    assert np.isnan(back.findings[0].evidence["value"]) and back.findings[0].evidence["t"] == float("inf")
    with pytest.raises(ValueError, match="Not a gradscope report"):
        Report.from_json('{"schema": "other"}')
    with pytest.raises(ValueError, match="Upgrade gradscope"):
        Report.from_json('{"schema": "gradscope.report", "version": 99}')


def test_flush_cadence_and_report_before_close():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=opt, flush_every=4, rules="none")
    for i in range(1, 10):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        scope.step()
        opt.zero_grad()
        assert len(scope.frame) == (i // 4) * 4
    assert scope.report().steps == 9 and len(scope.frame) == 9  # report() flushes
    scope.close()


def test_build_rules_selection_and_thresholds():
    RULES.register("big_layer_for_test", _BigLayerRule, overwrite=True)
    try:
        rules = build_rules(["all", "-big_layer_for_test"])
        assert "big_layer_for_test" not in [r.name for r in rules]
        rules = build_rules(["big_layer_for_test"], {"big_layer_for_test": {"limit": 3}})
        assert rules[0].thresholds["limit"] == 3.0
        with pytest.raises(gradscope.ConfigurationError, match=r"Unknown threshold.*'limt'.*limit"):
            build_rules(["big_layer_for_test"], {"big_layer_for_test": {"limt": 3}})
        with pytest.raises(gradscope.ConfigurationError, match=r"to be a number like 1\.0"):
            build_rules(["big_layer_for_test"], {"big_layer_for_test": {"limit": "high"}})
        with pytest.raises(gradscope.ConfigurationError, match="not enabled"):
            build_rules("none", {"big_layer_for_test": {"limit": 3}})
        with pytest.raises(gradscope.ConfigurationError, match="pass an instance"):
            build_rules([_BigLayerRule])
    finally:
        RULES.unregister("big_layer_for_test")


def test_a_rule_needing_an_uncollected_statistic_is_a_configuration_error():
    with pytest.raises(gradscope.ConfigurationError, match=r"needs statistic\(s\) 'l2_norm'.*Add them to `stats`"):
        gradscope.watch(mlp(), stats=["abs_max"], rules=[_BigLayerRule()])


def test_registry_messages():
    reg = Registry("widget", "@register_widget")
    reg.register("a", 1)
    with pytest.raises(RegistryError, match=r"already registered. Pass overwrite=True to @register_widget"):
        reg.register("a", 2)
    reg.register("a", 2, overwrite=True)
    assert reg.get("a") == 2
    with pytest.raises(
        RegistryError, match=r"Unknown widget 'b'. Registered widgets: a. Add your own with @register_widget"
    ):
        reg.get("b")
    with pytest.raises(RegistryError, match="Python identifier"):
        gradscope.register_statistic("not valid")
    with pytest.raises(RegistryError, match="`reduce`"):
        gradscope.register_statistic("ok_name", reduce="median")
    with pytest.raises(RegistryError, match="Pass the class, not an instance"):
        gradscope.register_reference(torch.nn.Linear(1, 1))


def test_text_and_json_say_which_findings_are_provisional_or_resolved():
    import dataclasses

    base = Finding("vanishing_gradients", "error", 4, "0", "collapsed.", "use He init.", {"ratio": 1e-5})
    resolved = dataclasses.replace(base, resolved_step=9, last_step=8)
    provisional = dataclasses.replace(base, kind="dead_units", layer="1", provisional=True)
    report = Report(findings=[resolved, provisional], meta={"model": "M", "steps": 10})
    text = str(report)
    assert "(resolved at step 9)" in text and "(provisional)" in text
    back = Report.from_json(report.to_json())
    assert [(f.kind, f.provisional, f.last_step, f.resolved_step) for f in back.findings] == [
        ("vanishing_gradients", False, 8, 9),
        ("dead_units", True, None, None),
    ]


def test_finding_repr_is_short_and_rounded_and_findings_stay_a_list():
    from gradscope.findings import FindingList

    f = Finding(
        kind="vanishing_gradients",
        severity="error",
        step=12,
        layer="fc4",
        message="A long sentence. " * 10,
        suggestion="Use He init.",
        evidence={"stat": "rms", "ratio_to_later_max": {"fc0": 1e-7}, "threshold": 0.001, "window": [12, 40]},
        resolved_step=41,
    )
    assert repr(f) == (
        "Finding(step=12, error, vanishing_gradients, layer='fc4', stat=rms, threshold=0.001, window=12-40 "
        "(resolved at step 41))"
    )
    g = Finding(
        kind="loss_not_decreasing",
        severity="warning",
        step=3,
        layer=None,
        message="m",
        suggestion="s",
        evidence={"value": 1.23456789, "threshold": float("nan")},
    )
    assert repr(g) == "Finding(step=3, warning, loss_not_decreasing, layer=model, value=1.23, threshold=nan)"
    report = Report(findings=[f, g])
    assert isinstance(report.findings, list) and isinstance(report.findings, FindingList)
    assert report.findings == [g, f] and report.findings[0] is g and len(report.findings) == 2
    assert repr(report.findings) == f"[\n  {g!r},\n  {f!r},\n]" and repr(FindingList()) == "[]"
    assert json.loads(json.dumps([x.to_dict() for x in report.findings]))[1]["evidence"]["window"] == [12, 40]
    table = report.findings._repr_html_()
    assert table.count("<tr>") == 3 and "vanishing_gradients" in table and "(model)" in table


def test_report_html_display_escapes_and_embeds_the_flow_plot():
    import base64

    report = _run(_BigLayerRule(), steps=4).report()
    bad = Finding(
        kind="<script>x</script>",
        severity="warning",
        step=2,
        layer="<img src=x>",
        message="a & b",
        suggestion="<u>try</u>",
        evidence={},
    )
    hostile = Report(findings=[*report.findings, bad], stats=report.stats, meta={**report.meta, "model": "<i>M</i>"})
    page = hostile._repr_html_()
    for raw in ("<script>x</script>", "<img src=x>", "<i>M</i>", "a & b", "<u>try</u>"):
        assert raw not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "&lt;img src=x&gt;" in page and "a &amp; b" in page
    n_err = sum(f.severity == "error" for f in report.findings)
    assert n_err and "UNHEALTHY" in page and f"{n_err} error(s)" in page and "1 warning(s)" in page
    assert page.count("<tr>") == 1 + n_err + 1  # the header, then each finding
    png = base64.b64decode(page.split("data:image/png;base64,", 1)[1].split("'", 1)[0])
    assert png.startswith(b"\x89PNG")
    assert "<img" not in Report(findings=[])._repr_html_()  # nothing recorded: no plot, no error


def test_text_report_says_how_many_layers_its_table_leaves_out():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(16)])
    with gradscope.watch(model, rules=[]) as scope:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            scope.step()
            model.zero_grad()
    text = str(scope.report())
    assert "6 of 16 layers shown" in text and "report.layer_summary()" in text
    header = text.index("layer ", text.index("6 of 16 layers shown"))
    rows = text[header:].splitlines()[1:]
    assert len(rows) == 6 and all(r.split()[0] in {str(i) for i in range(16)} for r in rows)
    small = Report(findings=[], stats=scope.report().stats[lambda s: s["layer"].isin(["0", "1", "*"])])
    assert "layers shown" not in str(small) and "latest values up to step 2 (! = named" in str(small)
