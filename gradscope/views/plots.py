"""Matplotlib figures of a run: gradient flow by depth, a layer x step heat map, norm curves, loss.

Two layers:

* drawing functions (:func:`gradient_flow`, :func:`norm_heatmap`, :func:`norm_curves`,
  :func:`loss_curves`) take plain arrays, draw into ``ax`` when given (else a new figure) and return
  the figure. The TensorBoard sink calls them with arrays from the live frame;
* report plots, registered by kind with :func:`register_plot` (``"flow"``, ``"heatmap"``,
  ``"norms"``, ``"loss"``), read ``report.stats`` and ``report.scalars``, so they work on a report
  read back from JSON or TensorBoard as well. ``Report.plot(kind)`` and ``Report.save_plots(dir)``
  use them.

Figures are built with ``matplotlib.figure.Figure`` and rendered with the Agg canvas; pyplot is never
imported, so no global backend is chosen and no figure is left open in pyplot's registry.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np

from gradscope._registry import Registry
from gradscope.views.tables import layer_matrix, layer_order

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gradscope.views.source import ReportData as Report

__all__ = [
    "PLOTS",
    "gradient_flow",
    "loss_curves",
    "norm_curves",
    "norm_heatmap",
    "plot_report",
    "register_plot",
    "render_png",
    "save_plots",
]

PlotFn = Callable[..., "Figure"]
PLOTS: Registry[PlotFn] = Registry("plot kind", "@gradscope.views.plots.register_plot")

_FLAG = "#d62728"
_MAX_COLUMNS = 1500  # heat-map columns; longer runs are thinned evenly (the last step is kept)
_MAX_POINTS = 4000  # points per curve, likewise


def register_plot(kind: str, *, overwrite: bool = False) -> Callable[[PlotFn], PlotFn]:
    """Register ``fn(report, *, ax=None, **kwargs) -> Figure`` as ``report.plot(kind)``."""

    def decorator(fn: PlotFn) -> PlotFn:
        PLOTS.register(kind, fn, overwrite=overwrite)
        return fn

    return decorator


# -- figure plumbing ---------------------------------------------------------------------------------
def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:  # pragma: no cover - matplotlib is a dependency
        raise ModuleNotFoundError("gradscope's plots need matplotlib: pip install matplotlib") from exc
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]  # typed Figure | SubFigure; the caller draws on it alike
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def render_png(fig: Figure, *, dpi: int = 100) -> tuple[bytes, int, int]:
    """Render a figure to PNG with the Agg canvas: ``(png bytes, height, width)`` in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself to the figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    w, h = (round(v * dpi) for v in fig.get_size_inches())
    return buf.getvalue(), h, w


def _label(layer: str) -> str:
    return "(root)" if layer == "" else ("(model)" if layer == "*" else layer)


def _tick_layers(ax: Axes, layers: Sequence[str], axis: str, flagged: set[str]) -> None:
    n = len(layers)
    every = max(1, math.ceil(n / 60))  # at most ~60 labels, whatever the depth
    pos = list(range(0, n, every))
    labels = [_label(layers[i]) for i in pos]
    if axis == "x":
        ax.set_xticks(pos, labels, rotation=90, fontsize=7 if n > 20 else 8)
        ticks = ax.get_xticklabels()
    else:
        ax.set_yticks(pos, labels, fontsize=7 if n > 20 else 8)
        ticks = ax.get_yticklabels()
    for i, t in zip(pos, ticks):
        if layers[i] in flagged:
            t.set_color(_FLAG)


def _thin(n: int, limit: int) -> np.ndarray:
    """Evenly spaced indices of at most ``limit`` out of ``n``, first and last kept."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _positive(values: np.ndarray) -> np.ndarray:
    """Values for a log axis: zeros and non-finite values become NaN (not drawn)."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(v) & (v > 0), v, np.nan)


