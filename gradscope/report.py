"""What a run found: the findings, the statistics table, and the ways to read them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from gradscope._io import atomic_write_text
from gradscope._version import __version__
from gradscope.errors import ConfigurationError, GradientHealthError, GradscopeError
from gradscope.findings import (
    SEVERITIES,
    Finding,
    FindingList,
    at_or_above,
    count_errors,
    from_jsonable,
    jsonable,
    verdict,
)

if TYPE_CHECKING:
    import pandas as pd

    from gradscope.stats.frame import StatsFrame

__all__ = ["JSON_SCHEMA", "JSON_SCHEMA_VERSION", "SEVERITIES", "Finding", "FindingList", "Report", "ReportFormatError"]

JSON_SCHEMA = "gradscope.report"
JSON_SCHEMA_VERSION = 1


class ReportFormatError(GradscopeError, ValueError):
    """Raised by :meth:`Report.from_json` when the input is not a well-formed gradscope JSON report.

    The message names the key that is missing or holds the wrong type (``stats[3].values``...).
    """


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
        findings: findings ordered by step (a :class:`~gradscope.findings.FindingList`: a plain list
            that displays one short line per finding, and a table in notebooks).
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
        self.findings: list[Finding] = FindingList(sorted(findings, key=lambda f: f.step))
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
                from gradscope.stats.frame import empty_long_table

                return empty_long_table()
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

    def _layer_table(self, limit: int = 12) -> tuple[list[list[str]], int]:
        """The text report's layer table (header first) and how many layers there are in all."""
        from gradscope.views.tables import aggregates

        rows = aggregates(self)
        if rows.empty:
            return [], 0
        wanted = ["l2_norm", "abs_max", "zero_fraction", "nonfinite_count", "update_ratio"]
        known = set(rows.statistics())
        present = [s for s in wanted if s in known]
        # the latest value of each statistic (sampled statistics are not taken at every step); layers and
        # statistics without one are left out, layers sorted by name (then put in depth order below)
        last = rows.latest(present).dropna(how="all").dropna(axis=1, how="all").sort_index()
        if last.empty:
            return [], 0
        flagged = [f.layer for f in self.findings if f.layer]
        order = list(self.meta.get("layers_by_depth") or last.index)
        rows_layers = [layer for layer in order if layer in last.index]
        placed = set(rows_layers)
        rows_layers += [layer for layer in last.index if layer not in placed]
        total = len(rows_layers)
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
        return table, total

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
        table, total = self._layer_table()
        if table:
            from gradscope.views.tables import aggregates

            step = aggregates(self).last_step()
            n_shown = len(table) - 1
            lines.append("")
            if n_shown < total:
                lines.append(
                    f"layers, latest values up to step {step}: {n_shown} of {total} layers shown (those named in a "
                    "finding and the smallest and largest gradient norms; report.layer_summary() has every layer; "
                    "! = named in a finding):"
                )
            else:
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

    def _repr_html_(self) -> str:
        """Notebook display: the verdict, the findings table and the gradient-flow plot (an inline PNG)."""
        from gradscope.views.html import render_notebook_html

        return render_notebook_html(self)

    # -- figures and tables (gradscope.views.plots / gradscope.views.tables) ----------------------------
    def plot(self, kind: str = "flow", *, ax: Any = None, **kwargs: Any) -> Any:
        """Draw a figure of the run and return it (a ``matplotlib.figure.Figure``).

        Args:
            kind: ``"flow"`` (gradient magnitude per layer by depth, log scale), ``"heatmap"``
                (layer x step heat map of log10 gradient norm), ``"norms"`` (per-layer norm curves) or
                ``"loss"``; more with ``@gradscope.views.plots.register_plot``.
            ax: matplotlib axes to draw into; default a new figure.
            **kwargs: options of the kind (``step=`` for ``"flow"``, ``stat=`` for ``"heatmap"``/``"norms"``).

        Returns:
            The figure. In a notebook it displays as a PNG even though gradscope never imports pyplot
            (the figure carries its own ``_repr_png_``).

        Raises:
            RegistryError: ``kind`` is not a registered plot (the message lists them).
            ConfigurationError: an option is unknown or names a statistic or step the run does not have.
        """
        from gradscope.views.plots import plot_report

        return plot_report(self, kind, ax=ax, **kwargs)

    def save_plots(
        self, directory: str | os.PathLike[str], *, kinds: Any = None, fmt: str = "png", dpi: int = 100
    ) -> list[Path]:
        """Save every plot (or ``kinds``, a list such as ``["flow", "loss"]``) as ``<directory>/<kind>.<fmt>``.

        Returns:
            The paths written, in the order of ``kinds``.
        """
        from gradscope.views.plots import save_plots

        return save_plots(self, directory, kinds=kinds, fmt=fmt, dpi=dpi)

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
        series = _series(self.stats)
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
                "values": {c: _json_floats(scal[c].to_numpy(dtype=np.float64)) for c in scal.columns},
            },
            "stats": series,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int | None = None) -> str:
        """Serialise the report; when ``path`` is given, also write it there atomically.

        Args:
            path: file to write, or None to only return the text.
            indent: spaces of indentation (a non-negative int), or None for the most compact form.

        Returns:
            The JSON text.
        """
        if indent is not None and (isinstance(indent, bool) or not isinstance(indent, int) or indent < 0):
            raise ConfigurationError(
                f"Expected `indent` of Report.to_json to be a non-negative int (spaces) or None (compact), "
                f"but got {indent!r}."
            )
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(
        cls,
        source: Union[str, os.PathLike[str], dict[str, Any], None] = None,
        *,
        text: Union[str, bytes, None] = None,
    ) -> Report:
        """Read a report written by :meth:`to_json`.

        What ``source`` is, without guessing from the file system:

        * a ``dict``: the parsed JSON;
        * a ``pathlib.Path`` (any ``os.PathLike``): a file to read;
        * a ``str``: JSON text when its first non-blank character is ``{`` (a report is a JSON
          object), otherwise a file path.

        To be explicit, pass the text by keyword: ``Report.from_json(text=s)``.

        Args:
            source: a path, JSON text or the parsed dict (see above).
            text: the JSON text (``str`` or UTF-8 ``bytes``); give either this or ``source``.

        Raises:
            ReportFormatError: the input is not valid JSON or not a gradscope report; the message names
                the key that is missing or has the wrong type. A ``ValueError``.
            FileNotFoundError: ``source`` names a file that does not exist.
        """
        if (source is None) == (text is None):
            raise ConfigurationError(
                "Report.from_json needs exactly one of `source` (a path, JSON text or dict) and `text=` "
                f"(JSON text); got source={_short(source)} and text={_short(text)}."
            )
        if text is not None:
            if not isinstance(text, (str, bytes, bytearray)):
                raise ConfigurationError(
                    f"Expected `text` of Report.from_json to be str or bytes, but got {_short(text)}."
                )
            data = _parse_json(text, "the text")
        elif isinstance(source, dict):
            data = source
        elif isinstance(source, str) and source.lstrip().startswith("{"):
            data = _parse_json(source, "the text")
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            data = _parse_json(path.read_bytes(), repr(str(path)))
        else:
            raise ConfigurationError(
                "Expected `source` of Report.from_json to be a path, JSON text or a dict, "
                f"but got {type(source).__name__}."
            )
        return _report_from_data(cls, data)


