"""The vectorised host side against straightforward per-layer references.

Layer and model aggregates, custom reductions, the long ``report.stats`` table and the tables derived
from it are computed on whole arrays; here each is checked against a plain loop (over layers, rows,
groups) in NumPy or pandas on random frames with ragged layers, parameters without a gradient,
non-finite moments, skipped and sampled rows, and thinning.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from gradscope.findings import jsonable
from gradscope.report import Report
from gradscope.stats.frame import ACTIVATION_STATISTICS, GLOBAL, FrameSchema, StatsFrame, _Groups, derive
from gradscope.stats.moments import MOMENT_INDEX, MOMENTS, SUM_MOMENTS
from gradscope.views.tables import (
    aggregates,
    gradient_layers,
    layer_matrix,
    layer_order,
    layer_statistics,
    layer_summary,
)

BUILTIN = ("l2_norm", "rms", "mean", "std", "abs_max", "zero_fraction", "nonfinite_count", "param_norm", "update_ratio")
CUSTOM = {"c_mean": "mean", "c_sum": "sum", "c_max": "max", "c_min": "min", "c_norm": "norm"}


def random_schema(rng: np.random.Generator, n_layers: int = 9, *, empty_layer: bool = True) -> FrameSchema:
    """Ragged layers of 1-4 parameters (one layer without parameters when ``empty_layer``), shuffled membership."""
    sizes = rng.integers(1, 5, size=n_layers)
    if empty_layer:
        sizes[3] = 0
    n_params = int(sizes.sum())
    perm = rng.permutation(n_params)  # members are not contiguous: the gather path is exercised
    members, at = [], 0
    for size in sizes:
        members.append(sorted(int(p) for p in perm[at : at + size]))
        at += size
    layers = [f"layer{i}" for i in range(n_layers)]
    layers[0] = ""  # the root module's own parameters
    param_layers = [""] * n_params
    for li, ps in enumerate(members):
        for p in ps:
            param_layers[p] = layers[li]
    return FrameSchema(
        param_names=[f"p{p}" for p in range(n_params)],
        param_layers=param_layers,
        param_leaves=[f"w{p}" for p in range(n_params)],
        numels=rng.integers(1, 50, size=n_params).astype(np.float64),
        layers=layers,
        layer_members=members,
        stats=[*BUILTIN, *CUSTOM],
        custom=dict(CUSTOM),
        sampled_stats=("param_norm", "update_ratio", "c_max"),
        act_modules=["act0", "act1"],
        act_kinds=["relu", "tanh"],
        dtypes=["float32"] * n_params,
    )


def random_chunk(schema: FrameSchema, rng: np.random.Generator, first: int, n: int) -> dict[str, np.ndarray]:
    """Rows with moments as a gradient would give them, some absent, some non-finite, some skipped."""
    P, C = len(schema.param_names), len(MOMENTS) + len(schema.custom)
    numel = schema.numels
    m = np.zeros((n, P, C))
    scale = rng.uniform(0.01, 2.0, size=(n, P))
    m[..., MOMENT_INDEX["sum"]] = rng.standard_normal((n, P)) * scale * np.sqrt(numel)
    m[..., MOMENT_INDEX["sumsq"]] = numel * scale**2 * rng.uniform(0.5, 1.5, size=(n, P))
    m[..., MOMENT_INDEX["min"]] = -scale * rng.uniform(1, 3, size=(n, P))
    m[..., MOMENT_INDEX["max"]] = scale * rng.uniform(1, 3, size=(n, P))
    m[..., MOMENT_INDEX["nnz"]] = np.floor(numel * rng.uniform(0.5, 1.0, size=(n, P)))
    m[..., MOMENT_INDEX["psumsq"]] = numel * rng.uniform(0.1, 1.0, size=(n, P))
    m[..., MOMENT_INDEX["dsumsq"]] = numel * rng.uniform(0, 1e-4, size=(n, P))
    m[..., len(MOMENTS) :] = rng.standard_normal((n, P, len(schema.custom)))
    # non-finite gradients: NaN, +inf, -inf in every moment column, a count in "nonfinite"
    for value in (np.nan, np.inf, -np.inf):
        r, p = rng.integers(0, n, size=3), rng.integers(0, P, size=3)
        m[r, p, : len(MOMENTS) - 2] = value
        m[r, p, MOMENT_INDEX["nonfinite"]] = 3
        m[r, p, len(MOMENTS) :] = value
    steps = np.arange(first, first + n, dtype=np.int64)
    sampled = rng.uniform(size=n) < 0.4
    act = np.where(sampled[:, None, None], rng.uniform(0, 1, size=(n, 2, 3)), np.nan)
    act[rng.uniform(size=(n, 2, 3)) < 0.1] = np.nan
    return {
        "steps": steps,
        "skipped": rng.uniform(size=n) < 0.1,
        "has_grad": rng.uniform(size=(n, P)) > 0.25,
        "trainable": np.ones((n, P), dtype=bool),
        "sampled": sampled,
        "moments": m,
        "act": act,
        "scalars": rng.standard_normal((n, 1)),
    }


def random_frame(seed: int, rows: int = 40, *, history: int | None = None, **kw: bool) -> StatsFrame:
    rng = np.random.default_rng(seed)
    frame = StatsFrame(random_schema(rng, **kw), history=history, thin_every=2)
    for first in range(1, rows + 1, 10):
        frame.append(random_chunk(frame.schema, rng, first, min(10, rows + 1 - first)), ["loss"])
    return frame


# -- references: one loop per group ------------------------------------------------------------------
def reference_moments(frame: StatsFrame, members: list[list[int]], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group's moments and element count at ``rows`` by a loop over rows and groups, ``[R, G, M]``, ``[R, G]``."""
    mom, has, numel = frame.moments[rows], frame.has_grad[rows], frame.schema.numels
    agg = np.full((len(rows), len(members), len(MOMENTS)), np.nan)
    n = np.full((len(rows), len(members)), np.nan)
    with np.errstate(invalid="ignore"):
        for r in range(len(rows)):
            for g, ps in enumerate(members):
                present = [p for p in ps if has[r, p]]
                if not present:
                    continue
                n[r, g] = sum(numel[p] for p in present)
                for name, k in MOMENT_INDEX.items():
                    col = mom[r, present, k]
                    if name in SUM_MOMENTS:
                        agg[r, g, k] = np.sum(col)
                    else:
                        agg[r, g, k] = np.min(col) if name == "min" else np.max(col)
    return agg, n


