"""Matplotlib figures of a run: gradient flow by depth, a layer x step heat map, norm curves, loss.

Two layers:

* drawing functions (:func:`gradient_flow`, :func:`norm_heatmap`, :func:`norm_curves`,
  :func:`loss_curves`) take plain arrays, draw into ``ax`` when given (else a new figure) and return
  the figure. The TensorBoard sink calls them with arrays from the live frame;
* report plots, registered by kind with :func:`register_plot` (``"flow"``, ``"heatmap"``,
  ``"norms"``, ``"loss"``), read the layer aggregates of ``report.stats`` (through
  :func:`gradscope.views.tables.aggregates`: from the run's frame when the report has one, without
  building the long table) and ``report.scalars``, so they work on a report read back from JSON or
  TensorBoard as well. ``Report.plot(kind)`` and ``Report.save_plots(dir)``
  use them.

Figures are built with ``matplotlib.figure.Figure`` and rendered with the Agg canvas; pyplot is never
imported, so no global backend is chosen and no figure is left open in pyplot's registry. A fresh
Jupyter kernel only teaches IPython to draw figures once pyplot is imported (the inline backend
registers its PNG formatter on import), so the figures made here carry their own ``_repr_png_``:
``report.plot("flow")`` as the last line of a cell shows the picture either way, once.

Labels are plain text: layer names are escaped for mathtext (a module named ``$x$`` shows as such).
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
from gradscope.errors import ConfigurationError
from gradscope.views.tables import aggregates

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
_FIGURE_CLASS: type | None = None


def _figure_class() -> type:
    """``matplotlib.figure.Figure`` plus ``_repr_png_``, built on first use (matplotlib loads lazily)."""
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        try:
            from matplotlib.figure import Figure
        except ModuleNotFoundError as exc:  # pragma: no cover - matplotlib is a dependency
            raise ModuleNotFoundError("gradscope's plots need matplotlib: pip install matplotlib") from exc

        class ReportFigure(Figure):
            """A matplotlib figure that displays itself in notebooks without pyplot."""

            def _repr_png_(self) -> bytes:
                return render_png(self)[0]

        ReportFigure.__module__ = __name__
        ReportFigure.__qualname__ = "ReportFigure"
        _FIGURE_CLASS = ReportFigure
    return _FIGURE_CLASS


def __getattr__(name: str) -> Any:
    # `ReportFigure` is built lazily (importing matplotlib costs time); this makes it importable and picklable.
    if name == "ReportFigure":
        return _figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def new_figure(figsize: tuple[float, float], **kwargs: Any) -> Figure:
    """A new constrained-layout figure that displays in notebooks (``_repr_png_``) without pyplot."""
    fig: Figure = _figure_class()(figsize=figsize, layout="constrained", **kwargs)
    return fig


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]  # typed Figure | SubFigure; the caller draws on it alike
    fig = new_figure(figsize)
    return fig, fig.add_subplot()


def render_png(fig: Figure, *, dpi: int = 100) -> tuple[bytes, int, int]:
    """Render a figure to PNG with the Agg canvas: ``(png bytes, height, width)`` in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself to the figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    w, h = (round(v * dpi) for v in fig.get_size_inches())
    return buf.getvalue(), h, w


def plain(text: str) -> str:
    """``text`` as matplotlib shows it literally: ``$`` escaped so that mathtext never parses a name."""
    return text.replace("$", r"\$")


def _label(layer: str) -> str:
    return "(root)" if layer == "" else ("(model)" if layer == "*" else plain(layer))


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