def _series(stats: pd.DataFrame) -> list[dict[str, Any]]:
    """The JSON series of the long table: one per (layer, param, stat), in order of first appearance.

    What ``stats.groupby(["layer", "param", "stat"], sort=False)`` gives, each group's rows in table
    order, computed on whole columns (codes, one stable sort, one split) instead of a Python pass per
    row: a long run has millions of rows.
    """
    import pandas as pd

    if stats.empty:
        return []
    codes, names = [], []
    for column in ("layer", "param", "stat"):
        c, u = pd.factorize(stats[column])
        codes.append(c.astype(np.int64))
        names.append(list(u))
    combined = (codes[0] * len(names[1]) + codes[1]) * len(names[2]) + codes[2]
    group, _ = pd.factorize(combined)  # groups numbered in order of first appearance
    order = np.argsort(group, kind="stable")
    group = group[order]
    bounds = np.flatnonzero(np.diff(group)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(group)]])
    steps = stats["step"].to_numpy(dtype=np.int64)[order]
    values = stats["value"].to_numpy(dtype=np.float64)[order]
    first = order[starts]
    out = []
    for k, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist())):
        row = int(first[k])
        out.append(
            {
                "layer": names[0][codes[0][row]],
                "param": names[1][codes[1][row]],
                "stat": names[2][codes[2][row]],
                "steps": steps[lo:hi].tolist(),
                "values": _json_floats(values[lo:hi]),
            }
        )
    return out