# -- drawing functions -------------------------------------------------------------------------------
def gradient_flow(
    layers: Sequence[str],
    typical: np.ndarray,
    peak: np.ndarray | None = None,
    *,
    flagged: Sequence[str] = (),
    step: int | None = None,
    typical_label: str = "RMS |g|",
    peak_label: str = "max |g|",
    ax: Axes | None = None,
) -> Figure:
    """The classic gradient-flow view: per-layer gradient magnitude by depth, log scale.

    Args:
        layers: ``L`` layer keys, input side first.
        typical: ``[L]`` typical magnitude per layer (gradscope uses the RMS of the gradient, which is
            at least the mean of ``|g|``).
        peak: ``[L]`` largest ``|g|`` per layer, drawn as lighter bars behind, or None.
        flagged: layers named in a finding (their labels are red).
        step: the step shown, for the title.
        typical_label: legend of ``typical``.
        peak_label: legend of ``peak``.
        ax: axes to draw into; default a new figure.

    Returns:
        The figure.
    """
    n = len(layers)
    fig, ax = _axes(ax, (min(20.0, max(6.0, 0.28 * n + 2)), 4.2))
    x = np.arange(n)
    if peak is not None:
        ax.bar(x, _positive(peak), width=0.8, color="#9ecae1", label=peak_label)
    ax.bar(x, _positive(typical), width=0.5, color="#08519c", label=typical_label)
    ax.set_yscale("log")
    ax.set_xlim(-0.6, n - 0.4)
    flagged_set = set(flagged)
    _tick_layers(ax, layers, "x", flagged_set)
    ax.set_xlabel("layer (input side first)")
    ax.set_ylabel("gradient magnitude")
    ax.set_title("Gradient flow" + (f" at step {step}" if step is not None else ""))
    ax.grid(axis="y", which="major", alpha=0.3)
    if n:
        ax.legend(loc="best", fontsize=8)
    return fig