#: Above this many layers the flow plot draws lines, not bars, and counts the unplottable layers.
_MAX_BARS = 400


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
    typical = np.asarray(typical, dtype=np.float64).reshape(n)
    if n <= _MAX_BARS:
        if peak is not None:
            ax.bar(x, _positive(peak), width=0.8, color="#9ecae1", label=peak_label)
        ax.bar(x, _positive(typical), width=0.5, color="#08519c", label=typical_label)
    else:  # thousands of layers: one line collection per series (a bar is one patch to lay out and draw)
        series = [(_positive(typical), "#08519c", typical_label)]
        if peak is not None:
            series.insert(0, (_positive(peak), "#9ecae1", peak_label))
        drawn = np.concatenate([v for v, _, _ in series])
        floor = np.nanmin(drawn) / 2 if np.isfinite(drawn).any() else 1e-8
        for v, colour, label in series:
            ax.vlines(x, floor, v, color=colour, linewidth=max(0.3, 600.0 / n), label=label)
    ax.set_yscale("log")
    if not np.isfinite(_positive(typical)).any() and (peak is None or not np.isfinite(_positive(peak)).any()):
        ax.set_ylim(1e-8, 1.0)  # nothing positive to scale to: keep a sensible log axis for the labels below
    ax.set_xlim(-0.6, n - 0.4)
    _mark_unplottable(ax, x, typical)
    flagged_set = set(flagged)
    _tick_layers(ax, layers, "x", flagged_set)
    ax.set_xlabel("layer (input side first)")
    ax.set_ylabel("gradient magnitude")
    ax.set_title("Gradient flow" + (f" at step {step}" if step is not None else ""))
    ax.grid(axis="y", which="major", alpha=0.3)
    if n:
        ax.legend(loc="best" if n <= _MAX_BARS else "upper right", fontsize=8)  # "best" scans every artist
    return fig


def _mark_unplottable(ax: Axes, x: np.ndarray, typical: np.ndarray) -> None:
    """Label the layers a log axis cannot draw: a zero gradient gets a stub bar and "0", non-finite "nan"/"inf".

    A missing bar reads as "no data"; a layer whose gradient is exactly zero is the most important one
    to see, so it gets a hatched stub at the bottom of the axis and its value written above it.
    """
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    where = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes fraction
    odd = ~(np.isfinite(typical) & (typical != 0))
    if odd.sum() > _MAX_BARS // 4:  # too many to label one by one: say how many, mark where
        ax.vlines(x[odd], 0.0, 0.04, transform=where, color="#57606a", linewidth=0.5)
        ax.text(
            0.01,
            0.05,
            f"{int(odd.sum())} layers zero or non-finite (marked below)",
            transform=ax.transAxes,
            fontsize=8,
            color=_FLAG,
        )
        return
    for xi, v in zip(x, typical):
        if v == 0:
            text, colour = "0", _FLAG
        elif np.isnan(v):
            text, colour = "nan", "#57606a"
        elif np.isinf(v):
            text, colour = "inf" if v > 0 else "-inf", _FLAG
        else:
            continue
        if v == 0:
            stub = Rectangle((xi - 0.25, 0.0), 0.5, 0.04, transform=where, fill=False, edgecolor=_FLAG, hatch="///")
            ax.add_patch(stub)
        ax.text(xi, 0.05, text, transform=where, ha="center", va="bottom", fontsize=8, color=colour)


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
    if n <= _MAX_BARS:
        for j, layer in enumerate(layers):
            ax.plot(steps, _positive(values[:, j]), color=cmap(j / max(1, n - 1)), lw=1.0, label=_label(layer))
    else:  # thousands of layers: one collection (a Line2D each costs milliseconds to build and draw)
        from matplotlib.collections import LineCollection

        x = np.broadcast_to(np.asarray(steps, dtype=np.float64)[:, None], values.shape)
        segments = np.stack([x, _positive(values)], axis=-1).transpose(1, 0, 2)  # [L, S, 2]
        ax.add_collection(LineCollection(list(segments), colors=cmap(np.linspace(0, 1, n)), linewidths=1.0))
        ax.autoscale_view()
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


def _is_loss(name: str) -> bool:
    return "loss" in name.lower()


