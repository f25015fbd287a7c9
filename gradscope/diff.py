"""``gradscope diff RUN_A RUN_B``: what changed between two runs, layer by layer and finding by finding.

Each run is a JSON report (``report.to_json(path)``) or a TensorBoard run folder (``watch(log_dir=...)``),
read with the same reader as ``gradscope report``. The comparison has two parts:

* the **gradient profile**: for each layer, the median over the recorded steps of ``log10`` of its
  gradient norm (``l2_norm``; zero gradients count as ``-inf``, non-finite values are left out), in A
  and in B, and their ratio ``B / A`` as a factor; layers present in one run only are listed apart;
* the **findings**, matched by ``(kind, layer)``: new in B, gone from A, in both.

Exit code: 0 when B has no finding that A lacks, 1 when it has one, 2 when a run cannot be read.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradscope.findings import EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE, Finding, verdict

if TYPE_CHECKING:
    from gradscope.report import Report

__all__ = ["DEFAULT_STAT", "LayerChange", "RunDiff", "add_parser", "compare_runs", "gradient_profile", "run"]

#: The statistic the profile compares.
DEFAULT_STAT = "l2_norm"
#: A layer whose median norm moved by at least this many orders of magnitude is marked in the text.
MARK_DECADES = 1.0


@dataclass(frozen=True)
class LayerChange:
    """One layer's gradient profile in both runs.

    Attributes:
        layer: the module path.
        a: median ``log10`` of the statistic over A's steps (``-inf``: the gradient is mostly exactly zero;
            None: the layer is not in A, or has no finite value).
        b: the same for B.
    """

    layer: str
    a: float | None
    b: float | None

    @property
    def decades(self) -> float | None:
        """``b - a`` in orders of magnitude (None when either side is missing or both are zero)."""
        if self.a is None or self.b is None:
            return None
        d = self.b - self.a
        return None if math.isnan(d) else d

    @property
    def ratio(self) -> float | None:
        """``B / A`` as a factor (``10 ** decades``)."""
        d = self.decades
        return None if d is None else (math.inf if d == math.inf else 10.0**d)


@dataclass(frozen=True)
class RunDiff:
    """The comparison of run A with run B (see the module docstring).

    Attributes:
        a_name: how A is called in outputs (its path).
        b_name: the same for B.
        stat: the statistic compared.
        layers: the layers present in both runs, B's depth order (input side first).
        only_a: layers present in A only.
        only_b: layers present in B only.
        new: findings of B whose ``(kind, layer)`` A does not have.
        gone: findings of A whose ``(kind, layer)`` B does not have.
        both: findings of B whose ``(kind, layer)`` A has too.
        verdicts: ``(A's verdict, B's verdict)``: ``"healthy"``, ``"warnings"`` or ``"unhealthy"``.
        steps: ``(A's steps, B's steps)``.
    """

    a_name: str
    b_name: str
    stat: str
    layers: list[LayerChange]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    new: list[Finding] = field(default_factory=list)
    gone: list[Finding] = field(default_factory=list)
    both: list[Finding] = field(default_factory=list)
    verdicts: tuple[str, str] = ("healthy", "healthy")
    steps: tuple[int, int] = (0, 0)

    @property
    def exit_code(self) -> int:
        """0 when B has no new finding, else 1."""
        return EXIT_UNHEALTHY if self.new else EXIT_OK

    def __str__(self) -> str:
        return render_text(self)


def gradient_profile(report: Report, stat: str = DEFAULT_STAT) -> dict[str, float]:
    """Median over steps of ``log10(stat)`` for each layer of ``report`` (layer aggregates, ``param == "*"``).

    Zeros count as ``-inf`` (a layer whose gradient is zero at most steps has profile ``-inf``);
    NaN and Inf values are left out; a layer with no other value is absent.

    Returns:
        layer -> median log10, in the report's order of appearance.
    """
    import numpy as np

    stats = report.stats
    rows = stats[(stats["param"] == "*") & (stats["layer"] != "*") & (stats["stat"] == stat)]
    out: dict[str, float] = {}
    for layer, values in rows.groupby("layer", sort=False)["value"]:
        v = values.to_numpy(dtype=np.float64)
        v = v[np.isfinite(v) & (v >= 0)]
        if len(v):
            with np.errstate(divide="ignore"):
                out[str(layer)] = float(np.median(np.log10(v)))
    return out


def _depth_order(report: Report, layers: set[str]) -> list[str]:
    order = [layer for layer in report.meta.get("layers_by_depth") or [] if layer in layers]
    placed = set(order)
    return order + sorted(layers - placed)


def compare_runs(a: Report, b: Report, *, stat: str = DEFAULT_STAT, a_name: str = "A", b_name: str = "B") -> RunDiff:
    """Compare two reports: per-layer gradient profile and findings matched by ``(kind, layer)``.

    Args:
        a: the reference run (the one before the change).
        b: the run to judge.
        stat: the per-layer statistic of the profile (default the gradient norm).
        a_name: how A is called in the outputs.
        b_name: how B is called in the outputs.
    """
    pa, pb = gradient_profile(a, stat), gradient_profile(b, stat)
    common = set(pa) & set(pb)
    layers = [LayerChange(layer, pa[layer], pb[layer]) for layer in _depth_order(b, common)]
    keys_a = {(f.kind, f.layer) for f in a.findings}
    keys_b = {(f.kind, f.layer) for f in b.findings}
    return RunDiff(
        a_name=a_name,
        b_name=b_name,
        stat=stat,
        layers=layers,
        only_a=_depth_order(a, set(pa) - common),
        only_b=_depth_order(b, set(pb) - common),
        new=[f for f in b.findings if (f.kind, f.layer) not in keys_a],
        gone=[f for f in a.findings if (f.kind, f.layer) not in keys_b],
        both=[f for f in b.findings if (f.kind, f.layer) in keys_a],
        verdicts=(verdict(a.findings), verdict(b.findings)),
        steps=(a.steps, b.steps),
    )


# -- outputs -----------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    """``text`` without control characters (names and messages come from files; keep the terminal safe)."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _norm(log10: float | None) -> str:
    if log10 is None:
        return "-"
    if log10 == -math.inf:
        return "0"
    return f"{10.0**log10:.3g}" if -3 <= log10 < 4 else f"{10.0**log10:.2e}"


