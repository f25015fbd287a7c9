"""The windowed accessors rules read the frame through, against plain NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from rulekit import build_frame, chain, context

from gradscope.rules._common import later_max, layer_rms_by_depth
from gradscope.rules.window import (
    dtype_info,
    judged_rows,
    persistent_windows,
    rolling_count,
    steps_to_rows,
    window_rows,
)
from gradscope.stats.moments import MOMENT_INDEX

PARAMS = [("a", "weight", 6), ("a", "bias", 2), ("b", "weight", 4), ("c", "weight", 3)]


def test_layer_statistics_match_a_loop_over_members_and_skip_absent_parameters() -> None:
    rng = np.random.default_rng(1)
    rms = rng.uniform(0.1, 2.0, size=(7, 4))
    has = rng.uniform(size=(7, 4)) > 0.3
    has[2, 2] = False  # layer b absent at row 2
    frame = build_frame(PARAMS, rms=rms, has_grad=has)
    rows = np.array([0, 2, 3, 6])
    got = frame.layer_values_many(["l2_norm", "rms", "abs_max"], rows)
    numel = np.array([6, 2, 4, 3])
    sq = rms**2 * numel
    for r_i, r in enumerate(rows):
        for li, members in enumerate([[0, 1], [2], [3]]):
            present = [p for p in members if has[r, p]]
            sumsq = sum(sq[r, p] for p in present) if present else np.nan
            n = sum(numel[p] for p in present) if present else np.nan
            peak = max(rms[r, p] for p in present) if present else np.nan
            np.testing.assert_allclose(got["l2_norm"][r_i, li], np.sqrt(sumsq), rtol=1e-12, equal_nan=True)
            np.testing.assert_allclose(got["rms"][r_i, li], np.sqrt(sumsq / n), rtol=1e-12, equal_nan=True)
            np.testing.assert_array_equal(got["abs_max"][r_i, li], peak)
    assert np.isnan(got["rms"][1, 1])  # layer b at row 2


def test_layer_statistics_keep_non_finite_values_in_their_own_layer() -> None:
    nonfinite = np.zeros((2, 4))
    nonfinite[1, 2] = 5  # layer b's weight holds NaN at row 1
    frame = build_frame(PARAMS, rms=np.ones((2, 4)), nonfinite=nonfinite)
    norms = frame.layer_values("l2_norm", np.array([0, 1]))
    assert np.isnan(norms[1, 1])
    np.testing.assert_allclose(norms[1, [0, 2]], np.sqrt([8.0, 3.0]))  # NaN * 0 must not leak into other layers
    np.testing.assert_array_equal(frame.layer_values("nonfinite_count", np.array([1]))[0], [0.0, 5.0, 0.0])


def test_layer_sums_of_infinities_follow_plain_summation() -> None:
    frame = build_frame(PARAMS, rms=np.ones((1, 4)))
    frame.moments[0, :, MOMENT_INDEX["sum"]] = [np.inf, -np.inf, np.inf, 1.0]  # the frame's own array
    mean = frame.layer_values("mean", np.array([0]))[0]
    assert np.isnan(mean[0])  # +inf and -inf in one layer
    assert mean[1] == np.inf and mean[2] == pytest.approx(1.0 / 3.0)


def test_rms_by_depth_without_a_nonfinite_count_flags_non_finite_layers() -> None:
    stats = ("l2_norm", "rms")
    rms = np.ones((2, 3))
    rms[1, 1] = np.inf
    frame = build_frame(chain(3), rms=rms, stats=stats)
    got, nonfinite, names = layer_rms_by_depth(context(frame, order=[2, 0, 1]), np.array([0, 1]))
    assert names == ["head", "fc0", "fc1"]
    np.testing.assert_array_equal(got[1], [1.0, 1.0, np.inf])
    np.testing.assert_array_equal(nonfinite, [[0, 0, 0], [0, 0, 1]])


def test_persistent_windows_by_hand() -> None:
    flags = np.array([1, 1, 0, 1, 1, 1, 0, 0], dtype=bool)
    # windows of 4: counts 3,3,3,3,2 ; start flag 1,1,0,1,1
    np.testing.assert_array_equal(rolling_count(flags, 4), [3, 3, 3, 3, 2])
    np.testing.assert_array_equal(persistent_windows(flags, 4, 0.75), [True, True, False, True, False])
    assert persistent_windows(flags, 9, 0.5).shape == (0,)


def test_later_max_is_the_max_over_later_columns_ignoring_nan() -> None:
    v = np.array([[1.0, 5.0, np.nan, 2.0], [np.nan, np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(later_max(v)[0], [5.0, 2.0, 2.0, np.nan])
    assert np.isnan(later_max(v)[1]).all()


def test_judged_rows_leave_out_skipped_steps_and_keep_a_look_back() -> None:
    skipped = np.array([0, 1, 0, 0, 1, 0, 0], dtype=bool)
    frame = build_frame(chain(2), rms=np.ones((7, 2)), skipped=skipped)
    rows, first_new = judged_rows(context(frame, new_from=5), lookback=2)
    np.testing.assert_array_equal(rows, [2, 3, 5, 6])
    assert first_new == 2
    sampled = np.array([1, 0, 1, 0, 1, 0, 1], dtype=bool)
    frame = build_frame(chain(2), rms=np.ones((7, 2)), sampled=sampled)
    rows, _ = judged_rows(context(frame, new_from=0), lookback=0, sampled=True)
    np.testing.assert_array_equal(rows, [0, 2, 4, 6])


@pytest.mark.parametrize(("steps", "every", "want"), [(20, 1, 20), (20, 3, 7), (30, 10, 3), (5, 10, 1)])
def test_steps_to_rows(steps: int, every: int, want: int) -> None:
    assert steps_to_rows(steps, every) == want


def test_window_rows_judges_a_short_run_only_at_its_end() -> None:
    assert window_rows(10, 20, final=False, minimum=3) == 0
    assert window_rows(10, 20, final=True, minimum=3) == 10
    assert window_rows(2, 20, final=True, minimum=3) == 0
    assert window_rows(25, 20, final=False, minimum=3) == 20


def test_dtype_info_uses_the_coarsest_dtype_of_each_layer() -> None:
    import torch

    frame = build_frame(PARAMS, rms=np.ones((1, 4)), dtypes=["float32", "float16", "bfloat16", "float64"])
    tiny, eps = dtype_info(frame.schema)
    assert tiny[0] == torch.finfo(torch.float16).tiny and eps[0] == torch.finfo(torch.float16).eps
    assert tiny[1] == torch.finfo(torch.bfloat16).tiny and eps[1] == torch.finfo(torch.bfloat16).eps
    assert tiny[2] == torch.finfo(torch.float64).tiny


def test_dtype_info_equals_a_loop_over_parameters_with_ragged_and_empty_layers() -> None:
    import torch

    from gradscope.stats.frame import FrameSchema

    names = ["float16", "int64", "bfloat16", "float64", "float32", "not_a_dtype", "float16"]
    members = [[6, 0], [], [1, 5], [2, 3, 4]]  # layer 1 has no parameter; the last two have no dtype name
    schema = FrameSchema(
        param_names=[f"p{i}" for i in range(9)],
        param_layers=[],
        param_leaves=[],
        numels=np.ones(9),
        layers=["a", "b", "c", "d"],
        layer_members=[*members[:3], [2, 3, 4, 7, 8]],
        stats=["rms"],
        custom={},
        dtypes=names,
    )
    f32 = torch.finfo(torch.float32)
    want_tiny, want_eps = [], []
    for ps in schema.layer_members:
        infos = []
        for p in ps:
            dt = getattr(torch, names[p], None) if p < len(names) else None
            infos.append(torch.finfo(dt) if isinstance(dt, torch.dtype) and dt.is_floating_point else f32)
        want_tiny.append(max((i.tiny for i in infos), default=f32.tiny))
        want_eps.append(max((i.eps for i in infos), default=f32.eps))
    tiny, eps = dtype_info(schema)
    np.testing.assert_array_equal(tiny, want_tiny)
    np.testing.assert_array_equal(eps, want_eps)
    assert eps[0] == torch.finfo(torch.float16).eps and tiny[1] == f32.tiny