_NON_FINITE_TEXT = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_floats(values: np.ndarray) -> list[Any]:
    """:func:`~gradscope.findings.jsonable` of a float array, in C but for its non-finite entries."""
    out: list[Any] = values.tolist()
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        v = out[i]
        out[i] = "nan" if v != v else ("inf" if v > 0 else "-inf")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_json(text: Union[str, bytes, bytearray], what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ReportFormatError(f"{what} is not a gradscope report: its JSON is nested too deeply.") from None
    except UnicodeDecodeError as exc:
        raise ReportFormatError(f"{what} is not a gradscope report: not UTF-8 text ({exc.reason}).") from None
    except ValueError as exc:
        raise ReportFormatError(f"{what} is not valid JSON: {exc}.") from None


_REQUIRED = object()


def _bad(key: str, expected: str, value: Any) -> ReportFormatError:
    return ReportFormatError(
        f"Malformed gradscope report: {key!r} must be {expected}, got {type(value).__name__} {_short(value)}."
    )


def _field(
    data: dict[str, Any], key: str, types: tuple[type, ...], expected: str, default: Any, where: str = ""
) -> Any:
    if key not in data and default is _REQUIRED:
        raise ReportFormatError(f"Malformed gradscope report: {where + key!r} is missing.")
    value = data.get(key, default)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise _bad(where + key, expected, value)
    return value


def _float_array(values: list[Any]) -> np.ndarray | None:
    """``values`` as float64 when it holds only numbers, null and the non-finite strings; else None.

    The check and the conversion run in C (a long report has millions of values); anything else goes
    through the per-value path of :func:`_numbers`, which names the bad entry.
    """
    types = set(map(type, values))
    if not types <= {float, int, type(None), str}:
        return None
    if str in types and not {v for v in values if type(v) is str} <= _NON_FINITE_TEXT.keys():
        return None
    try:
        return np.array(values, dtype=np.float64)  # None -> NaN; "nan", "inf", "-inf" -> themselves
    except (OverflowError, ValueError, TypeError):
        return None


def _numbers(values: Any, key: str, n: int | None = None) -> list[float]:
    """JSON numbers (or "nan"/"inf"/"-inf"/null) as floats, checked."""
    if not isinstance(values, list):
        raise _bad(key, "a list of numbers", values)
    fast = _float_array(values)
    if fast is not None:
        if n is not None and len(fast) != n:
            raise ReportFormatError(f"Malformed gradscope report: {key!r} has {len(fast)} values for {n} steps.")
        return fast  # type: ignore[return-value]  # reason: an array of the same floats
    try:
        out = [math.nan if v is None else float(v) for v in from_jsonable(values)]
    except (TypeError, ValueError):
        bad = next(v for v in values if not isinstance(v, (int, float, type(None))) and v not in ("nan", "inf", "-inf"))
        raise _bad(f"{key}[{values.index(bad)}]", 'a number, "nan", "inf" or "-inf"', bad) from None
    if n is not None and len(out) != n:
        raise ReportFormatError(f"Malformed gradscope report: {key!r} has {len(out)} values for {n} steps.")
    return out


def _ints(values: Any, key: str) -> list[int]:
    if not isinstance(values, list):
        raise _bad(key, "a list of ints", values)
    if set(map(type, values)) <= {int}:  # the common list, checked in C (bool is not int here)
        try:
            array = np.array(values, dtype=np.int64)
        except OverflowError:
            array = None
        if array is not None and (not len(array) or array.min() >= 0):
            return values
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
            raise _bad(f"{key}[{i}]", "an int step (0 <= step < 2**63)", v)
    return values


def _strings(values: Any, key: str) -> list[str]:
    if not isinstance(values, list):
        raise _bad(key, "a list of strings", values)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise _bad(f"{key}[{i}]", "a string", v)
    return values


def _table(labels: list[tuple[str, str, str]], steps: list[np.ndarray], values: list[np.ndarray]) -> pd.DataFrame:
    """The long table of JSON series (``labels[k]`` holds at ``steps[k]`` the ``values[k]``), by step.

    Rows of one step keep the order of the series (a stable sort), as the table they were written from.
    """
    import pandas as pd

    from gradscope.stats.frame import _labels, empty_long_table

    if not labels:
        return empty_long_table()
    series = np.repeat(np.arange(len(labels)), [len(s) for s in steps])
    step = np.concatenate(steps)
    order = np.argsort(step, kind="stable")
    series = series[order]
    columns = {"step": step[order]}
    for j, name in enumerate(("layer", "param", "stat")):
        columns[name] = _labels(np.asarray([lab[j] for lab in labels], dtype=object), series)
    columns["value"] = np.concatenate(values)[order]
    return pd.DataFrame(columns)


def _report_from_data(cls: type[Report], data: Any) -> Report:
    """Build a report from parsed JSON, checking every key it reads (hostile input gets a clear error)."""
    import pandas as pd

    if not isinstance(data, dict):
        raise ReportFormatError(f"Not a gradscope report: expected a JSON object, got {type(data).__name__}.")
    if data.get("schema") != JSON_SCHEMA:
        raise ReportFormatError(
            f"Not a gradscope report: expected 'schema' {JSON_SCHEMA!r}, got {_short(data.get('schema'))}."
        )
    version = _field(data, "version", (int,), "an int", 0)
    if version > JSON_SCHEMA_VERSION:
        raise ReportFormatError(
            f"This report uses schema version {version}; this gradscope ({__version__}) reads up to "
            f"{JSON_SCHEMA_VERSION}. Upgrade gradscope."
        )
    # one array per column for all series (a long report has millions of values): the labels as
    # codes into the series' names, expanded once
    labels: list[tuple[str, str, str]] = []
    step_parts: list[np.ndarray] = []
    value_parts: list[np.ndarray] = []
    for i, s in enumerate(_field(data, "stats", (list,), "a list", [])):
        key = f"stats[{i}]"
        if not isinstance(s, dict):
            raise _bad(key, "an object", s)
        layer, param, stat = (
            _field(s, name, (str,), "a string", _REQUIRED, f"{key}.") for name in ("layer", "param", "stat")
        )
        steps = _ints(s.get("steps"), f"{key}.steps")
        vals = _numbers(s.get("values"), f"{key}.values", len(steps))
        labels.append((layer, param, stat))
        step_parts.append(np.asarray(steps, dtype=np.int64))
        value_parts.append(np.asarray(vals, dtype=np.float64))
    stats = _table(labels, step_parts, value_parts)
    sc = _field(data, "scalars", (dict,), "an object", {"steps": [], "values": {}})
    sc_steps = _ints(sc.get("steps", []), "scalars.steps")
    sc_values = sc.get("values", {})
    if not isinstance(sc_values, dict):
        raise _bad("scalars.values", "an object", sc_values)
    scalars = pd.DataFrame(
        {str(k): _numbers(v, f"scalars.values.{k}", len(sc_steps)) for k, v in sc_values.items()},
        index=pd.Index(sc_steps, name="step", dtype="int64"),
    )
    findings = []
    for i, f in enumerate(_field(data, "findings", (list,), "a list", [])):
        try:
            findings.append(Finding.from_dict(f))
        except ValueError as exc:
            raise ReportFormatError(f"Malformed gradscope report: findings[{i}]: {exc}.") from None
    meta = from_jsonable(_field(data, "meta", (dict,), "an object", {}))
    # the keys of meta that the report and its views compute with (the rest are only shown)
    _field(meta, "steps", (int,), "an int", 0, "meta.")
    if meta.get("layers_by_depth") is not None:
        _strings(meta["layers_by_depth"], "meta.layers_by_depth")
    return cls(
        findings=findings,
        stats=stats,
        scalars=scalars,
        skipped_steps=_ints(data.get("skipped_steps", []), "skipped_steps"),
        frozen=_strings(data.get("frozen", []), "frozen"),
        meta=meta,
        errors=_strings(data.get("errors", []), "errors"),
    )
