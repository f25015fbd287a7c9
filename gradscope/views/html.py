"""A self-contained HTML summary of a run: what someone opens after a run failed overnight.

One file, no server, no network: the styles are inline and the plots are PNGs embedded as base64.
Sections: the verdict, the findings (with their evidence), the plots (gradient flow, heat map,
norm curves, loss), the worst layers, the run's facts, and the text report.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from gradscope._io import atomic_write_text
from gradscope._version import __version__
from gradscope.findings import Finding, count_errors, verdict
from gradscope.findings import _findings_html as _notebook_findings_html
from gradscope.views.tables import aggregates

if TYPE_CHECKING:
    import pandas as pd

    from gradscope.views.source import ReportData as Report

__all__ = ["render_html", "render_notebook_html", "worst_layers", "write_html"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;background:#f6f8fa}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.verdict{padding:16px 20px;border-radius:8px;color:#fff;margin-bottom:16px}
.healthy{background:#1a7f37}.warnings{background:#9a6700}.unhealthy{background:#cf222e}
.verdict p{margin:4px 0 0;opacity:.95}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #d0d7de;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eaeef2} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.sev-error{color:#cf222e;font-weight:600}.sev-warning{color:#9a6700;font-weight:600}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
details{margin-top:4px} summary{cursor:pointer;color:#57606a}
figure{margin:0 0 18px;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto} figcaption{font-size:12px;color:#57606a;margin-top:4px}
pre{background:#fff;border:1px solid #d0d7de;padding:12px;overflow:auto;font-size:12px}
.muted{color:#57606a;font-size:12px}
"""

_CAPTIONS = {
    "flow": "Gradient flow: RMS (dark) and largest (light) |gradient| of each layer, input side first, log scale. "
    "Red labels: layers named in a finding.",
    "heatmap": "log10 of each layer's gradient norm at every recorded step (input side on top). "
    "Bands that fade to the bottom or top of the scale are vanishing or exploding layers.",
    "norms": "Gradient norm of each layer over steps, coloured by depth; dashed: the whole model.",
    "loss": "The scalars passed to scope.step(): losses on the top axis, any other scalar (lr...) on its own axis below.",
}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    if math.isnan(f):
        return "-"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f == 0:
        return "0"
    if abs(f) >= 1e4 or abs(f) < 1e-3:
        return f"{f:.3e}"
    return f"{f:.4g}"


def _png(report: Report, kind: str) -> str | None:
    from gradscope.views.plots import plot_report, render_png

    try:
        fig = plot_report(report, kind)
    except Exception:  # a plot that cannot be drawn (no data) is left out, never fatal
        return None
    png, _, _ = render_png(fig, dpi=90)
    return base64.b64encode(png).decode("ascii")


def worst_layers(report: Report, limit: int = 12) -> pd.DataFrame:
    """The layers to look at first: those named in findings, then the most extreme gradient norms.

    Extreme = farthest, in orders of magnitude, from the median layer's median gradient norm; a
    layer with non-finite gradients comes first among the unflagged ones.

    Returns:
        :func:`~gradscope.views.tables.layer_summary` rows (at most ``limit``), with a ``findings``
        column naming the finding kinds of each layer.
    """
    from gradscope.views.tables import layer_summary

    summary = layer_summary(report)
    summary = summary.drop(index=[i for i in summary.index if i == "*"])
    if summary.empty:
        return summary
    kinds: dict[str, list[str]] = {}
    for f in report.findings:
        if f.layer is not None:
            kinds.setdefault(f.layer, []).append(f.kind)
    score = np.zeros(len(summary))
    if ("l2_norm", "median") in summary.columns:
        med = summary[("l2_norm", "median")].to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            logm = np.log10(np.where(med > 0, med, np.nan))
        centre = np.nanmedian(logm) if np.isfinite(logm).any() else 0.0
        score = np.nan_to_num(np.abs(logm - centre), nan=0.0)
    if ("nonfinite_count", "max") in summary.columns:
        bad = np.nan_to_num(summary[("nonfinite_count", "max")].to_numpy(dtype=np.float64)) > 0
        score = score + 100.0 * bad
    flagged = np.array([layer in kinds for layer in summary.index])
    order = np.lexsort((-score, ~flagged))  # flagged first, then by score
    picked = summary.iloc[order[:limit]].copy()
    picked.insert(0, ("findings", ""), [", ".join(dict.fromkeys(kinds.get(layer, []))) for layer in picked.index])
    return picked


