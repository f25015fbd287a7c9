"""report.plot() draws the numbers of report.stats; layer_summary and to_csv against plain pandas/numpy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sinkhelp import FiresAtStep, small_mlp, train

from gradscope import Report
from gradscope.errors import RegistryError


@pytest.fixture(scope="module")
def report():
    return train(small_mlp(), 21, rules=[FiresAtStep(at=4, layer="2")]).report


def _layer_series(report, layer, stat):
    s = report.stats
    rows = s[(s["layer"] == layer) & (s["param"] == "*") & (s["stat"] == stat)]
    return rows["step"].to_numpy(), rows["value"].to_numpy()


@pytest.fixture(scope="module", params=["live", "json"])
def rep(request, report):
    return report if request.param == "live" else Report.from_json(report.to_json())


def test_flow_bars_are_rms_and_abs_max_at_the_last_sampled_step(rep):
    fig = rep.plot("flow")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    layers = ["0", "2", "4"]
    assert [t.get_text() for t in ax.get_xticklabels()] == layers
    heights = [p.get_height() for p in ax.patches]
    peak, typical = heights[:3], heights[3:]
    for j, layer in enumerate(layers):
        steps, rms = _layer_series(rep, layer, "rms")
        s_max, amax = _layer_series(rep, layer, "abs_max")
        assert s_max[-1] == 21
        assert typical[j] == pytest.approx(rms[steps == 21][0], rel=1e-12)
        assert peak[j] == pytest.approx(amax[-1], rel=1e-12)
    assert "step 21" in ax.get_title()
    # the layer named in a finding is marked
    colors = {t.get_text(): t.get_color() for t in ax.get_xticklabels()}
    assert colors["2"] != colors["0"]


def test_heatmap_is_log10_of_the_gradient_norm(rep):
    ax = rep.plot("heatmap").axes[0]
    image = np.ma.filled(ax.images[0].get_array(), np.nan)
    expected = np.stack([np.log10(_layer_series(rep, layer, "l2_norm")[1]) for layer in ["0", "2", "4"]])
    np.testing.assert_allclose(image, expected, rtol=1e-12)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "2", "4"]


def test_norm_curves_one_line_per_layer_and_the_model(rep):
    ax = rep.plot("norms").axes[0]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["0", "2", "4", "whole model"]
    for ln, layer in zip(lines, ["0", "2", "4", "*"]):
        steps, values = _layer_series(rep, layer, "l2_norm")
        np.testing.assert_array_equal(ln.get_xdata(), steps)
        np.testing.assert_allclose(ln.get_ydata(), values, rtol=1e-12)


def test_loss_plot_and_axes_accepted(rep):
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    assert rep.plot("loss", ax=ax2) is fig
    assert not ax1.get_lines()
    loss = next(ln for ln in ax2.get_lines() if ln.get_label() == "loss")
    np.testing.assert_allclose(loss.get_ydata(), rep.scalars["loss"].to_numpy(), rtol=1e-12)


def test_unknown_kind_lists_the_kinds(report):
    with pytest.raises(RegistryError, match="flow, heatmap, loss, norms"):
        report.plot("bars")


def test_save_plots(report, tmp_path):
    paths = report.save_plots(tmp_path / "plots")
    assert [p.name for p in paths] == ["flow.png", "heatmap.png", "norms.png", "loss.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [svg] = report.save_plots(tmp_path, kinds=["flow"], fmt="svg")
    assert svg.read_text().lstrip().startswith("<?xml")


def test_layer_summary_against_plain_numpy(rep):
    summary = rep.layer_summary()
    assert list(summary.index) == ["0", "2", "4", "1", "3", "*"]  # depth order, activations, the model
    s = rep.stats[rep.stats["param"] == "*"]
    checked = 0
    for (layer, stat), g in s.groupby(["layer", "stat"]):
        g = g.sort_values("step")
        v = g["value"].to_numpy()
        finite = v[~np.isnan(v)]
        expected = {"last": v[-1], "min": finite.min(), "max": finite.max(), "median": float(np.median(finite))}
        for agg, want in expected.items():
            got = summary.loc[layer, (stat, agg)]
            assert got == pytest.approx(want, rel=1e-12, abs=0), (layer, stat, agg)
            checked += 1
    assert checked == 4 * s.groupby(["layer", "stat"]).ngroups
    # statistics a layer does not have are NaN (activation modules have no gradient norm)
    assert math.isnan(summary.loc["1", ("l2_norm", "last")])


def test_to_csv_tables(report, tmp_path):
    stats = pd.read_csv(report.to_csv(tmp_path / "stats.csv"), keep_default_na=False, na_values=["nan", "NaN", ""])
    stats["layer"] = stats["layer"].astype(str)
    pd.testing.assert_frame_equal(stats, report.stats.astype({"layer": str}), check_dtype=False)
    layers = pd.read_csv(
        report.to_csv(tmp_path / "layers.csv", table="layers"), index_col="layer", dtype={"layer": str}
    )
    assert "l2_norm_last" in layers.columns and "update_ratio_median" in layers.columns
    assert layers.loc["2", "l2_norm_max"] == pytest.approx(
        report.layer_summary().loc["2", ("l2_norm", "max")], rel=1e-15
    )
    scalars = pd.read_csv(report.to_csv(tmp_path / "scalars.csv", table="scalars"), index_col="step")
    np.testing.assert_allclose(scalars["val_loss"], report.scalars["val_loss"], rtol=1e-15)
    with pytest.raises(ValueError, match="Expected `table` to be one of stats, layers, scalars"):
        report.to_csv(tmp_path / "x.csv", table="findings")


def test_html_and_tensorboard_text_say_provisional_and_resolved(report):
    import json

    from gradscope.sinks.tensorboard import _finding_markdown, verdict_markdown
    from gradscope.views.html import render_html

    data = json.loads(report.to_json())
    (first,) = data["findings"]
    data["findings"] = [
        {**first, "resolved_step": 9, "last_step": 7},
        {**first, "layer": "4", "step": 12, "provisional": True},
    ]
    rep = Report.from_json(json.dumps(data))
    resolved, provisional = rep.findings
    assert (resolved.resolved_step, provisional.provisional) == (9, True)
    page = render_html(rep)
    # once in the findings table, once in the text report the page embeds
    assert page.count("resolved at step 9") == 2 and page.count(">provisional<") == 1
    assert page.count("(provisional)") == 1  # the text report's line
    assert "at step 4 (resolved at step 9)\n" in _finding_markdown(resolved)
    assert "at step 12 (provisional)\n" in _finding_markdown(provisional)
    table = verdict_markdown(rep)
    assert "| 4 (resolved at step 9) | error |" in table and "| 12 (provisional) | error |" in table
    plain = _finding_markdown(rep.findings[0].__class__.from_dict(first))
    assert "(resolved" not in plain and "(provisional)" not in plain


def test_a_zero_gradient_layer_is_drawn_and_labelled_in_the_flow_plot():
    def zero_layer_2(step, model):
        model[2].weight.grad.zero_()
        model[2].bias.grad.zero_()

    rep = train(small_mlp(), 4, grad_hook=zero_layer_2).report
    _, rms = _layer_series(rep, "2", "rms")
    assert rms[-1] == 0.0  # the run really has a zero-gradient layer
    ax = rep.plot("flow").axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0", "2", "4"]
    [zero] = [t for t in ax.texts if t.get_text() == "0"]
    assert zero.get_position()[0] == labels.index("2")  # above layer 2's slot
    stubs = [p for p in ax.patches if p.get_hatch()]
    assert len(stubs) == 1 and stubs[0].get_x() + stubs[0].get_width() / 2 == pytest.approx(1.0)
    # the other layers' bars are their RMS, unchanged
    step = _layer_series(rep, "0", "abs_max")[0][-1]  # the flow plot shows the last sampled step
    assert f"step {step}" in ax.get_title()
    typical = [p.get_height() for p in ax.patches if not p.get_hatch()][3:]
    for j, layer in ((0, "0"), (2, "4")):
        steps, rms = _layer_series(rep, layer, "rms")
        assert typical[j] == pytest.approx(rms[steps == step][0], rel=1e-12)


def test_lr_gets_its_own_axis_in_the_loss_plot(report):
    scalars = report.scalars.copy()
    scalars["lr"] = np.linspace(1e-3, 1e-4, len(scalars))
    rep = Report(findings=[], stats=report.stats, scalars=scalars)

    def lines(ax):
        return {ln.get_label(): ln for ln in ax.get_lines()}

    fig = rep.plot("loss")  # its own figure: a panel below for the non-loss scalars
    top, bottom = fig.axes
    assert set(lines(top)) == {"loss", "val_loss"} and set(lines(bottom)) == {"lr"}
    np.testing.assert_allclose(lines(bottom)["lr"].get_ydata(), scalars["lr"].to_numpy(), rtol=1e-12)
    lo, hi = bottom.get_ylim()
    assert lo < 1e-4 and hi < 2e-3  # scaled to the learning rate, not to the loss
    fig = Figure()
    ax = fig.subplots()
    assert rep.plot("loss", ax=ax) is fig  # the caller's axes: a right-hand axis
    twin = next(a for a in fig.axes if a is not ax)
    assert set(lines(ax)) == {"loss", "val_loss"} and set(lines(twin)) == {"lr"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "val_loss", "lr"]


def test_names_are_plain_text_in_plots_and_html():
    import torch.nn as nn

    from gradscope.views.html import render_html
    from gradscope.views.plots import render_png

    name = "$\\foo$"
    model = nn.Sequential()
    model.add_module("0", nn.Linear(6, 12))
    model.add_module(name, nn.Linear(12, 3))
    rep = train(model, 3, rules=[FiresAtStep(at=2, layer=name)]).report
    for kind in ("flow", "heatmap", "norms", "loss"):
        fig = rep.plot(kind)
        assert render_png(fig)[0].startswith(b"\x89PNG")  # mathtext used to raise here
    ticks = rep.plot("flow").axes[0].get_xticklabels()
    shown = [t._preprocess_math(t.get_text()) for t in ticks]  # what matplotlib draws, and whether as math
    assert shown == [("0", False), (name, False)]
    page = render_html(rep)
    assert page.count("data:image/png;base64,") == 4 and name in page
