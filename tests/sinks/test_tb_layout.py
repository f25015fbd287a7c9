"""The custom-scalars layout: grouping by block, valid regexes, every written tag on exactly one chart."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from sinkhelp import load_events, small_mlp, train

from gradscope.sinks.layout import build_layout, layer_groups

GPT_BLOCK = ["ln1", "attn.qkv", "attn.proj", "ln2", "mlp.fc", "mlp.out"]


def gpt_layers(blocks: int) -> list[str]:
    return ["wte+head", "wpe"] + [f"blocks.{i}.{s}" for i in range(blocks) for s in GPT_BLOCK] + ["ln_f"]


def test_transformer_layers_group_by_block():
    groups = dict(layer_groups(gpt_layers(48)))
    assert len(groups) == 49  # 48 blocks + the top-level modules
    assert groups["top level"] == ["wte+head", "wpe", "ln_f"]
    assert groups["blocks.7"] == [f"blocks.7.{s}" for s in GPT_BLOCK]
    assert list(groups)[:3] == ["top level", "blocks.0", "blocks.1"]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (["0", "2", "4"], [("top level", ["0", "2", "4"])]),
        (
            ["features.0", "features.3", "classifier.1"],
            [("features", ["features.0", "features.3"]), ("classifier", ["classifier.1"])],
        ),
        (
            ["encoder.layers.3.mlp.fc1", "encoder.layers.3.attn"],
            [("encoder.layers.3", ["encoder.layers.3.mlp.fc1", "encoder.layers.3.attn"])],
        ),
        (["", "fc"], [("top level", ["", "fc"])]),
    ],
)
def test_group_keys(layers, expected):
    assert layer_groups(layers) == expected


def test_large_groups_are_split_evenly_in_order():
    layers = [str(i) for i in range(30)]
    groups = layer_groups(layers, max_lines=12)
    assert [t for t, _ in groups] == ["top level (1/3)", "top level (2/3)", "top level (3/3)"]
    assert [len(m) for _, m in groups] == [10, 10, 10]
    assert [layer for _, members in groups for layer in members] == layers


def test_every_layer_tag_on_exactly_one_chart_per_statistic():
    layers = gpt_layers(4)
    categories = build_layout(["l2_norm", "abs_max"], layers)
    titles = [c[0] for c in categories]
    assert titles == ["gradscope overview", "gradscope l2_norm by layer", "gradscope abs_max by layer"]
    assert [c[1] for c in categories] == [False, False, True]  # only l2_norm open among the statistics
    for _, _, charts in categories[1:]:
        stat = charts[0].title.split(" / ")[0]
        for layer in layers:
            tag = f"gradscope/{stat}/{layer}"
            assert sum(bool(re.match(c.regex, tag)) for c in charts) == 1, tag
        # a regex matches whole tags only: no prefix matches of a longer path
        assert not any(re.match(c.regex, f"gradscope/{stat}/blocks.1.attn.qkv.extra") for c in charts)


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
    # groups of the nested model: "0.*" layers are top-level Sequential children, "1.*" another group
    by_layer = [c for c in charts if c[0] == "gradscope l2_norm by layer"]
    assert [c[1] for c in by_layer] == ["l2_norm / whole model", "l2_norm / 0", "l2_norm / 1"]
    # only the scalars passed get charts: loss and val_loss, no "other scalars"
    assert [c[1] for c in charts if c[0] == "gradscope overview"] == [
        "loss",
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
    assert "other scalars passed to scope.step()" not in charts[0]
    assert "other scalars passed to scope.step()" in charts[1]