_WORST_COLUMNS = [
    ("l2_norm", "last"),
    ("l2_norm", "min"),
    ("l2_norm", "max"),
    ("l2_norm", "median"),
    ("abs_max", "max"),
    ("zero_fraction", "last"),
    ("update_ratio", "median"),
    ("nonfinite_count", "max"),
]


def _status_html(f: Finding) -> str:
    """How final a finding is, under its step: provisional, resolved at step N (``Finding.status_note``)."""
    note = f.status_note().strip()
    return f"<br><span class='muted'>{_e(note.strip('()'))}</span>" if note else ""


def _findings_html(report: Report) -> str:
    if not report.findings:
        return "<p>No findings: every rule passed.</p>"
    rows = []
    for f in report.findings:
        layer = "(model)" if f.layer is None else (f.layer or "(root)")
        evidence = json.dumps(f.to_dict()["evidence"], indent=1, allow_nan=False)
        rows.append(
            "<tr>"
            f"<td class='num'>{f.step}{_status_html(f)}</td><td class='sev-{_e(f.severity)}'>{_e(f.severity)}</td>"
            f"<td><code>{_e(f.kind)}</code></td><td><code>{_e(layer)}</code></td>"
            f"<td>{_e(f.message)}<details><summary>evidence</summary><pre>{_e(evidence)}</pre></details></td>"
            f"<td>{_e(f.suggestion)}</td>"
            "</tr>"
        )
    head = "<tr><th>step</th><th>severity</th><th>kind</th><th>layer</th><th>what</th><th>try</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _worst_html(report: Report) -> str:
    try:
        worst = worst_layers(report)
    except ValueError:
        return "<p>No statistics.</p>"
    if worst.empty:
        return "<p>No per-layer statistics.</p>"
    cols = [c for c in _WORST_COLUMNS if c in worst.columns]
    head = "<tr><th>layer</th><th>findings</th>" + "".join(f"<th>{_e(s)}<br>{_e(a)}</th>" for s, a in cols) + "</tr>"
    body = []
    for layer, row in worst.iterrows():
        name = "(root)" if layer == "" else layer
        cells = "".join(f"<td class='num'>{_num(row[c])}</td>" for c in cols)
        body.append(f"<tr><td><code>{_e(name)}</code></td><td>{_e(row[('findings', '')])}</td>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _facts_html(report: Report) -> str:
    meta = dict(report.meta)
    meta.pop("layers_by_depth", None)
    items = [(k, v) for k, v in meta.items() if not isinstance(v, (dict, list)) or k in ("stats", "rules")]
    items.append(("skipped optimizer steps", ", ".join(map(str, report.skipped_steps)) or "none"))
    items.append(("frozen parameters", len(report.frozen)))
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(', '.join(map(str, v)) if isinstance(v, list) else v)}</td></tr>"
        for k, v in items
    )
    errors = "".join(f"<li>{_e(e)}</li>" for e in report.errors)
    return f"<table>{rows}</table>" + (f"<p><b>Monitoring problems</b></p><ul>{errors}</ul>" if errors else "")