def _factor(change: LayerChange) -> str:
    r = change.ratio
    if r is None:
        return "-"
    if r == math.inf:
        return "inf"
    if r == 0:
        return "0"
    return f"{r:.3g}" if 1e-3 <= r < 1e4 else f"{r:.2e}"


def _layer_name(layer: str) -> str:
    return "(root)" if layer == "" else layer


def _finding_line(f: Finding) -> str:
    where = "(model)" if f.layer is None else _layer_name(f.layer)
    return _clean(f"{f.severity:<7}  {f.kind:<22}  {where}  (step {f.step})")


def render_text(diff: RunDiff) -> str:
    """The comparison as plain text (what ``gradscope diff`` prints)."""
    va, vb = diff.verdicts
    lines = [
        f"gradscope diff: A = {_clean(diff.a_name)} ({va.upper()}, {diff.steps[0]} steps)",
        f"                B = {_clean(diff.b_name)} ({vb.upper()}, {diff.steps[1]} steps)",
        "",
        f"gradient profile: median {diff.stat} per layer over the steps (geometric), B / A as a factor"
        + f" (<< or >>: {10**MARK_DECADES:g}x or more):",
    ]
    table = [["layer", "A", "B", "B/A", ""]]
    for c in diff.layers:
        d = c.decades
        mark = "" if d is None or abs(d) < MARK_DECADES else ("<<" if d < 0 else ">>")
        table.append([_clean(_layer_name(c.layer)), _norm(c.a), _norm(c.b), _factor(c), mark])
    if len(table) > 1:
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            cells = [r[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(r[1:4], widths[1:4])] + [r[4]]
            lines.append("  " + "  ".join(cells).rstrip())
    else:
        lines.append("  (no layer with gradient statistics in both runs)")
    if diff.only_a:
        lines.append(f"layers only in A ({len(diff.only_a)}): " + _clean(", ".join(map(_layer_name, diff.only_a))))
    if diff.only_b:
        lines.append(f"layers only in B ({len(diff.only_b)}): " + _clean(", ".join(map(_layer_name, diff.only_b))))
    for title, found in (
        ("findings new in B", diff.new),
        ("findings gone from A", diff.gone),
        ("findings in both", diff.both),
    ):
        lines.append("")
        lines.append(f"{title}: {len(found) if found else 'none'}")
        lines.extend(f"  {_finding_line(f)}" for f in found)
    lines.append("")
    lines.append(
        f"result: {len(diff.new)} new finding(s) in B (exit 1)" if diff.new else "result: no new finding in B (exit 0)"
    )
    return "\n".join(lines)


def _profile_png(diff: RunDiff) -> str | None:
    """A line per run of the per-layer median norm, by depth (log scale), as base64 PNG; None without layers."""
    if not diff.layers:
        return None
    import numpy as np

    from gradscope.views.plots import new_figure, plain, render_png

    fig = new_figure((min(20.0, max(6.0, 0.28 * len(diff.layers) + 2)), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(diff.layers))
    for name, values, style in (
        ("A", [c.a for c in diff.layers], "o-"),
        ("B", [c.b for c in diff.layers], "s--"),
    ):
        y = np.array([np.nan if v is None or v == -math.inf else 10.0**v for v in values])
        ax.plot(x, y, style, label=f"{name}: {plain(diff.a_name if name == 'A' else diff.b_name)}", ms=4)
    ax.set_yscale("log")
    ax.set_xticks(x, [plain(_layer_name(c.layer)) for c in diff.layers], rotation=90, fontsize=8)
    ax.set_ylabel(f"median {diff.stat}")
    ax.set_title("Gradient profile by layer (input side first)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png, _, _ = render_png(fig, dpi=90)
    return base64.b64encode(png).decode("ascii")


def render_html(diff: RunDiff) -> str:
    """The comparison as a self-contained HTML page (every value escaped, the plot an inline PNG)."""

    def e(x: Any) -> str:
        return html.escape(str(x), quote=True)

    rows = []
    for c in diff.layers:
        d = c.decades
        style = "" if d is None or abs(d) < MARK_DECADES else " style='background:#ffebe9'"
        rows.append(
            f"<tr{style}><td><code>{e(_layer_name(c.layer))}</code></td><td class='num'>{e(_norm(c.a))}</td>"
            f"<td class='num'>{e(_norm(c.b))}</td><td class='num'>{e(_factor(c))}</td></tr>"
        )
    profile = (
        "<table><tr><th>layer</th><th>A</th><th>B</th><th>B / A</th></tr>" + "".join(rows) + "</table>"
        if rows
        else "<p>No layer with gradient statistics in both runs.</p>"
    )
    only = "".join(
        f"<p>Layers only in {side}: {', '.join(f'<code>{e(_layer_name(x))}</code>' for x in names)}</p>"
        for side, names in (("A", diff.only_a), ("B", diff.only_b))
        if names
    )

    def table(found: list[Finding]) -> str:
        if not found:
            return "<p>None.</p>"
        body = "".join(
            f"<tr><td class='num'>{f.step}</td><td>{e(f.severity)}</td><td><code>{e(f.kind)}</code></td>"
            f"<td><code>{e('(model)' if f.layer is None else _layer_name(f.layer))}</code></td><td>{e(f.message)}</td></tr>"
            for f in found
        )
        return f"<table><tr><th>step</th><th>severity</th><th>kind</th><th>layer</th><th>what</th></tr>{body}</table>"

    png = _profile_png(diff)
    img = f"<img alt='gradient profile plot' src='data:image/png;base64,{png}'>" if png else ""
    colour = "#cf222e" if diff.new else "#1a7f37"
    verdict_line = f"{len(diff.new)} new finding(s) in B" if diff.new else "No new finding in B"
    css = (
        "body{font-family:system-ui,sans-serif;margin:24px;color:#1b1f24}table{border-collapse:collapse;font-size:13px}"
        "th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left}td.num{text-align:right}"
        "img{max-width:100%}code{font-size:12px}"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>gradscope diff</title>"
        f"<style>{css}</style></head><body>"
        f"<div style='background:{colour};color:#fff;padding:12px 16px;border-radius:6px'><b>{e(verdict_line)}</b>"
        f"<br>A: <code>{e(diff.a_name)}</code> ({e(diff.verdicts[0])}, {diff.steps[0]} steps) &middot; "
        f"B: <code>{e(diff.b_name)}</code> ({e(diff.verdicts[1])}, {diff.steps[1]} steps)</div>"
        f"<h2>Findings new in B</h2>{table(diff.new)}<h2>Findings gone from A</h2>{table(diff.gone)}"
        f"<h2>Findings in both</h2>{table(diff.both)}"
        f"<h2>Gradient profile</h2><p>Median {e(diff.stat)} of each layer over the recorded steps "
        f"(geometric); rows that moved by {10**MARK_DECADES:g}x or more are shaded.</p>{img}{profile}{only}"
        "</body></html>\n"
    )


# -- command -----------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``diff`` subcommand to the ``gradscope`` command."""
    p = subparsers.add_parser(
        "diff",
        help="compare two runs (JSON reports or TensorBoard run folders): gradient profile and findings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_a", metavar="RUN_A", help="the reference run: a JSON report or a TensorBoard run folder")
    p.add_argument("run_b", metavar="RUN_B", help="the run to judge against it")
    p.add_argument("--html", metavar="PATH", help="also write the comparison as a self-contained HTML page")
    p.add_argument("--stat", default=DEFAULT_STAT, help=f"per-layer statistic to compare (default {DEFAULT_STAT})")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the text comparison")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Read both runs, print (and write) the comparison; return the exit code."""
    from gradscope._io import atomic_write_text
    from gradscope.sinks.reader import read_report

    reports = []
    for source in (args.run_a, args.run_b):
        try:
            reports.append(read_report(Path(source), progress=False))
        except (ValueError, OSError) as exc:  # RunReadError and malformed JSON are ValueErrors
            print(
                f"gradscope diff: error: cannot read {_clean(repr(str(source)))}: {_clean(str(exc))}", file=sys.stderr
            )
            return EXIT_USAGE
    known = {s for r in reports for s in r.stats.loc[r.stats["param"] == "*", "stat"]}
    if args.stat not in known:
        print(
            f"gradscope diff: error: --stat {_clean(repr(args.stat))} is in neither run; "
            f"recorded: {', '.join(sorted(known)) or 'none'}.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    diff = compare_runs(*reports, stat=args.stat, a_name=str(args.run_a), b_name=str(args.run_b))
    if not args.quiet:
        print(render_text(diff))
    if args.html:
        try:
            atomic_write_text(args.html, render_html(diff))
        except OSError as exc:
            print(f"gradscope diff: error: cannot write --html {_clean(repr(args.html))}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return diff.exit_code
