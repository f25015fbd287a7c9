"""Module names cannot collide with gradscope's reserved names and separators (issue 14, item 10).

Modules named ``*``, ``_root``, ``_model``, ``a/b`` or holding ``+`` get layer keys that differ from
the aggregates (``*``), the TensorBoard tag scheme (``/``, ``_root``, ``_model``) and tied-parameter
joins (``+``); the keys read back unchanged from the TensorBoard run and from the JSON report.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import gradscope
from gradscope.capture.layout import ParamLayout, escape_name, unescape_name
from gradscope.sinks import tags as T
from gradscope.sinks.reader import read_run

ODD = ["*", "_root", "_model", "a/b", "a+b", "%2B", "plain"]


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i, name in enumerate(ODD):
            self.add_module(name, nn.Linear(3 if i == 0 else 4, 4))
        self.head = nn.Linear(4, 1)
        self.tied = nn.Linear(4, 4)
        self.tied.weight = getattr(self, "a+b").weight  # a tied parameter joins its owners with "+"

    def forward(self, x):
        for name in ODD:
            x = torch.tanh(getattr(self, name)(x))
        return self.head(self.tied(x))


def test_layer_keys_are_distinct_and_escape_reversibly():
    model = Odd()
    layout = ParamLayout.from_model(model)
    assert len(set(layout.layers)) == len(layout.layers)
    assert "*" not in layout.layers and not any("/" in k for k in layout.layers)
    tied = next(info for info in layout.params if info.tied)
    assert tied.layer == "a%2Bb+tied"
    assert layout.owners(tied.layer) == ["a+b", "tied"]
    paths = dict(model.named_modules())
    for layer in layout.layers:
        for owner in layout.owners(layer):
            assert owner in paths  # every key leads back to a real module
    for name in ODD:
        assert unescape_name(escape_name(name)) == name


def test_odd_names_round_trip_through_tensorboard_and_the_report(tmp_path):
    torch.manual_seed(0)
    model = Odd()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, log_dir=tmp_path / "run", rules="none", histogram_every=None) as scope:
        for _ in range(2):
            model(torch.randn(5, 3)).sum().backward()
            opt.step()
            scope.step()
            opt.zero_grad()
    report = scope.report()
    layers = set(scope.layout.layers)
    assert set(report.stats.layer) - {"*"} == layers
    assert len(report.stats[report.stats.layer == "*"].stat.unique()) > 0  # the whole-model aggregate
    # every tag parses back to the layer it was written for
    for layer in layers | {"*", ""}:
        parsed = T.parse_tag(T.stat_tag("l2_norm", layer))
        assert parsed is not None and parsed.layer == layer and parsed.param == "*"
        assert T.parse_tag(T.stat_tag("l2_norm", layer, "weight")).layer == layer
    back = read_run(tmp_path / "run")
    key = ["step", "layer", "param", "stat"]
    tb = back.stats.set_index(key).value.sort_index()
    mine = report.stats.set_index(key).value.sort_index()
    common = tb.index.intersection(mine.index)
    assert set(tb.index.get_level_values("layer")) - {"*"} == layers
    assert len(common) > 0
    torch.testing.assert_close(torch.tensor(tb[common].values), torch.tensor(mine[common].values), rtol=1e-6, atol=0)
    again = gradscope.Report.from_json(report.to_json())
    assert set(again.stats.layer) == set(report.stats.layer)