def loss_curves(steps: np.ndarray, series: Mapping[str, np.ndarray], *, ax: Axes | None = None) -> Figure:
    """The scalars passed to ``scope.step`` (loss, val_loss, ...) over steps.

    Losses (names containing ``loss``) share one axis; any other scalar (``lr``, an accuracy...) lives on
    its own scale: a second panel below, or a right-hand axis when ``ax`` is given, so a learning rate
    of 1e-3 is never drawn flat against a loss of 2.

    Args:
        steps: ``[S]`` step numbers.
        series: name -> ``[S]`` values (NaN where not passed).
        ax: axes to draw into; default a new figure.

    Returns:
        The figure.
    """
    losses = {k: v for k, v in series.items() if _is_loss(k)}
    others = {k: v for k, v in series.items() if not _is_loss(k)}
    if not losses:  # nothing to separate from
        losses, others = dict(series), {}
    panel = ax is None and bool(others)
    if panel:
        fig = new_figure((8.0, 5.2))
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    else:
        fig, ax = _axes(ax, (8.0, 3.8))
        ax2 = ax.twinx() if others else None
    steps = np.asarray(steps)
    _draw_scalars(ax, steps, losses, 0)
    ax.set_title("scalars passed to scope.step()")
    ax.grid(alpha=0.3)
    if ax2 is None:
        ax.set_xlabel("step")
        if series:
            ax.legend(fontsize=8)
        return fig
    _draw_scalars(ax2, steps, others, len(losses))
    ax.set_ylabel("loss")
    ax2.set_ylabel(", ".join(plain(k) for k in others))
    if panel:  # a panel below
        ax2.set_xlabel("step")
        ax2.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax2.legend(fontsize=8)
    else:  # a right-hand axis on the caller's axes: one legend for both
        ax.set_xlabel("step")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8)
    return fig


def _draw_scalars(ax: Axes, steps: np.ndarray, series: Mapping[str, np.ndarray], colour0: int) -> None:
    for i, (name, vals) in enumerate(series.items()):
        v = np.asarray(vals, dtype=np.float64)
        ok = np.nonzero(np.isfinite(v))[0]
        ok = ok[_thin(len(ok), _MAX_POINTS)]
        marker = "o" if len(ok) < 30 else None
        ax.plot(steps[ok], v[ok], lw=1.2, marker=marker, ms=3, label=plain(name), color=f"C{colour0 + i}")


# -- report plots ------------------------------------------------------------------------------------
def _flagged(report: Report) -> list[str]:
    return [f.layer for f in report.findings if f.layer]


def _check_stat(report: Report, stat: Any, kind: str) -> None:
    known = aggregates(report).statistics()
    if not isinstance(stat, str) or stat not in known:
        raise ConfigurationError(
            f"Expected `stat` of report.plot({kind!r}) to be a statistic this run recorded per layer "
            f"({', '.join(known) or 'none recorded'}), but got {stat!r}."
        )


@register_plot("flow")
def plot_flow(report: Report, *, ax: Axes | None = None, step: int | None = None) -> Figure:
    """Gradient flow at ``step`` (default: the last step where ``abs_max`` was taken, else the last)."""
    rows = aggregates(report)
    layers = rows.gradient_layers(report.meta.get("layers_by_depth"))
    typical_stat = "rms" if "rms" in rows.statistics() else "l2_norm"
    s_typ, layers, typ = rows.matrix(typical_stat, layers)
    s_peak, _, peak = rows.matrix("abs_max", layers)
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not (s_typ == step).any():
            span = f"{int(s_typ[0])}..{int(s_typ[-1])}" if len(s_typ) else "none"
            raise ConfigurationError(
                f"Expected `step` of report.plot('flow') to be a step with {typical_stat} recorded (steps {span}), "
                f"but got {step!r}. Leave it out for the last sampled step."
            )
        step = int(step)
    else:
        step = int(s_peak[-1]) if len(s_peak) else (int(s_typ[-1]) if len(s_typ) else None)
    row_t = typ[s_typ == step][0] if step is not None and (s_typ == step).any() else np.full(len(layers), np.nan)
    row_p = peak[s_peak == step][0] if step is not None and (s_peak == step).any() else None
    label = "RMS |g|" if typical_stat == "rms" else "l2 norm"
    return gradient_flow(layers, row_t, row_p, flagged=_flagged(report), step=step, typical_label=label, ax=ax)