def norm_heatmap(
    layers: Sequence[str],
    steps: np.ndarray,
    values: np.ndarray,
    *,
    stat: str = "l2_norm",
    flagged: Sequence[str] = (),
    ax: Axes | None = None,
) -> Figure:
    """Heat map of ``log10(stat)``: one row per layer (input side on top), one column per step.

    Args:
        layers: ``L`` layer keys, input side first.
        steps: ``[S]`` step numbers.
        values: ``[S, L]`` statistic values; zeros, NaN and Inf are shown blank.
        stat: the statistic's name, for the colour bar.
        flagged: layers named in a finding (their labels are red).
        ax: axes to draw into; default a new figure.

    Returns:
        The figure.
    """
    n = len(layers)
    fig, ax = _axes(ax, (10.0, min(16.0, max(3.0, 0.22 * n + 1.5))))
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64).reshape(len(steps), n)
    keep = _thin(len(steps), _MAX_COLUMNS)
    steps, values = steps[keep], values[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.log10(_positive(values)).T  # [L, S]
    if len(steps) and n:
        lo, hi = float(steps[0]), float(steps[-1])
        half = 0.5 if len(steps) == 1 else 0.5 * (hi - lo) / (len(steps) - 1)
        img = ax.imshow(
            np.ma.masked_invalid(logv),
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(lo - half, hi + half, n - 0.5, -0.5),
        )
        fig.colorbar(img, ax=ax, label=f"log10 {stat}")
    _tick_layers(ax, layers, "y", set(flagged))
    ax.set_xlabel("step")
    ax.set_title(f"log10 {stat} per layer and step")
    return fig


def norm_curves(
    layers: Sequence[str],
    steps: np.ndarray,
    values: np.ndarray,
    *,
    stat: str = "l2_norm",
    model: np.ndarray | None = None,
    ax: Axes | None = None,
) -> Figure:
    """One curve per layer of ``stat`` over steps, log scale, coloured by depth.

    Args:
        layers: ``L`` layer keys, input side first.
        steps: ``[S]`` step numbers.
        values: ``[S, L]``.
        stat: the statistic's name, for the axis label.
        model: ``[S]`` the whole model's value, drawn dashed in black, or None.
        ax: axes to draw into; default a new figure.

    Returns:
        The figure.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(layers)
    fig, ax = _axes(ax, (9.0, 4.5))
    values = np.asarray(values, dtype=np.float64).reshape(len(steps), n)
    keep = _thin(len(steps), _MAX_POINTS)  # a long run: every line would hold more points than pixels
    steps, values = np.asarray(steps)[keep], values[keep]
    model = None if model is None else np.asarray(model, dtype=np.float64)[keep]
    cmap = colormaps["viridis"]
    for j, layer in enumerate(layers):
        ax.plot(steps, _positive(values[:, j]), color=cmap(j / max(1, n - 1)), lw=1.0, label=_label(layer))
    if model is not None:
        ax.plot(steps, _positive(model), color="black", lw=1.5, ls="--", label="whole model")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(stat)
    ax.set_title(f"{stat} per layer")
    ax.grid(alpha=0.3)
    if n <= 12:
        ax.legend(fontsize=7, ncol=2 if n > 6 else 1, loc="best")
    else:
        sm = ScalarMappable(norm=Normalize(0, n - 1), cmap=cmap)
        fig.colorbar(sm, ax=ax, label="depth (0 = input side)")
    return fig


def loss_curves(steps: np.ndarray, series: Mapping[str, np.ndarray], *, ax: Axes | None = None) -> Figure:
    """The scalars passed to ``scope.step`` (loss, val_loss, ...) over steps.

    Args:
        steps: ``[S]`` step numbers.
        series: name -> ``[S]`` values (NaN where not passed).
        ax: axes to draw into; default a new figure.

    Returns:
        The figure.
    """
    fig, ax = _axes(ax, (8.0, 3.8))
    for name, vals in series.items():
        v = np.asarray(vals, dtype=np.float64)
        ok = np.nonzero(np.isfinite(v))[0]
        ok = ok[_thin(len(ok), _MAX_POINTS)]
        marker = "o" if len(ok) < 30 else None
        ax.plot(np.asarray(steps)[ok], v[ok], lw=1.2, marker=marker, ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_title("scalars passed to scope.step()")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return fig


# -- report plots ------------------------------------------------------------------------------------
def _flagged(report: Report) -> list[str]:
    return [f.layer for f in report.findings if f.layer]


def _depth(report: Report) -> list[str]:
    return layer_order(report.stats, report.meta.get("layers_by_depth"))


def _grad_layers(report: Report) -> list[str]:
    """Layers with gradient statistics (activation modules have only ``act_*`` rows)."""
    stats = report.stats
    grad = stats[(stats["param"] == "*") & (stats["layer"] != "*") & ~stats["stat"].str.startswith("act_")]
    present = set(grad["layer"])
    return [layer for layer in _depth(report) if layer in present]


@register_plot("flow")
def plot_flow(report: Report, *, ax: Axes | None = None, step: int | None = None) -> Figure:
    """Gradient flow at ``step`` (default: the last step where ``abs_max`` was taken, else the last)."""
    layers = _grad_layers(report)
    typical_stat = "rms" if "rms" in set(report.stats["stat"]) else "l2_norm"
    s_typ, layers, typ = layer_matrix(report.stats, typical_stat, layers)
    s_peak, _, peak = layer_matrix(report.stats, "abs_max", layers)
    if step is None:
        step = int(s_peak[-1]) if len(s_peak) else (int(s_typ[-1]) if len(s_typ) else None)
    row_t = typ[s_typ == step][0] if step is not None and (s_typ == step).any() else np.full(len(layers), np.nan)
    row_p = peak[s_peak == step][0] if step is not None and (s_peak == step).any() else None
    label = "RMS |g|" if typical_stat == "rms" else "l2 norm"
    return gradient_flow(layers, row_t, row_p, flagged=_flagged(report), step=step, typical_label=label, ax=ax)


@register_plot("heatmap")
def plot_heatmap(report: Report, *, ax: Axes | None = None, stat: str = "l2_norm") -> Figure:
    """Layer x step heat map of ``log10(stat)`` (default the gradient norm)."""
    steps, layers, values = layer_matrix(report.stats, stat, _depth(report))
    return norm_heatmap(layers, steps, values, stat=stat, flagged=_flagged(report), ax=ax)


@register_plot("norms")
def plot_norms(report: Report, *, ax: Axes | None = None, stat: str = "l2_norm") -> Figure:
    """Per-layer curves of ``stat`` (default the gradient norm), with the whole model dashed."""
    steps, layers, values = layer_matrix(report.stats, stat, _depth(report))
    stats = report.stats
    whole = stats[(stats["layer"] == "*") & (stats["stat"] == stat)].set_index("step")["value"]
    model = whole.reindex(steps).to_numpy(dtype=np.float64) if len(whole) else None
    return norm_curves(layers, steps, values, stat=stat, model=model, ax=ax)


@register_plot("loss")
def plot_loss(report: Report, *, ax: Axes | None = None) -> Figure:
    """The loss, validation loss and other scalars passed to ``scope.step``."""
    sc = report.scalars
    return loss_curves(sc.index.to_numpy(), {c: sc[c].to_numpy() for c in sc.columns}, ax=ax)


def plot_report(report: Report, kind: str = "flow", *, ax: Axes | None = None, **kwargs: Any) -> Figure:
    """Draw one registered plot of ``report``; see :data:`PLOTS` for the kinds."""
    return PLOTS.get(kind)(report, ax=ax, **kwargs)


def save_plots(
    report: Report,
    directory: Union[str, os.PathLike[str]],
    *,
    kinds: Sequence[str] | None = None,
    fmt: str = "png",
    dpi: int = 100,
) -> list[Path]:
    """Save plots of ``report`` as ``<directory>/<kind>.<fmt>``.

    Args:
        report: the report.
        directory: created when missing.
        kinds: plot kinds (default every registered kind; ``"loss"`` only when scalars were passed).
        fmt: any format matplotlib writes (``png``, ``svg``, ``pdf``).
        dpi: resolution of raster formats.

    Returns:
        The paths written, in the order of ``kinds``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if kinds is None:
        kinds = [k for k in PLOTS.keys() if k != "loss" or len(report.scalars.columns)]
    paths = []
    for kind in kinds:
        fig = plot_report(report, kind)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
        path = out / f"{kind}.{fmt}"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
