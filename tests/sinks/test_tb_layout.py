"""The custom-scalars layout: one line per chart, valid regexes, every written tag on exactly one chart."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from sinkhelp import load_events, small_mlp, train

from gradscope.sinks.layout import build_layout

GPT_BLOCK = ["ln1", "attn.qkv", "attn.proj", "ln2", "mlp.fc", "mlp.out"]


def gpt_layers(blocks: int) -> list[str]:
    return ["wte+head", "wpe"] + [f"blocks.{i}.{s}" for i in range(blocks) for s in GPT_BLOCK] + ["ln_f"]


def test_every_layer_tag_on_exactly_one_chart_per_statistic_and_alone():
    layers = gpt_layers(4)
    categories = build_layout(["l2_norm", "abs_max"], layers)
    titles = [c[0] for c in categories]
    assert titles == ["gradscope overview", "gradscope l2_norm by layer", "gradscope abs_max by layer"]
    assert [c[1] for c in categories] == [False, False, True]  # only l2_norm open among the statistics
    for _, _, charts in categories[1:]:
        stat = charts[0].title.split(" / ")[0]
        # the whole model first, then one chart per layer in depth order, titled by the layer
        assert [c.title for c in charts] == [f"{stat} / whole model", *(f"{stat} / {layer}" for layer in layers)]
        tags = [f"gradscope/{stat}/_model", *(f"gradscope/{stat}/{layer}" for layer in layers)]
        for tag in tags:
            assert sum(bool(re.match(c.regex, tag)) for c in charts) == 1, tag
        # one line per chart: the Custom Scalars dashboard colours lines by run, so a chart of several
        # layers of one run would draw them all in one colour
        for chart in charts:
            assert sum(bool(re.match(chart.regex, t)) for t in tags) == 1, chart
        # a regex matches whole tags only: no prefix matches of a longer path
        assert not any(re.match(c.regex, f"gradscope/{stat}/blocks.1.attn.qkv.extra") for c in charts)


def test_overview_has_one_chart_per_scalar():
    categories = build_layout(["l2_norm"], ["fc"], scalars=["loss", "val_loss", "lr"])
    overview = categories[0][2]
    assert [c.title for c in overview] == ["loss", "val_loss", "gradient norm (whole model)", "lr"]
    assert [bool(re.match(c.regex, "gradscope/scalar/lr")) for c in overview] == [False, False, False, True]


def test_tensorboard_colours_custom_scalar_lines_by_run():
    """The premise of the layout, checked in TensorBoard's own dashboard code.

    The multi-line chart card builds its colour scale from the run colour scale and keys it by the
    run parsed from the series name ``"<tag> (<run>)"``: two tags of one run get one colour.
    """
    import zipfile
    from pathlib import Path

    import tensorboard

    bundle = Path(tensorboard.__file__).parent / "webfiles.zip"
    with zipfile.ZipFile(bundle) as z:
        js = z.read("index.js").decode("utf-8", "ignore")
    card = js[js.index("_runToNextAvailableSymbolIndex") - 2000 : js.index("_runToNextAvailableSymbolIndex")]
    # the data-series colour scale: scale(name) = runColourScale(parseRunName(name)), the run in "(...)$"
    assert re.search(r"scale\((\w)\)\{return this\.runBasedColorScale\.scale\(this\.parseRunName\(\1\)\)\}", card)
    assert "match(/\\((.*)\\)$/)" in card


def test_layout_in_the_run_is_valid_and_covers_the_written_tags(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    model = nn.Sequential(small_mlp(), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    train(model, 3, log_dir=tmp_path)
    acc = load_events(tmp_path)
    configs = acc.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(configs[0].tensor_proto.string_val[0])
    charts = {(cat.title, chart.title): list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    regexes = [re.compile(r) for tags in charts.values() for r in tags]  # all compile
    scalar_tags = acc.Tags()["scalars"]
    for tag in scalar_tags:
        assert any(r.match(tag) for r in regexes), f"{tag} is on no chart"
    for (cat, chart), tags in charts.items():
        assert any(re.match(tags[0], t) for t in scalar_tags), f"chart {cat} / {chart} matches no tag"
    # one chart per layer of the nested model, in depth order
    by_layer = [c for c in charts if c[0] == "gradscope l2_norm by layer"]
    layers = ["0.0", "0.2", "0.4", "1.0", "1.1"]
    assert [c[1] for c in by_layer] == ["l2_norm / whole model", *(f"l2_norm / {layer}" for layer in layers)]
    # only the scalars passed get charts: loss and val_loss, nothing else
    assert [c[1] for c in charts if c[0] == "gradscope overview"] == [
        "loss",
        "val_loss",
        "gradient norm (whole model)",
        "update / weight ratio (whole model)",
        "non-finite gradient values (whole model)",
    ]


def test_layout_rewritten_at_close_when_a_scalar_appears_later(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    import gradscope

    model = small_mlp()
    with gradscope.watch(model, log_dir=tmp_path, flush_every=3) as scope:
        for step in range(1, 8):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            scope.step(lr=0.1) if step >= 5 else scope.step()
            model.zero_grad()
    configs = load_events(tmp_path).Tensors("custom_scalars__config__")
    assert [e.step for e in configs] == [1, 7]  # the first flush, then close (TensorBoard shows the last)
    charts = []
    for e in configs:
        layout = layout_pb2.Layout()
        layout.ParseFromString(e.tensor_proto.string_val[0])
        charts.append([c.title for c in layout.category[0].chart])
    assert "lr" not in charts[0]
    assert "lr" in charts[1]