def reference_custom(frame: StatsFrame, stat: str, members: list[list[int]], rows: np.ndarray) -> np.ndarray:
    how = frame.schema.custom[stat]
    vals = frame.moments[rows][..., frame.schema.custom_column(stat)]
    has, numel = frame.has_grad[rows], frame.schema.numels
    out = np.full((len(rows), len(members)), np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        for r in range(len(rows)):
            for g, ps in enumerate(members):
                present = [p for p in ps if has[r, p]]
                if not present or np.isnan(vals[r, present]).any():
                    continue
                v, w = vals[r, present], numel[present]
                if how == "mean":
                    out[r, g] = np.sum(v * w) / np.sum(w)
                elif how == "sum":
                    out[r, g] = np.sum(v)
                elif how == "max":
                    out[r, g] = np.max(v)
                elif how == "min":
                    out[r, g] = np.min(v)
                else:
                    out[r, g] = np.sqrt(np.sum(v * v))
    return out


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to summation order; NaN and infinities where the reference has them."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got) & (got > 0), np.isinf(want) & (want > 0))
    np.testing.assert_array_equal(np.isinf(got) & (got < 0), np.isinf(want) & (want < 0))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_and_model_values_equal_a_loop_over_layers(seed: int) -> None:
    frame = random_frame(seed)
    sch = frame.schema
    assert np.isnan(frame.moments).any() and np.isinf(frame.moments).any() and not frame.has_grad.all()
    rows = np.arange(len(frame))
    every = [list(range(len(sch.param_names)))]
    agg, n = reference_moments(frame, sch.layer_members, rows)
    agg_model, n_model = reference_moments(frame, every, rows)
    got = frame.layer_values_many([*BUILTIN, *CUSTOM])
    for stat in BUILTIN:
        assert_same(got[stat], derive(stat, agg, n))
        assert_same(frame.global_values(stat), derive(stat, agg_model, n_model)[:, 0])
    for stat in CUSTOM:
        assert_same(got[stat], reference_custom(frame, stat, sch.layer_members, rows))
        assert_same(frame.global_values(stat), reference_custom(frame, stat, every, rows)[:, 0])
    # the empty layer has no value; a subset of rows gives the same values as those rows of the whole
    assert np.isnan(got["rms"][:, 3]).all()
    sub = np.array([1, 5, 6, 30])
    assert_same(frame.layer_values("std", sub), got["std"][sub])
    assert_same(frame.layer_values("abs_max", slice(10, 20)), got["abs_max"][10:20])


def test_groups_may_share_parameters_and_come_in_any_order() -> None:
    """Overlapping groups (a parameter in two groups), unsorted members, empty groups: a loop over groups."""
    rng = np.random.default_rng(5)
    members = [[4, 0], [], [1, 4, 2], [3], [], [0, 1, 2, 3, 4]]
    groups = _Groups.of(members, 5)
    vals = rng.standard_normal((6, 5))
    vals[1, 4], vals[2, 0], vals[2, 3], vals[3, 1], vals[3, 2] = np.nan, np.inf, -np.inf, np.inf, -np.inf
    has = rng.uniform(size=(6, 5)) > 0.2
    weights = rng.uniform(1, 3, size=5)
    want_sum, want_max, want_min = (np.full((6, len(members)), v) for v in (0.0, np.nan, np.nan))
    want_count = np.zeros((6, len(members)))
    with np.errstate(invalid="ignore"):
        for r in range(6):
            for g, ps in enumerate(members):
                present = [p for p in ps if has[r, p]]
                want_sum[r, g] = np.sum(vals[r, present]) if present else 0.0
                want_count[r, g] = np.sum(weights[present]) if present else 0.0
                if ps:  # absent parameters count as the fill value; empty groups are NaN
                    want_max[r, g] = np.max(np.where(has[r, ps], vals[r, ps], -np.inf))
                    want_min[r, g] = np.min(np.where(has[r, ps], vals[r, ps], np.inf))
        assert_same(groups.sum(vals, has), want_sum)
        assert_same(groups.extreme(np.maximum, vals, has, -np.inf), want_max)
        assert_same(groups.extreme(np.minimum, vals, has, np.inf), want_min)
    assert_same(groups.count(has, weights), want_count)
    np.testing.assert_array_equal(groups.any(has), want_count > 0)


def test_a_thinned_frame_aggregates_the_rows_it_kept() -> None:
    frame = random_frame(3, rows=120, history=20)
    assert frame.dropped > 0
    rows = np.arange(len(frame))
    agg, n = reference_moments(frame, frame.schema.layer_members, rows)
    assert_same(frame.layer_values("rms", rows), derive("rms", agg, n))
    assert_same(frame.layer_values("c_norm"), reference_custom(frame, "c_norm", frame.schema.layer_members, rows))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thinning_keeps_the_rows_its_rule_names_and_moves_them_intact(seed: int) -> None:
    """Rows appended in chunks of random size (thinning at some appends, as live appends skip it): after
    each append the frame holds exactly the rows the thinning rule names, each equal to the row appended.

    The rule, written independently of the frame's code: the newest ``W`` to ``W + W // 2`` rows (plus
    one chunk) at full resolution, cut back to exactly ``W`` when a thinning append finds more; older
    rows kept when ``(step - 1) % stride == 0``, the stride doubling while more than ``W - W // 2`` of
    them would stay."""
    rng = np.random.default_rng(seed)
    W = int(rng.integers(12, 40))
    frame = StatsFrame(random_schema(rng), history=W, thin_every=2)
    appended: dict[str, list[np.ndarray]] = {}
    kept_steps = np.zeros(0, dtype=np.int64)  # the reference frame: steps kept so far
    stride, n_old, first, thinned, unthinned = 2, 0, 1, 0, 0
    while first < 12 * W:
        k, thin = int(rng.integers(1, W // 2)), bool(rng.uniform() < 0.7)
        chunk = random_chunk(frame.schema, rng, first, k)
        for key, value in chunk.items():
            appended.setdefault(key, []).append(value)
        frame.append(chunk, ["loss"], thin=thin)
        if first == 1:
            storage = frame._data["moments"]
        # a bounded frame allocates the rows it can hold at its first append: no append copies it to grow
        assert frame._data["moments"] is storage
        first += k
        unthinned = 0 if thin else unthinned + k  # rows of appends that did not thin (live ones)
        kept_steps = np.concatenate([kept_steps, chunk["steps"]])
        if thin and len(kept_steps) - n_old > W + W // 2:
            thinned += 1
            aged = kept_steps[: len(kept_steps) - W]
            old = aged[(aged - 1) % stride == 0]
            while len(old) > W - W // 2:
                stride *= 2
                old = old[(old - 1) % stride == 0]
            kept_steps = np.concatenate([old, kept_steps[len(kept_steps) - W :]])
            n_old = len(old)
        np.testing.assert_array_equal(frame.steps, kept_steps)
        assert frame.history_info()["thinned_rows"] == n_old and len(frame) <= 2 * W + unthinned
    assert thinned >= 3 and stride > 2  # thinned several times, and the stride doubled
    every = {key: np.concatenate(values) for key, values in appended.items()}
    at = kept_steps - 1  # steps start at 1, one row per step
    arrays = frame._arrays()
    for key, value in every.items():
        np.testing.assert_array_equal(np.asarray(arrays[key]) if key != "scalars" else arrays[key][:, :1], value[at])
    assert frame.dropped == len(every["steps"]) - len(kept_steps)


def reference_long_table(frame: StatsFrame) -> pd.DataFrame:
    """``report.stats`` built the straightforward way: one small table per (statistic, row, entity)."""
    sch = frame.schema
    records = []
    for r in np.flatnonzero(~frame.skipped):
        step, sampled = int(frame.steps[r]), bool(frame.sampled[r])
        rows = np.array([r])
        for stat in sch.stats:
            has = frame.has_grad[r] & (sampled or stat not in sch.sampled_stats)
            pv = frame.param_values(stat, rows)[0]
            lv = frame.layer_values(stat, rows)[0]
            for p in np.flatnonzero(has):
                records.append((step, sch.param_layers[p], sch.param_leaves[p], stat, pv[p]))
            for li, ps in enumerate(sch.layer_members):
                if has[ps].any():
                    records.append((step, sch.layers[li], "*", stat, lv[li]))
            if has.any():
                records.append((step, GLOBAL, "*", stat, frame.global_values(stat, rows)[0]))
        if sampled:
            for stat in ACTIVATION_STATISTICS:
                for a, module in enumerate(sch.act_modules):
                    v = frame.act_values(stat)[r, a]
                    if not np.isnan(v):
                        records.append((step, module, "*", stat, v))
    return pd.DataFrame(records, columns=["step", "layer", "param", "stat", "value"])


@pytest.mark.parametrize("seed", [0, 4])
def test_the_long_table_equals_one_built_row_by_row(seed: int) -> None:
    frame = random_frame(seed, rows=30)
    got = frame.to_dataframe()
    want = reference_long_table(frame)
    assert len(got) == len(want) > 0
    for column in ("step", "layer", "param", "stat"):
        assert got[column].tolist() == want[column].tolist(), column
    assert_same(got["value"].to_numpy(), want["value"].to_numpy())
    assert got["step"].dtype == np.int64 and got["value"].dtype == np.float64
    # the string columns have the dtype pandas infers for strings, as a table built from Python strings
    assert got["layer"].dtype == want["layer"].dtype


def test_the_long_table_of_an_empty_frame_has_the_columns() -> None:
    frame = StatsFrame(random_schema(np.random.default_rng(0)))
    df = frame.to_dataframe()
    assert list(df.columns) == ["step", "layer", "param", "stat", "value"] and df.empty


# -- tables derived from report.stats ------------------------------------------------------------------
def random_long_table(seed: int) -> pd.DataFrame:
    """A long table with NaN values, duplicated (step, layer, stat) rows, layers missing at some steps."""
    rng = np.random.default_rng(seed)
    layers = ["", "enc.0", "enc.1", "head", "act"]
    records = []
    for step in rng.choice(np.arange(1, 200), size=60, replace=False):  # steps out of order
        for stat in ("l2_norm", "rms", "abs_max"):
            for layer in layers:
                if rng.uniform() < 0.2:
                    continue
                value = np.nan if rng.uniform() < 0.1 else float(rng.choice([1.0, 2.0, rng.standard_normal()]))
                records.append((int(step), layer, "*", stat, value))
                if rng.uniform() < 0.05:  # a duplicate row for the same (step, layer, stat)
                    records.append((int(step), layer, "*", stat, float(rng.standard_normal())))
                records.append((int(step), layer, "w", stat, float(rng.standard_normal())))
            records.append((int(step), "*", "*", stat, float(rng.standard_normal())))
    return pd.DataFrame(records, columns=["step", "layer", "param", "stat", "value"])


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_matrix_equals_a_pivot_table(seed: int) -> None:
    stats = random_long_table(seed)
    for layers in (None, ["head", "missing", "enc.0", ""]):
        steps, names, values = layer_matrix(stats, "rms", layers)
        rows = stats[(stats["param"] == "*") & (stats["layer"] != "*") & (stats["stat"] == "rms")]
        wide = rows.pivot_table(index="step", columns="layer", values="value", aggfunc="first", dropna=False)
        want_layers = list(dict.fromkeys(rows["layer"])) if layers is None else ["head", "enc.0", ""]
        wide = wide.reindex(columns=want_layers)
        assert names == want_layers
        np.testing.assert_array_equal(steps, wide.index.to_numpy())
        np.testing.assert_array_equal(values, wide.to_numpy(dtype=np.float64))
    steps, names, values = layer_matrix(stats, "nope")
    assert len(steps) == 0 and names == [] and values.shape == (0, 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_summary_equals_a_groupby(seed: int) -> None:
    stats = random_long_table(seed)
    stats.loc[stats.index[:5], "value"] = [np.inf, -np.inf, np.inf, np.nan, -np.inf]
    report = SimpleNamespace(stats=stats, meta={"layers_by_depth": ["head", "enc.1", "enc.0"]})
    got = layer_summary(report)
    agg = stats[stats["param"] == "*"].sort_values("step", kind="stable")
    grouped = agg.groupby(["layer", "stat"], sort=False)["value"]
    want = pd.DataFrame(
        {
            "last": grouped.apply(lambda v: v.iloc[-1]),
            "min": grouped.min(),
            "max": grouped.max(),
            "median": grouped.median(),
        }
    )
    want = want.unstack("stat").swaplevel(0, 1, axis=1)
    columns = pd.MultiIndex.from_product(
        [list(dict.fromkeys(agg["stat"])), ["last", "min", "max", "median"]], names=["stat", "aggregate"]
    )
    order = layer_order(stats, report.meta["layers_by_depth"])
    assert order[:3] == ["head", "enc.1", "enc.0"] and set(order) == {"", "enc.0", "enc.1", "head", "act"}
    want = want.reindex(index=[*order, "*"], columns=columns)
    want.index.name = "layer"
    pd.testing.assert_frame_equal(got, want)


def test_layer_statistics_and_gradient_layers_equal_loops_over_rows() -> None:
    stats = random_long_table(2)
    extra = [(5, "act", "*", "act_zero_fraction", 0.1), (7, "act2", "*", "act_dead_fraction", 0.2)]
    stats = pd.concat([stats, pd.DataFrame(extra, columns=stats.columns)], ignore_index=True)
    lay = stats[(stats["param"] == "*") & (stats["layer"] != "*")]
    assert layer_statistics(stats) == list(dict.fromkeys(lay["stat"]))
    present = set(lay.loc[~lay["stat"].str.startswith("act_"), "layer"])
    got = gradient_layers(stats, ["head", "enc.0"])
    assert got == [layer for layer in layer_order(stats, ["head", "enc.0"]) if layer in present]
    assert got[:2] == ["head", "enc.0"] and "act2" not in got and "act" in got


# -- the same tables read from the frame (a live report) without building the long table -------------------
def _reports(frame: StatsFrame, depth: list[str]) -> tuple[Report, Report]:
    """The report of a run (its frame) and the same report read back (its long table alone)."""
    meta = {"layers_by_depth": depth, "model": "M", "steps": int(frame.steps[-1]) if len(frame) else 0}
    live = Report(findings=[], frame=frame, meta=meta)
    read = Report(findings=[], stats=frame.to_dataframe(), meta=meta)
    return live, read


@pytest.mark.parametrize(
    ("seed", "history", "shared_name"), [(0, None, False), (1, None, True), (2, 12, False), (5, None, True)]
)
def test_the_views_of_a_live_report_equal_those_of_its_long_table(
    seed: int, history: int | None, shared_name: bool
) -> None:
    frame = random_frame(seed, rows=45, history=history)
    if shared_name:  # an activation module that is also a layer (a PReLU: a parameter and an activation)
        frame.schema.act_modules = ["layer2", "act1"]
    depth = ["layer5", "layer2", "", "not-a-layer"]
    live, read = _reports(frame, depth)
    got, want = aggregates(live), aggregates(read)
    assert type(got).__name__ == "_FrameAggregates" and type(want).__name__ == "_TableAggregates"
    assert live._stats is None  # nothing below builds the long table of the live report
    assert got.empty is want.empty is False
    assert got.last_step() == want.last_step()
    for order in (None, depth, ["act1", "layer1"]):
        assert got.order(order) == want.order(order)
        assert got.gradient_layers(order) == want.gradient_layers(order)
    assert got.statistics() == want.statistics()
    for stat in [*frame.schema.stats, "act_dead_fraction", "act_zero_fraction", "nope"]:
        for layers in (None, ["layer6", "missing", "layer1", "act1", ""]):
            g_steps, g_names, g_values = got.matrix(stat, layers)
            w_steps, w_names, w_values = want.matrix(stat, layers)
            assert g_names == w_names, stat
            np.testing.assert_array_equal(g_steps, w_steps)
            np.testing.assert_array_equal(g_values, w_values)
        g_model, w_model = got.model(stat, w_steps), want.model(stat, w_steps)
        assert (g_model is None) == (w_model is None), stat
        if w_model is not None:
            np.testing.assert_array_equal(g_model, w_model)
    for order in (None, depth):
        pd.testing.assert_frame_equal(got.summary(order), want.summary(order))
        chosen = ["update_ratio", "act_dead_fraction", "l2_norm"]
        pd.testing.assert_frame_equal(got.summary(order, chosen), want.summary(order, chosen))
    chosen = ["nonfinite_count", "update_ratio", "act_dead_fraction", "l2_norm", "nope"]
    latest = got.latest(chosen)
    pd.testing.assert_frame_equal(latest, want.latest(chosen))
    assert latest.notna().any().all() and len(latest.columns) == 4
    pd.testing.assert_frame_equal(layer_summary(live), layer_summary(read))
    assert str(live) == str(read)
    assert live._stats is None


def test_the_views_of_an_empty_live_report_equal_those_of_its_table() -> None:
    frame = StatsFrame(random_schema(np.random.default_rng(0)))
    live, read = _reports(frame, [])
    got, want = aggregates(live), aggregates(read)
    assert got.empty and want.empty
    assert got.order(None) == want.order(None) == [] and got.statistics() == want.statistics() == []
    pd.testing.assert_frame_equal(got.summary(None), want.summary(None))
    assert str(live) == str(read)


# -- JSON: the series of a report and the table read back, on whole columns ------------------------------
@pytest.mark.parametrize("seed", [0, 3])
def test_json_series_equal_a_groupby_and_read_back_into_the_same_table(seed: int) -> None:
    stats = random_long_table(seed)
    stats.loc[stats.index[:4], "value"] = [np.inf, -np.inf, np.nan, 1e308]
    report = Report(findings=[], stats=stats, meta={"steps": 1})
    got = report.to_dict()["stats"]
    want = [
        {
            "layer": layer,
            "param": param,
            "stat": stat,
            "steps": [int(s) for s in g["step"]],
            "values": jsonable(g["value"].to_numpy()),
        }
        for (layer, param, stat), g in stats.groupby(["layer", "param", "stat"], sort=False)
    ]
    assert got == want and any("inf" in s["values"] for s in got)
    back = Report.from_json(report.to_json()).stats
    rows = [(step, s["layer"], s["param"], s["stat"], v) for s in want for step, v in zip(s["steps"], s["values"])]
    ref = pd.DataFrame(rows, columns=["step", "layer", "param", "stat", "value"])
    ref["value"] = [float(v) for v in ref["value"]]
    ref = ref.sort_values("step", kind="stable").reset_index(drop=True)
    for column in ("step", "layer", "param", "stat"):
        assert back[column].tolist() == ref[column].tolist(), column
    np.testing.assert_array_equal(back["value"].to_numpy(), ref["value"].to_numpy())
    assert back["layer"].dtype == ref["layer"].dtype and back["step"].dtype == np.int64
