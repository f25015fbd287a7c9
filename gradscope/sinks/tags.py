"""TensorBoard tag names of everything gradscope writes, and their inverse.

One naming scheme, used by the writer (:mod:`gradscope.sinks.tensorboard`), the custom-scalars
layout (:mod:`gradscope.sinks.layout`) and the reader (:mod:`gradscope.sinks.reader`)::

    gradscope/<stat>/<layer>              a layer aggregate (``param == "*"`` in ``report.stats``)
    gradscope/<stat>/<layer>/<param>      one parameter (written with ``per_param=True``)
    gradscope/<stat>/_model               the whole model (``layer == "*"``): the global gradient norm
                                          is ``gradscope/l2_norm/_model``
    gradscope/scalar/<name>               a scalar passed to ``scope.step`` (``loss``, ``val_loss``...)
    gradscope/grad_hist/<layer>           gradient histogram of a layer (all its parameters together)
    gradscope/weight_hist/<layer>         weight histogram of a layer (``histogram_weights=True``)
    gradscope/findings, gradscope/verdict markdown text
    gradscope/figures/gradient_flow       the gradient-flow figure
    gradscope/_findings, _meta, _report   machine-readable JSON (plugin ``gradscope``; not displayed)

Layer keys never contain a slash (the layout escapes ``/``, ``+``, ``%`` and a ``*`` component, see
:func:`gradscope.capture.layout.escape_name`), so the layer part of a tag is unambiguous. The root
module (layer ``""``) is written ``_root``; a module actually named ``_root`` or ``_model`` is
written ``%5Froot`` / ``%5Fmodel`` (a layer key never holds ``%5F``), so every tag reads back as
the layer it was written for.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FIGURE_TAG",
    "FINDINGS_TAG",
    "MODEL_TAG",
    "PLUGIN_NAME",
    "PREFIX",
    "ROOT_TAG",
    "VERDICT_TAG",
    "ParsedTag",
    "hist_tag",
    "layer_from_tag",
    "layer_tag",
    "parse_tag",
    "scalar_tag",
    "stat_tag",
]

PREFIX = "gradscope"
ROOT_TAG = "_root"
MODEL_TAG = "_model"
FINDINGS_TAG = f"{PREFIX}/findings"
VERDICT_TAG = f"{PREFIX}/verdict"
FIGURE_TAG = f"{PREFIX}/figures/gradient_flow"
HEATMAP_TAG = f"{PREFIX}/figures/norm_heatmap"
#: Plugin name of the machine-readable records; TensorBoard does not display unknown plugins.
PLUGIN_NAME = "gradscope"
FINDINGS_JSON_TAG = f"{PREFIX}/_findings"
META_JSON_TAG = f"{PREFIX}/_meta"
REPORT_JSON_TAG = f"{PREFIX}/_report"

# Second components that are not statistics.
_RESERVED = frozenset({"scalar", "grad_hist", "weight_hist", "findings", "verdict", "figures"})


_RESERVED_LAYERS = (ROOT_TAG, MODEL_TAG)
_UNDERSCORE = "%5F"


def _layer_part(layer: str) -> str:
    if layer == "*":
        return MODEL_TAG
    if layer in _RESERVED_LAYERS:
        return _UNDERSCORE + layer[1:]  # a module named like a reserved part
    return layer or ROOT_TAG


def layer_from_tag(part: str) -> str:
    """Inverse of the layer part of a tag: ``_model`` -> ``"*"``, ``_root`` -> ``""``, ``%5Froot`` -> ``"_root"``."""
    if part == MODEL_TAG:
        return "*"
    if part == ROOT_TAG:
        return ""
    if part.startswith(_UNDERSCORE) and "_" + part[len(_UNDERSCORE) :] in _RESERVED_LAYERS:
        return "_" + part[len(_UNDERSCORE) :]
    return part


def stat_tag(stat: str, layer: str, param: str = "*") -> str:
    """Tag of a statistic: ``gradscope/<stat>/<layer>`` or ``gradscope/<stat>/<layer>/<param>``.

    Args:
        stat: statistic name (``l2_norm``).
        layer: module path, ``""`` for the root, ``"*"`` for the whole model.
        param: the parameter's own name, or ``"*"`` for the layer aggregate.
    """
    tag = f"{PREFIX}/{stat}/{_layer_part(layer)}"
    return tag if param == "*" else f"{tag}/{param}"


def layer_tag(stat: str, layer: str) -> str:
    """Tag of a layer aggregate (``layer="*"``: the whole model); same as ``stat_tag(stat, layer)``."""
    return stat_tag(stat, layer)


def scalar_tag(name: str) -> str:
    """Tag of a scalar passed to ``scope.step``: ``gradscope/scalar/<name>``."""
    return f"{PREFIX}/scalar/{name}"


def hist_tag(kind: str, layer: str) -> str:
    """Tag of a histogram: ``gradscope/grad_hist/<layer>`` (``kind="grad"``) or ``.../weight_hist/...``."""
    return f"{PREFIX}/{kind}_hist/{_layer_part(layer)}"


@dataclass(frozen=True)
class ParsedTag:
    """A scalar tag taken apart: ``kind`` is ``"stat"`` or ``"scalar"``."""

    kind: str
    stat: str = ""
    layer: str = ""
    param: str = "*"
    name: str = ""


def parse_tag(tag: str) -> ParsedTag | None:
    """Take a gradscope scalar tag apart; None for any other tag.

    Example:
        >>> parse_tag("gradscope/l2_norm/blocks.3.attn")
        ParsedTag(kind='stat', stat='l2_norm', layer='blocks.3.attn', param='*', name='')
        >>> parse_tag("gradscope/scalar/loss").name
        'loss'
    """
    parts = tag.split("/")
    if len(parts) < 3 or parts[0] != PREFIX or parts[1].startswith("_"):
        return None
    if parts[1] == "scalar":
        return ParsedTag(kind="scalar", name="/".join(parts[2:]))
    if parts[1] in _RESERVED or len(parts) > 4:
        return None
    param = parts[3] if len(parts) == 4 else "*"
    return ParsedTag(kind="stat", stat=parts[1], layer=layer_from_tag(parts[2]), param=param)
