"""FSDP2 (``fully_shard``, DTensor parameters) with gloo on CPU, 2 ranks (torchrun) and 4 (torch.multiprocessing).

Each rank holds a shard of every parameter and of its gradient; its moments are of that shard. The
scope combines them across the shard group at each flush (sums of squared partial norms, min/max),
so per-layer statistics must equal those of one unsharded process on the global batch, including
where a rank's shard is empty (``score`` has 3 rows over 4 ranks).
"""

from __future__ import annotations

import json
import math

import _dist
import pytest
import torch.distributed as dist

import gradscope

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

RUNS = [pytest.param(("torchrun", 2), id="torchrun-2"), pytest.param(("spawn", 4), id="spawn-4")]


def _run(how: tuple[str, int], scenario: str = "fsdp"):
    launcher, world = how
    out = _dist.run_torchrun(world) if launcher == "torchrun" else _dist.run_spawn(world)
    raw = [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(world)]
    return out, world, [gradscope.Report.from_json(d) for d in raw], raw


@pytest.mark.parametrize("how", RUNS)
def test_fsdp_per_layer_statistics_are_global(how):
    _, world, reports, raw = _run(how)
    ref, dead = _dist.reference_run(False)
    problems = []
    for rank, rep in enumerate(reports):
        assert rep.meta["distributed"]["sharded_tensors"] == 7  # every distinct tensor is a DTensor shard
        # float32 all-reduce / reduce-scatter sum in another order than one backward over the whole batch:
        # ~1e-6 relative. `mean` is a difference of larger numbers, hence the absolute tolerance (the
        # gradients here are ~1e-2 to 1e-1).
        mism = _dist.compare_stats(
            rep.stats, ref.stats, rtol=2e-5, atol=1e-6, skip=("act_dead_fraction", "test_abs_sum")
        )
        custom = rep.stats[rep.stats["stat"] == "test_abs_sum"]["value"]
        assert len(custom) and custom.isna().all()  # a shard's value is not the tensor's: never reported
        assert any("test_abs_sum" in w and "NaN" in w for w in raw[rank]["extra"]["warnings"])
        problems += [f"rank {rank}: {m}" for m in mism]
        got = rep.stats[rep.stats["stat"] == "act_dead_fraction"].set_index("step")["value"]
        problems += [
            f"rank {rank}: act_dead_fraction at step {s}: {v} != {dead[s][world]}"
            for s, v in got.items()
            if not math.isclose(v, dead[s][world], abs_tol=1e-12)
        ]
        a = rep.scalars["loss"].to_numpy()
        b = ref.scalars["loss"].to_numpy()
        assert (abs(a - b) <= 1e-6 * abs(b)).all(), (rank, a, b)
    assert not problems, "\n".join(problems[:40])


def test_fsdp_shard_norm_is_not_the_layer_norm():
    # The check above is only meaningful if a shard's own norm differs from the layer's: show it does.
    _, _world, reports, raw = _run(("spawn", 4))
    local = raw[0]["extra"]["local_numel"]
    model = _dist.make_model()
    full = {n: p.numel() for n, p in model.named_parameters()}
    assert all(local[n] < full[n] for n in full), (local, full)
    # rank 3 holds no row of `score` (3 rows over 4 ranks): its empty shard must not pull min/max to 0
    assert raw[3]["extra"]["local_numel"]["score.weight"] == 0
    ref, _ = _dist.reference_run(False)
    want = ref.stats.query("layer == 'score' and param == '*' and stat == 'abs_max'").set_index("step")["value"]
    got = reports[3].stats.query("layer == 'score' and param == '*' and stat == 'abs_max'").set_index("step")["value"]
    assert len(want) == 6 and (abs(got - want) <= 1e-6 * want).all()


@pytest.mark.parametrize("how", RUNS)
def test_fsdp_findings_identical_on_every_rank(how):
    out, world, _, raw = _run(how)
    assert len(raw[0]["findings"]) == 3
    for rank in range(1, world):
        assert raw[rank]["findings"] == raw[0]["findings"], f"rank {rank} differs from rank 0"
    # only rank 0 opened a TensorBoard writer
    assert len(list((out / "tb-fsdp").iterdir())) == 1


@pytest.mark.parametrize("how", RUNS)
def test_fsdp_nan_in_one_shard_stops_every_rank_at_the_same_step(how):
    _, world, reports, raw = _run(how, "fsdp_nan")
    assert [r["extra"]["raised_at"] for r in raw] == [_dist.NAN_STEP] * world
    for rep in reports:
        s = rep.stats
        row = s[(s["step"] == _dist.NAN_STEP) & (s["layer"] == "fc1") & (s["param"] == "weight")]
        # exactly one NaN, wherever it sits, counted once in the global gradient
        assert row.set_index("stat")["value"]["nonfinite_count"] == 1
        assert math.isnan(row.set_index("stat")["value"]["l2_norm"])
        assert max(s["step"]) == _dist.NAN_STEP
