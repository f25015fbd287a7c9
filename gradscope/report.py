"""What a run found: the findings, the statistics table, and the ways to read them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from gradscope._io import atomic_write_text
from gradscope._version import __version__
from gradscope.errors import GradientHealthError
from gradscope.findings import SEVERITIES, Finding, at_or_above, count_errors, from_jsonable, jsonable, verdict

if TYPE_CHECKING:
    import os

    import pandas as pd

    from gradscope.stats.frame import StatsFrame

__all__ = ["JSON_SCHEMA", "JSON_SCHEMA_VERSION", "SEVERITIES", "Finding", "Report"]

JSON_SCHEMA = "gradscope.report"
JSON_SCHEMA_VERSION = 1


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


class Report:
    """The findings and statistics of a watched run; valid while the run goes on and after it ends.

    Attributes:
        findings: findings ordered by step.
        skipped_steps: steps whose optimizer step did not happen (GradScaler found inf); their gradients
            are not judged and their rows are left out of :attr:`stats`.
        frozen: parameters with ``requires_grad=False`` (listed, never flagged).
        meta: model and run facts (class name, parameter count, device, steps, every).
        errors: problems monitoring had (a rule or sink that failed) without stopping training.
    """

    def __init__(
        self,
        *,
        findings: list[Finding],
        frame: StatsFrame | None = None,
        stats: pd.DataFrame | None = None,
        scalars: pd.DataFrame | None = None,
        skipped_steps: list[int] | None = None,
        frozen: list[str] | None = None,
        meta: dict[str, Any] | None = None,
        errors: list[str] | None = None,
    ) -> None:
        self.findings = sorted(findings, key=lambda f: f.step)
        self._frame = frame
        self._stats = stats
        self._scalars = scalars
        self.skipped_steps = list(skipped_steps or [])
        self.frozen = list(frozen or [])
        self.meta = dict(meta or {})
        self.errors = list(errors or [])

    # -- verdict ---------------------------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """False if any finding has severity ``"error"``."""
        return count_errors(self.findings) == 0

    def raise_for_status(self, fail_on: str = "error") -> None:
        """Raise :class:`GradientHealthError` listing the findings at or above ``fail_on``.

        Args:
            fail_on: ``"error"`` (default: like :attr:`ok`) or ``"warning"`` (any finding fails).
        """
        if fail_on not in SEVERITIES:
            raise ValueError(f"Expected `fail_on` to be one of {SEVERITIES}, but got {fail_on!r}.")
        failing = at_or_above(self.findings, fail_on)
        if failing:
            raise GradientHealthError(str(self), report=self)

    # -- tables ----------------------------------------------------------------------------------------
    @property
    def stats(self) -> pd.DataFrame:
        """Long-format statistics: columns ``step, layer, param, stat, value``.

        ``param == "*"`` rows aggregate a layer, ``layer == "*"`` rows the whole model.
        """
        if self._stats is None:
            if self._frame is None:
                import pandas as pd

                return pd.DataFrame(
                    {
                        "step": pd.Series(dtype="int64"),
                        "layer": pd.Series(dtype=object),
                        "param": pd.Series(dtype=object),
                        "stat": pd.Series(dtype=object),
                        "value": pd.Series(dtype="float64"),
                    }
                )
            self._stats = self._frame.to_dataframe()
        return self._stats

    @property
    def scalars(self) -> pd.DataFrame:
        """The scalars passed to ``scope.step`` (loss, val_loss, ...), one column each, indexed by step."""
        if self._scalars is None:
            if self._frame is None:
                import pandas as pd

                return pd.DataFrame(index=pd.Index([], name="step"))
            self._scalars = self._frame.scalars_dataframe()
        return self._scalars

    @property
    def steps(self) -> int:
        """The number of ``scope.step()`` calls seen."""
        return int(self.meta.get("steps", 0))

    def _layer_table(self, limit: int = 12) -> list[list[str]]:
        df = self.stats
        if df.empty:
            return []
        lay = df[(df["param"] == "*") & (df["layer"] != "*")]
        if lay.empty:
            return []
        wanted = ["l2_norm", "abs_max", "zero_fraction", "nonfinite_count", "update_ratio"]
        present = [s for s in wanted if s in set(lay["stat"])]
        # the latest value of each statistic (sampled statistics are not taken at every step)
        latest = lay[lay["stat"].isin(present)].sort_values("step", kind="stable").groupby(["layer", "stat"]).tail(1)
        last = latest.pivot_table(index="layer", columns="stat", values="value", aggfunc="first")
        flagged = [f.layer for f in self.findings if f.layer]
        order = list(self.meta.get("layers_by_depth") or last.index)
        rows_layers = [layer for layer in order if layer in last.index]
        if len(rows_layers) > limit:
            keep = [layer for layer in rows_layers if layer in flagged]
            if "l2_norm" in last.columns:
                by_norm = last["l2_norm"].dropna().sort_values()
                for layer in list(by_norm.index[:3]) + list(by_norm.index[-3:]):
                    if layer not in keep:
                        keep.append(layer)
            rows_layers = [layer for layer in rows_layers if layer in keep][:limit]
        table = [["layer", *present]]
        for layer in rows_layers:
            mark = " !" if layer in flagged else ""
            table.append(
                [
                    f"{layer or '(root)'}{mark}",
                    *[_fmt(last.at[layer, s]) if s in last.columns else "-" for s in present],
                ]
            )
        return table

    def __str__(self) -> str:
        lines: list[str] = []
        n_err = count_errors(self.findings)
        n_warn = len(self.findings) - n_err
        word = verdict(self.findings).upper()
        model = self.meta.get("model", "model")
        lines.append(f"gradscope report: {word} - {model}, {self.steps} steps, {n_err} error(s), {n_warn} warning(s)")
        if self.skipped_steps:
            shown = ", ".join(map(str, self.skipped_steps[:8])) + (" ..." if len(self.skipped_steps) > 8 else "")
            lines.append(f"skipped optimizer steps (not judged): {shown}")
        if self.frozen:
            lines.append(f"frozen parameters (not monitored): {len(self.frozen)}")
        if self.findings:
            lines.append("")
            lines.append("findings:")
            for f in self.findings:
                where = f.layer if f.layer is not None else "(model)"
                lines.append(f"  step {f.step:>6}  {f.severity:<7}  {f.kind:<22}  {where}{f.status_note()}")
                lines.append(f"      {f.message}")
                lines.append(f"      try: {f.suggestion}")
        table = self._layer_table()
        if table:
            step = int(self.stats["step"].max())
            lines.append("")
            lines.append(f"layers, latest values up to step {step} (! = named in a finding):")
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            for r in table:
                lines.append(
                    "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                )
        for e in self.errors:
            lines.append(f"monitoring problem: {e}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Report(ok={self.ok}, findings={len(self.findings)}, steps={self.steps})"

    # -- figures and tables (gradscope.views.plots / gradscope.views.tables) ----------------------------
    def plot(self, kind: str = "flow", *, ax: Any = None, **kwargs: Any) -> Any:
        """Draw a figure of the run and return it (a ``matplotlib.figure.Figure``).

        Args:
            kind: ``"flow"`` (gradient magnitude per layer by depth, log scale), ``"heatmap"``
                (layer x step heat map of log10 gradient norm), ``"norms"`` (per-layer norm curves) or
                ``"loss"``; more with ``@gradscope.views.plots.register_plot``.
            ax: matplotlib axes to draw into; default a new figure.
            **kwargs: options of the kind (``step=`` for ``"flow"``, ``stat=`` for ``"heatmap"``/``"norms"``).
        """
        from gradscope.views.plots import plot_report

        return plot_report(self, kind, ax=ax, **kwargs)

    def save_plots(self, directory: str | os.PathLike[str], *, kinds: Any = None, fmt: str = "png") -> list[Path]:
        """Save every plot (or ``kinds``) as ``<directory>/<kind>.<fmt>``; returns the paths."""
        from gradscope.views.plots import save_plots

        return save_plots(self, directory, kinds=kinds, fmt=fmt)

    def layer_summary(self) -> pd.DataFrame:
        """One row per layer (depth order, then ``"*"``): last/min/max/median of each statistic."""
        from gradscope.views.tables import layer_summary

        return layer_summary(self)

    def to_csv(self, path: str | os.PathLike[str], *, table: str = "stats") -> Path:
        """Write ``"stats"`` (long format), ``"layers"`` (:meth:`layer_summary`) or ``"scalars"`` as CSV."""
        from gradscope.views.tables import to_csv

        return to_csv(self, path, table=table)

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data (schema ``gradscope.report``, version 1).

        Statistics are stored as series, one per (layer, param, stat): ``{"layer", "param", "stat",
        "steps": [...], "values": [...]}``. Non-finite numbers are the strings ``"nan"``, ``"inf"``,
        ``"-inf"`` (JSON has no literal for them).
        """
        series = []
        df = self.stats
        if not df.empty:
            for (layer, param, stat), g in df.groupby(["layer", "param", "stat"], sort=False):
                series.append(
                    {
                        "layer": layer,
                        "param": param,
                        "stat": stat,
                        "steps": [int(s) for s in g["step"]],
                        "values": jsonable(g["value"].to_numpy()),
                    }
                )
        scal = self.scalars
        return {
            "schema": JSON_SCHEMA,
            "version": JSON_SCHEMA_VERSION,
            "gradscope_version": __version__,
            "ok": self.ok,
            "meta": jsonable(self.meta),
            "findings": [f.to_dict() for f in self.findings],
            "skipped_steps": list(self.skipped_steps),
            "frozen": list(self.frozen),
            "errors": list(self.errors),
            "scalars": {
                "steps": [int(s) for s in scal.index],
                "values": {c: jsonable(scal[c].to_numpy()) for c in scal.columns},
            },
            "stats": series,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int | None = None) -> str:
        """Serialise the report; when ``path`` is given, also write it there atomically.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, source: Union[str, os.PathLike[str], dict[str, Any]]) -> Report:
        """Read a report written by :meth:`to_json` (a path, JSON text, or the parsed dict)."""
        import pandas as pd

        if isinstance(source, dict):
            data = source
        else:
            text = str(source)
            p = Path(text) if not text.lstrip().startswith("{") else None
            data = json.loads(p.read_text(encoding="utf-8") if p is not None else text)
        if data.get("schema") != JSON_SCHEMA:
            raise ValueError(f"Not a gradscope report: expected schema {JSON_SCHEMA!r}, got {data.get('schema')!r}.")
        if int(data.get("version", 0)) > JSON_SCHEMA_VERSION:
            raise ValueError(
                f"This report uses schema version {data['version']}; this gradscope ({__version__}) reads up to "
                f"{JSON_SCHEMA_VERSION}. Upgrade gradscope."
            )
        rows = []
        for s in data.get("stats", []):
            vals = from_jsonable(s["values"])
            for step, v in zip(s["steps"], vals):
                rows.append((int(step), s["layer"], s["param"], s["stat"], float(v) if v is not None else math.nan))
        stats = pd.DataFrame(rows, columns=["step", "layer", "param", "stat", "value"])
        stats["step"] = stats["step"].astype("int64")
        stats = stats.sort_values("step", kind="stable").reset_index(drop=True)
        sc = data.get("scalars", {"steps": [], "values": {}})
        scalars = pd.DataFrame(
            {k: [float(x) for x in from_jsonable(v)] for k, v in sc.get("values", {}).items()},
            index=pd.Index(sc.get("steps", []), name="step"),
        )
        return cls(
            findings=[Finding.from_dict(f) for f in data.get("findings", [])],
            stats=stats,
            scalars=scalars,
            skipped_steps=data.get("skipped_steps", []),
            frozen=data.get("frozen", []),
            meta=from_jsonable(data.get("meta", {})),
            errors=data.get("errors", []),
        )