def render_html(report: Report, *, title: str | None = None, source: str | None = None) -> str:
    """The HTML page of ``report`` as a string (self-contained: no external resources).

    Args:
        report: the report (live, or read back with ``Report.from_json`` or from TensorBoard).
        title: page title; default from the model name.
        source: where the report was read from, shown under the verdict.
    """
    from gradscope.views.plots import PLOTS

    word = verdict(report.findings)
    n_err = count_errors(report.findings)
    n_warn = len(report.findings) - n_err
    model = report.meta.get("model", "model")
    title = title or f"gradscope report: {model}"
    try:
        has_stats = not aggregates(report).empty
    except ValueError:
        has_stats = False
    figures = []
    kinds = [k for k in PLOTS.keys() if k != "loss" or len(report.scalars.columns)] if has_stats else []
    if not has_stats and len(report.scalars.columns):
        kinds = ["loss"]
    for kind in kinds:
        data = _png(report, kind)
        if data is not None:
            caption = _CAPTIONS.get(kind, kind)
            figures.append(
                f"<figure><img alt='{_e(kind)} plot' src='data:image/png;base64,{data}'>"
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    src = f" &middot; source <code>{_e(source)}</code>" if source else ""
    body = f"""
<main>
<div class="verdict {word}">
<h1>{_e(word.upper())}: {_e(model)}</h1>
<p>{report.steps} steps &middot; {n_err} error(s) &middot; {n_warn} warning(s){src}</p>
</div>
<h2>Findings</h2>
{_findings_html(report)}
<h2>Plots</h2>
{"".join(figures) or "<p>No statistics to plot.</p>"}
<h2>Worst layers</h2>
<p class="muted">Layers named in findings first, then the gradient norms farthest from the typical layer's.</p>
{_worst_html(report)}
<h2>Run</h2>
{_facts_html(report)}
<h2>Text report</h2>
<pre>{_e(str(report))}</pre>
<p class="muted">Written by gradscope {_e(__version__)} on {_e(when)}.</p>
</main>"""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


_VERDICT_COLOURS = {"healthy": "#1a7f37", "warnings": "#9a6700", "unhealthy": "#cf222e"}


def render_notebook_html(report: Report, *, max_findings: int = 50) -> str:
    """A compact HTML fragment for notebooks (``Report._repr_html_``): verdict, findings, gradient flow.

    Every value from the report is escaped; the plot is an inline PNG, so the fragment needs nothing
    else (no scripts, no external files) and survives saving the notebook.

    Args:
        report: the report.
        max_findings: rows of the findings table; the rest are counted.
    """
    word = verdict(report.findings)
    n_err = count_errors(report.findings)
    n_warn = len(report.findings) - n_err
    model = report.meta.get("model", "model")
    parts = [
        f"<div class='gradscope-report' style='font-family:system-ui,sans-serif'>"
        f"<div style='background:{_VERDICT_COLOURS[word]};color:#fff;padding:8px 12px;border-radius:6px'>"
        f"<b>{_e(word.upper())}</b>: {_e(model)} &middot; {report.steps} steps &middot; "
        f"{n_err} error(s) &middot; {n_warn} warning(s)</div>"
    ]
    if report.skipped_steps:
        parts.append(f"<p>Skipped optimizer steps (not judged): {len(report.skipped_steps)}</p>")
    shown = list(report.findings)[:max_findings]
    parts.append(_notebook_findings_html(shown) if report.findings else "<p>No findings: every rule passed.</p>")
    if len(report.findings) > len(shown):
        parts.append(f"<p>... and {len(report.findings) - len(shown)} more (<code>report.findings</code>).</p>")
    try:
        has_grads = not aggregates(report).empty
    except ValueError:
        has_grads = False
    data = _png(report, "flow") if has_grads else None
    if data is not None:
        parts.append(
            f"<img alt='gradient flow plot' style='max-width:100%' src='data:image/png;base64,{data}'>"
            f"<p style='font-size:12px;color:#57606a'>{_e(_CAPTIONS['flow'])} "
            "More: <code>report.plot(kind)</code>, <code>print(report)</code>.</p>"
        )
    for e in report.errors:
        parts.append(f"<p>Monitoring problem: {_e(e)}</p>")
    parts.append("</div>")
    return "".join(parts)


def write_html(
    report: Report,
    path: Union[str, os.PathLike[str]],
    *,
    title: str | None = None,
    source: str | None = None,
) -> Path:
    """Write :func:`render_html` to ``path`` (atomically; folders are created). Returns the path."""
    return atomic_write_text(path, render_html(report, title=title, source=source))
