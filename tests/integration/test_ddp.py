"""DistributedDataParallel with gloo on CPU, 2 ranks (torchrun) and 4 ranks (torch.multiprocessing).

Each rank trains its slice of a global batch; the statistics must equal those of one process on the
whole batch (DDP all-reduces the gradient before the optimizer reads it), findings must be identical on
all ranks, and only rank 0 may write TensorBoard events and the JSON report.
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


def _run(how: tuple[str, int]):
    launcher, world = how
    out = _dist.run_torchrun(world) if launcher == "torchrun" else _dist.run_spawn(world)
    reports = [gradscope.Report.from_json(out / f"ddp-rank{r}.json") for r in range(world)]
    raw = [json.loads((out / f"ddp-rank{r}.json").read_text()) for r in range(world)]
    return out, world, reports, raw


@pytest.mark.parametrize("how", RUNS)
def test_ddp_statistics_equal_single_process_on_the_global_batch(how):
    _, world, reports, _ = _run(how)
    ref, dead = _dist.reference_run(True)
    problems = []
    for rank, rep in enumerate(reports):
        # float32 all-reduce / reduce-scatter sum in another order than one backward over the whole batch:
        # ~1e-6 relative. `mean` is a difference of larger numbers, hence the absolute tolerance (the
        # gradients here are ~1e-2 to 1e-1).
        mism = _dist.compare_stats(rep.stats, ref.stats, rtol=2e-5, atol=1e-6, skip=("act_dead_fraction",))
        problems += [f"rank {rank}: {m}" for m in mism]
        # act_dead_fraction: each rank judges its own slice; the scope averages over ranks.
        got = rep.stats[rep.stats["stat"] == "act_dead_fraction"].set_index("step")["value"]
        for step, value in got.items():
            if not math.isclose(value, dead[step][world], abs_tol=1e-12):
                problems.append(
                    f"rank {rank}: act_dead_fraction at step {step} is {value}, expected {dead[step][world]}"
                )
        assert sorted(got.index) == sorted(dead), "act_dead_fraction must be present on every sampled step"
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("how", RUNS)
def test_ddp_scalars_are_global_and_line_up_across_ranks(how):
    _, _world, reports, _ = _run(how)
    ref, _ = _dist.reference_run(True)
    want = ref.scalars
    for rank, rep in enumerate(reports):
        got = rep.scalars
        # val_loss was passed on rank 0 only and lr on the last rank only: every rank has both columns.
        assert set(got.columns) == {"loss", "val_loss", "lr"}, (rank, list(got.columns))
        for col in ("loss", "val_loss", "lr"):
            a, b = want[col].to_numpy(), got[col].reindex(want.index).to_numpy()
            nan_a, nan_b = a != a, b != b
            assert (nan_a == nan_b).all(), (rank, col, a, b)
            assert (abs(a[~nan_a] - b[~nan_b]) <= 1e-6 * abs(a[~nan_a]) + 1e-7).all(), (rank, col, a, b)


@pytest.mark.parametrize("how", RUNS)
def test_ddp_findings_identical_on_every_rank(how):
    _, world, _, raw = _run(how)
    findings = [r["findings"] for r in raw]
    # the probe rule carries the exact loss, norm and activation values each rank's rules read
    assert len(findings[0]) == 3, findings[0]  # one per flush: steps 5, 10 and the final flush
    for rank in range(1, world):
        assert findings[rank] == findings[0], f"rank {rank} saw other findings than rank 0"
    assert all(r["ok"] == raw[0]["ok"] for r in raw)


@pytest.mark.parametrize("how", RUNS)
def test_ddp_only_rank_zero_writes(how):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, world, reports, _ = _run(how)
    events = sorted((out / "tb-ddp").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents"), events
    acc = EventAccumulator(str(out / "tb-ddp"))
    acc.Reload()
    norm = {e.step: e.value for e in acc.Scalars("gradscope/l2_norm/_model")}
    assert sorted(norm) == list(range(1, _dist.STEPS + 1))
    ref, _ = _dist.reference_run(True)
    want = ref.stats.query("layer == '*' and stat == 'l2_norm'").set_index("step")["value"]
    for step, value in norm.items():
        assert math.isclose(value, want[step], rel_tol=2e-5), (step, value, want[step])
    # The report file was asked for on every rank; rank 0 wrote it, alone, and atomically (no leftovers).
    assert sorted(p.name for p in out.iterdir() if "report" in p.name) == ["report-ddp.json"]
    written = gradscope.Report.from_json(out / "report-ddp.json")
    assert written.meta["distributed"]["rank"] == 0
    assert [r.meta["distributed"]["rank"] for r in reports] == list(range(world))


@pytest.mark.parametrize("how", RUNS)
def test_ddp_reductions_use_two_collectives_per_flush(how):
    _, world, reports, raw = _run(how)
    for rep, r in zip(reports, raw):
        d = rep.meta["distributed"]
        assert d["world_size"] == world and d["reduced"] and d["sharded_tensors"] == 0
        # 3 flushes (steps 5, 10, close) x (MIN + SUM), plus one exchange of scalar names: the ranks
        # registered different scalars before the first flush.
        assert d["collectives"] == 3 * 2 + 1, d
        # report() before close is not collective: what the flush at step 10 reduced, plus this rank's
        # steps 11 and 12 (DDP gradients are global already), and it says which are which.
        assert r["extra"]["mid_report_steps"] == list(range(1, _dist.STEPS + 1))
        live = r["extra"]["mid_live"]
        assert live["reduced_to_step"] == 10 and live["rank_local_steps"] == [11, _dist.STEPS], live
        assert live["judged_to_step"] == _dist.STEPS


@pytest.mark.parametrize("how", RUNS)
def test_report_on_rank_zero_alone_mid_run_covers_recent_steps_without_a_collective(how):
    _, _, _, raw = _run(how)
    ref, _ = _dist.reference_run(True)
    want = ref.stats.query("layer == '*' and stat == 'l2_norm'").set_index("step")["value"]
    lone = raw[0]["extra"]["lone"]
    # after step 7, between the flushes of steps 5 and 10: steps 6 and 7 are rank 0's own rows
    assert lone["steps"] == list(range(1, _dist.LONE_REPORT_STEP + 1)), lone
    assert lone["live"]["reduced_to_step"] == 5 and lone["live"]["rank_local_steps"] == [6, 7], lone
    assert all(not r["extra"]["lone"] for r in raw[1:])
    # the collective count above (3 flushes) holds: the lone report issued none, and every rank's
    # report after step 12 had the rank-local steps 11-12 with the global DDP gradient norm
    for r in raw:
        mid = {int(k): v for k, v in r["extra"]["mid_l2_norm"].items()}
        for step in (11, 12):
            assert math.isclose(mid[step], want[step], rel_tol=2e-5), (step, mid[step], want[step])


@pytest.mark.parametrize("how", RUNS)
def test_ddp_tied_weights_counted_once(how):
    _, _, reports, _ = _run(how)
    ref, _ = _dist.reference_run(True)
    model = _dist.make_model()
    distinct = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    for rep in reports:
        assert rep.meta["parameters"] == distinct == ref.meta["parameters"]
        layers = set(rep.stats["layer"])
        assert "emb+head" in layers and "emb" not in layers and "head" not in layers


def test_distributed_mode_is_validated():
    import torch.nn as nn

    with pytest.raises(gradscope.ConfigurationError, match="Expected `distributed` to be one of"):
        gradscope.watch(nn.Linear(2, 2), distributed="nccl")
    # without a process group, "auto" is a plain single-process scope: no reduction, it writes
    with gradscope.watch(nn.Linear(2, 2)) as scope:
        assert not scope._dist.active and scope._dist.writes
    assert "distributed" not in scope.report().meta


@pytest.mark.parametrize("how", RUNS)
def test_fsdp_report_before_close_marks_unreduced_shard_values_unknown(how):
    out, world, _, _ = _run(how)
    for rank in range(world):
        extra = json.loads((out / f"fsdp-rank{rank}.json").read_text())["extra"]
        live = extra["mid_live"]
        assert live["reduced_to_step"] == 10 and live["rank_local_steps"] == [11, _dist.STEPS], live
        l2 = {int(k): v for k, v in extra["mid_l2_norm"].items()}
        assert sorted(l2) == list(range(1, _dist.STEPS + 1))
        # reduced steps are global; the rank-local ones of sharded parameters are unknown, never a shard's norm
        assert all(l2[s] is not None and l2[s] > 0 for s in range(1, 11)), l2
        assert l2[11] is None and l2[12] is None, l2
        loss = {int(k): v for k, v in extra["mid_loss"].items()}
        assert all(math.isfinite(loss[s]) for s in (11, 12)), loss  # this rank's own loss
        assert extra["lone"] == {} or extra["lone"]["live"]["rank_local_steps"] == [6, 7]