@register_plot("heatmap")
def plot_heatmap(report: Report, *, ax: Axes | None = None, stat: str = "l2_norm") -> Figure:
    """Layer x step heat map of ``log10(stat)`` (default the gradient norm)."""
    _check_stat(report, stat, "heatmap")
    rows = aggregates(report)
    steps, layers, values = rows.matrix(stat, rows.order(report.meta.get("layers_by_depth")))
    return norm_heatmap(layers, steps, values, stat=stat, flagged=_flagged(report), ax=ax)


@register_plot("norms")
def plot_norms(report: Report, *, ax: Axes | None = None, stat: str = "l2_norm") -> Figure:
    """Per-layer curves of ``stat`` (default the gradient norm), with the whole model dashed."""
    _check_stat(report, stat, "norms")
    rows = aggregates(report)
    steps, layers, values = rows.matrix(stat, rows.order(report.meta.get("layers_by_depth")))
    return norm_curves(layers, steps, values, stat=stat, model=rows.model(stat, steps), ax=ax)


@register_plot("loss")
def plot_loss(report: Report, *, ax: Axes | None = None) -> Figure:
    """The loss, validation loss and other scalars passed to ``scope.step`` (non-loss scalars on their own axis)."""
    sc = report.scalars
    return loss_curves(sc.index.to_numpy(), {c: sc[c].to_numpy() for c in sc.columns}, ax=ax)


def plot_report(report: Report, kind: str = "flow", *, ax: Axes | None = None, **kwargs: Any) -> Figure:
    """Draw one registered plot of ``report``; see :data:`PLOTS` for the kinds.

    Raises:
        RegistryError: ``kind`` is not registered (the message lists the kinds).
        ConfigurationError: ``kwargs`` holds an option the kind does not take, or a bad value for one.
    """
    import inspect

    fn = PLOTS.get(kind)
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options = [name for name, p in params.items() if p.kind is p.KEYWORD_ONLY and name != "ax"]
        unknown = [k for k in kwargs if k not in options]
        if unknown:
            raise ConfigurationError(
                f"report.plot({kind!r}) takes the options {', '.join(options) or '(none)'}, "
                f"but got {', '.join(map(repr, unknown))}."
            )
    return fn(report, ax=ax, **kwargs)


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
        kinds: a list of plot kinds such as ``["flow", "loss"]`` (default every registered kind;
            ``"loss"`` only when scalars were passed).
        fmt: any format matplotlib writes (``png``, ``svg``, ``pdf``).
        dpi: resolution of raster formats, a positive int.

    Returns:
        The paths written, in the order of ``kinds``.

    Raises:
        ConfigurationError: ``kinds``, ``fmt`` or ``dpi`` is invalid (checked before anything is written).
        RegistryError: a kind is not registered.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if kinds is None:
        kinds = [k for k in PLOTS.keys() if k != "loss" or len(report.scalars.columns)]
    elif isinstance(kinds, (str, bytes)):
        raise ConfigurationError(
            f"Expected `kinds` of save_plots to be a list of plot kinds, but got the string {kinds!r}; "
            f"pass kinds=[{kinds!r}]."
        )
    else:
        try:
            kinds = list(kinds)
        except TypeError:
            raise ConfigurationError(
                f"Expected `kinds` of save_plots to be a list of plot kinds such as ['flow'], but got {kinds!r}."
            ) from None
    for kind in kinds:
        PLOTS.get(kind)  # an unknown kind fails here, listing the kinds, before any file is written
    formats = FigureCanvasAgg.get_supported_filetypes()
    if not isinstance(fmt, str) or fmt.lower() not in formats:
        raise ConfigurationError(
            f"Expected `fmt` of save_plots to be one of {', '.join(sorted(formats))}, but got {fmt!r}."
        )
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise ConfigurationError(f"Expected `dpi` of save_plots to be a positive number, but got {dpi!r}.")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in kinds:
        fig = plot_report(report, kind)
        FigureCanvasAgg(fig)
        path = out / f"{kind}.{fmt}"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
