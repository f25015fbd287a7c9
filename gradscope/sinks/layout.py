"""The custom-scalars layout: TensorBoard's Custom Scalars dashboard, arranged for gradients.

TensorBoard's Scalars dashboard groups tags by their first component, so every gradscope chart
lands in one "gradscope" section: hundreds of charts for a deep model. The layout written here gives
the Custom Scalars dashboard one category per statistic and, inside it, one multi-line chart per
*group* of layers:

* a transformer-style path (``blocks.3.attn.qkv``, ``encoder.layers.3.mlp.fc1``) belongs to its
  block: the prefix up to the first numeric component that has more components after it
  (``blocks.3``, ``encoder.layers.3``), so a 48-block model gives 48 small charts per statistic;
* any other path belongs to its top-level module (``features.0`` -> ``features``); single-component
  paths (``fc1``, the ``0`` of a ``Sequential``) share one "top level" chart;
* a group with more than ``max_lines`` layers is split, in depth order, into several charts.

Each chart has one regular expression that matches exactly its layers' tags; each category starts
with the whole model's chart. A first category, "gradscope overview", holds the loss and validation
loss, the global gradient norm, update ratio and non-finite count, and the other scalars passed to
``scope.step``. Only the overview and ``l2_norm`` categories start open; the others are collapsed so
that the dashboard stays quick for large models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gradscope.sinks.tags import PREFIX, stat_tag

__all__ = ["DEFAULT_MAX_LINES", "Chart", "build_layout", "layer_groups", "layout_proto", "layout_summary"]

DEFAULT_MAX_LINES = 12
TOP_LEVEL = "top level"
#: Categories that start open in the dashboard.
_OPEN_STATS = ("l2_norm",)
_LOSSES = ("loss", "val_loss")
#: Model-wide charts of the overview, when the statistic is collected.
_OVERVIEW = (
    ("l2_norm", "gradient norm (whole model)"),
    ("update_ratio", "update / weight ratio (whole model)"),
    ("nonfinite_count", "non-finite gradient values (whole model)"),
)


def _group_key(layer: str) -> str:
    path = layer.split("+")[0]  # a tied parameter belongs where its first owner is
    parts = path.split(".") if path else []
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else TOP_LEVEL


def layer_groups(layers: Sequence[str], *, max_lines: int = DEFAULT_MAX_LINES) -> list[tuple[str, list[str]]]:
    """Group layers for charts, in the order given (depth order: input side first).

    Args:
        layers: layer keys (module paths), input side first.
        max_lines: the most layers in one chart; larger groups are split in order.

    Returns:
        ``(title, layers)`` pairs, ordered by their first layer.

    Example:
        >>> layer_groups(["wte", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "head"])
        [('top level', ['wte', 'head']), ('blocks.0', ['blocks.0.attn', 'blocks.0.mlp']), ('blocks.1', ['blocks.1.attn'])]
    """
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(_group_key(layer), []).append(layer)
    out: list[tuple[str, list[str]]] = []
    for key, members in groups.items():
        if len(members) <= max_lines:
            out.append((key, members))
            continue
        n = -(-len(members) // max_lines)
        size = -(-len(members) // n)  # even chunks
        for i in range(n):
            out.append((f"{key} ({i + 1}/{n})", members[i * size : (i + 1) * size]))
    return out


def _exact(tags: Sequence[str]) -> str:
    return "^(?:" + "|".join(re.escape(t) for t in tags) + ")$"


@dataclass(frozen=True)
class Chart:
    """One multi-line chart: a title and the regular expression of its tags."""

    title: str
    regex: str


def build_layout(
    stats: Sequence[str],
    layers_by_depth: Sequence[str],
    *,
    act_stats: Sequence[str] = (),
    act_modules: Sequence[str] = (),
    scalars: Sequence[str] | None = None,
    max_lines: int = DEFAULT_MAX_LINES,
) -> list[tuple[str, bool, list[Chart]]]:
    """The layout as plain data: ``(category title, closed, charts)``.

    Args:
        stats: gradient statistics written per layer (``l2_norm``...).
        layers_by_depth: layer keys, input side first.
        act_stats: activation statistics written per activation module.
        act_modules: activation module paths, in forward order.
        scalars: names of the scalars passed to ``scope.step`` so far; charts for scalars not passed are
            left out. None: charts for ``loss``/``val_loss`` and for any other scalar.
        max_lines: the most lines in one chart.
    """
    losses = [n for n in _LOSSES if scalars is None or n in scalars]
    overview = [Chart("loss", _exact([f"{PREFIX}/scalar/{n}" for n in losses]))] if losses else []
    for stat, title in _OVERVIEW:
        if stat in stats:
            overview.append(Chart(title, _exact([stat_tag(stat, "*")])))
    if scalars is None or any(n not in _LOSSES for n in scalars):
        overview.append(
            Chart("other scalars passed to scope.step()", f"^{re.escape(PREFIX)}/scalar/(?!(?:loss|val_loss)$)")
        )
    categories: list[tuple[str, bool, list[Chart]]] = [(f"{PREFIX} overview", False, overview)]
    groups = layer_groups(layers_by_depth, max_lines=max_lines)
    for stat in stats:
        charts = [Chart(f"{stat} / whole model", _exact([stat_tag(stat, "*")]))]
        charts += [
            Chart(f"{stat} / {title}", _exact([stat_tag(stat, layer) for layer in members]))
            for title, members in groups
        ]
        categories.append((f"{PREFIX} {stat} by layer", stat not in _OPEN_STATS, charts))
    act_groups = layer_groups(act_modules, max_lines=max_lines)
    for stat in act_stats:
        charts = [
            Chart(f"{stat} / {title}", _exact([stat_tag(stat, module) for module in members]))
            for title, members in act_groups
        ]
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
