"""The custom-scalars layout: TensorBoard's Custom Scalars dashboard, arranged for gradients.

TensorBoard's Scalars dashboard groups tags by their first component, so every gradscope chart
lands in one "gradscope" section: hundreds of charts for a deep model. The layout written here gives
the Custom Scalars dashboard one category per statistic and, inside it, **one chart per layer**, in
depth order (input side first), after the whole model's chart.

Why one line per chart: a multi-line chart of the Custom Scalars dashboard colours its lines by
*run* (its colour scale is TensorBoard's run colour scale, keyed by the run name it parses from the
series name ``"<tag> (<run>)"``) and tells the series of one run apart only by a small marker symbol.
Every layer of a gradscope run is in the same run, so a chart holding several layers draws them all
in one colour: a reader cannot tell which line is which. With one layer per chart, the chart's
title names the line; several runs still overlay in one chart, each in its run's colour, which is
what comparing runs needs. Comparing the layers of one run is what the gradient-flow figure and the
layer x step heat map (Images dashboard) are for.

A first category, "gradscope overview", holds the loss and the validation loss (a chart each), the
global gradient norm, update ratio and non-finite count, and one chart per other scalar passed to
``scope.step``. Only the overview and ``l2_norm`` categories start open; the others are collapsed so
that the dashboard stays quick for large models. Each chart has one regular expression that matches
exactly its tag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gradscope.sinks.tags import PREFIX, scalar_tag, stat_tag

__all__ = ["Chart", "build_layout", "layout_proto", "layout_summary"]

#: Categories that start open in the dashboard.
_OPEN_STATS = ("l2_norm",)
_LOSSES = ("loss", "val_loss")
#: Model-wide charts of the overview, when the statistic is collected.
_OVERVIEW = (
    ("l2_norm", "gradient norm (whole model)"),
    ("update_ratio", "update / weight ratio (whole model)"),
    ("nonfinite_count", "non-finite gradient values (whole model)"),
)


def _exact(tags: Sequence[str]) -> str:
    return "^(?:" + "|".join(re.escape(t) for t in tags) + ")$"


def _layer_title(layer: str) -> str:
    return layer or "(root)"


@dataclass(frozen=True)
class Chart:
    """One chart: a title and the regular expression of its tag."""

    title: str
    regex: str


def build_layout(
    stats: Sequence[str],
    layers_by_depth: Sequence[str],
    *,
    act_stats: Sequence[str] = (),
    act_modules: Sequence[str] | Mapping[str, Sequence[str]] = (),
    scalars: Sequence[str] | None = None,
) -> list[tuple[str, bool, list[Chart]]]:
    """The layout as plain data: ``(category title, closed, charts)``.

    Args:
        stats: gradient statistics written per layer (``l2_norm``...).
        layers_by_depth: layer keys, input side first.
        act_stats: activation statistics written per activation module.
        act_modules: activation module paths, in forward order; or, per activation statistic, the
            modules that have it (a ReLU has no saturated fraction, a sigmoid no zero fraction).
        scalars: names of the scalars passed to ``scope.step`` so far; charts for scalars not passed are
            left out. None: charts for ``loss``/``val_loss`` and one chart matching any other scalar
            (the only chart that may hold several lines).

    Example:
        >>> [(t, [c.title for c in charts]) for t, _, charts in build_layout(["l2_norm"], ["fc1", "fc2"], scalars=[])]
        [('gradscope overview', ['gradient norm (whole model)']), ('gradscope l2_norm by layer', ['l2_norm / whole model', 'l2_norm / fc1', 'l2_norm / fc2'])]
    """
    overview = [Chart(n, _exact([scalar_tag(n)])) for n in _LOSSES if scalars is None or n in scalars]
    for stat, title in _OVERVIEW:
        if stat in stats:
            overview.append(Chart(title, _exact([stat_tag(stat, "*")])))
    if scalars is None:
        overview.append(
            Chart("other scalars passed to scope.step()", f"^{re.escape(PREFIX)}/scalar/(?!(?:loss|val_loss)$)")
        )
    else:
        overview += [Chart(n, _exact([scalar_tag(n)])) for n in scalars if n not in _LOSSES]
    categories: list[tuple[str, bool, list[Chart]]] = [(f"{PREFIX} overview", False, overview)]
    for stat in stats:
        charts = [Chart(f"{stat} / whole model", _exact([stat_tag(stat, "*")]))]
        charts += [
            Chart(f"{stat} / {_layer_title(layer)}", _exact([stat_tag(stat, layer)])) for layer in layers_by_depth
        ]
        categories.append((f"{PREFIX} {stat} by layer", stat not in _OPEN_STATS, charts))
    for stat in act_stats:
        modules = act_modules.get(stat, ()) if isinstance(act_modules, Mapping) else act_modules
        charts = [Chart(f"{stat} / {_layer_title(m)}", _exact([stat_tag(stat, m)])) for m in modules]
        if charts:
            categories.append((f"{PREFIX} {stat} by activation", True, charts))
    return categories


def layout_proto(categories: list[tuple[str, bool, list[Chart]]]) -> object:
    """The layout as TensorBoard's ``Layout`` protocol buffer."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    for title, closed, charts in categories:
        cat = layout.category.add(title=title, closed=closed)
        for chart in charts:
            cat.chart.add(title=chart.title, multiline=layout_pb2.MultilineChartContent(tag=[chart.regex]))
    return layout


def layout_summary(categories: list[tuple[str, bool, list[Chart]]]) -> object:
    """A ``Summary`` protocol buffer holding the layout, as the Custom Scalars plugin reads it."""
    from gradscope.sinks.protos import layout_summary_proto

    return layout_summary_proto(layout_proto(categories))
