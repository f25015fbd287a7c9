"""Distributed test harness: real processes, a real gloo process group, several scenarios per start.

Starting processes dominates the cost of a distributed test, so one start runs every scenario
(DDP, FSDP2, a NaN under FSDP2 with ``on_nonfinite="raise"``) and each rank writes what it saw to
``<out>/<scenario>-rank<r>.json``; the tests read those files. Two ways in, both used by the tests:

* ``torch.multiprocessing.spawn`` (:func:`run_spawn`), with a file:// rendezvous;
* ``torchrun`` (``python -m torch.distributed.run ... _dist.py --out DIR``, :func:`run_torchrun`).

The single-process reference (:func:`reference_run`) trains the same model on the whole global batch.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gradscope  # noqa: E402
from gradscope.registry import RULES, STATISTICS  # noqa: E402
from gradscope.rules.base import Rule, RuleContext  # noqa: E402

__all__ = [
    "GLOBAL_BATCH",
    "SCENARIOS",
    "STEPS",
    "TinyLM",
    "batch",
    "compare_stats",
    "dead_fraction_by_rank",
    "reference_run",
    "run_spawn",
    "run_spawn_cuda",
    "run_torchrun",
]

VOCAB, DIM, HIDDEN, SCORES = 12, 8, 16, 3
GLOBAL_BATCH, SEQ = 8, 6
STEPS = 12
WATCH = {"flush_every": 5, "sample_every": 2}
SCENARIOS = ("ddp", "fsdp", "fsdp_nan")
NAN_STEP = 4
LONE_REPORT_STEP = 7  # between the flushes of steps 5 and 10
VAL_EVERY = 3
LR = 0.2


class TinyLM(nn.Module):
    """Embedding -> MLP -> head tied to the embedding, plus a 3-way score head.

    ``score`` has 3 rows: sharded over 4 ranks one rank holds an empty shard (its min / max must not
    count). ``head.weight`` is ``emb.weight`` (tied: one tensor, layer ``"emb+head"``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(HIDDEN, DIM)
        self.score = nn.Linear(DIM, SCORES)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.emb(tokens)  # [B, T, D]
        h = h + self.fc2(self.act(self.fc1(h)))
        return self.head(h), self.score(h)  # [B, T, V], [B, T, 3]


def loss_fn(out: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    logits, score = out
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)) + 0.1 * score.pow(2).mean()


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: tokens and targets, ``[GLOBAL_BATCH, SEQ]`` each."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return tokens, torch.roll(tokens, -1, dims=1)


def _slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    return t[rank * per : (rank + 1) * per]


class ProbeRule(Rule):
    """Test rule: one finding per flush carrying the exact numbers the rules saw (loss, norm, activations).

    Findings equal on every rank then mean every rank's rules read the same values, to the last bit.
    """

    name = "test_probe"
    severity = "warning"

    def check(self, ctx: RuleContext) -> list:
        f = ctx.frame
        if len(f) == 0:
            return []
        last = len(f) - 1
        acts = f.act_values("act_zero_fraction")
        return [
            self.finding(
                step=int(f.steps[last]),
                layer=f"flush@{int(f.steps[last])}",
                message="probe",
                suggestion="none",
                evidence={
                    "loss": float(f.scalar("loss")[last]),
                    "l2_norm": float(f.global_values("l2_norm")[last]),
                    "act_zero_fraction": [float(v) for v in acts[: last + 1].reshape(-1)],
                    "skipped": [int(s) for s in f.steps[f.skipped]],
                },
            )
        ]


def _dump(out: Path, name: str, report: gradscope.Report, extra: dict[str, Any]) -> None:
    data = report.to_dict()
    data["extra"] = extra
    (out / f"{name}.json").write_text(json.dumps(data))


def val_loss(model: nn.Module) -> torch.Tensor:
    """Loss of a fixed validation batch (computed by rank 0 only in the DDP scenario)."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    with torch.no_grad():
        return loss_fn(model(tokens), torch.roll(tokens, -1, dims=1))


def extra_scalars(step: int, model: nn.Module, rank: int, world: int) -> dict[str, Any]:
    """Scalars passed besides the loss: ``val_loss`` every 3 steps on rank 0 only, ``lr`` on the last rank only.

    Ranks so register different scalar names, which the scope must line up across ranks.
    """
    out: dict[str, Any] = {}
    if rank == 0 and step % VAL_EVERY == 0:
        out["val_loss"] = val_loss(model)
    if rank == world - 1:
        out["lr"] = LR
    return out


def _train(
    model: nn.Module,
    wrapped: nn.Module,
    opt: torch.optim.Optimizer,
    scope: Any,
    rank: int,
    world: int,
    *,
    extra: bool,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train ``STEPS`` steps; rank 0 alone calls ``report()`` after step ``LONE_REPORT_STEP`` (not collective).

    Returns what that lone report covered (rank 0; empty on the other ranks).
    """
    lone: dict[str, Any] = {}
    for step in range(1, STEPS + 1):
        tokens, targets = (t.to(device) for t in batch(step))
        loss = loss_fn(wrapped(_slice(tokens, rank, world)), _slice(targets, rank, world))
        loss.backward()
        opt.step()
        scope.step(loss=loss, **(extra_scalars(step, model, rank, world) if extra else {}))
        opt.zero_grad(set_to_none=True)
        if step == LONE_REPORT_STEP and rank == 0:
            rep = scope.report()  # a collective here would hang the other ranks (the group's timeout fails it)
            lone = {"steps": sorted({int(s) for s in rep.stats["step"]}), "live": rep.meta["live"]}
    return lone


def scenario_ddp(rank: int, world: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    # Every rank passes the same log_dir and report_path: only rank 0 may write there.
    scope = gradscope.watch(ddp, optimizer=opt, log_dir=out / "tb-ddp", report_path=out / "report-ddp.json", **WATCH)
    lone = _train(model, ddp, opt, scope, rank, world, extra=True)
    mid = scope.report()  # not collective: what the last flush reduced plus this rank's rows since
    mid_steps = sorted({int(s) for s in mid.stats["step"]})
    mid_l2 = mid.stats.query("layer == '*' and stat == 'l2_norm'").set_index("step")["value"]
    report = scope.close()
    _dump(
        out,
        f"ddp-rank{rank}",
        report,
        {
            "mid_report_steps": mid_steps,
            "mid_live": mid.meta["live"],
            "mid_l2_norm": {int(k): float(v) for k, v in mid_l2.items()},
            "lone": lone,
        },
    )


def _fsdp_model(device: str = "cpu") -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model().to(device)
    for m in (model.fc1, model.fc2, model.score):
        fully_shard(m)
    fully_shard(model)  # emb and the tied head stay in the root group
    return model


def scenario_fsdp(rank: int, world: int, out: Path) -> None:
    from gradscope.stats import DEFAULT_STATISTICS

    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    # A custom statistic cannot be combined across shards: it must come out NaN, with a warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradscope.GradscopeWarning)
        scope = gradscope.watch(
            model, optimizer=opt, log_dir=out / "tb-fsdp", stats=[*DEFAULT_STATISTICS, "test_abs_sum"], **WATCH
        )
    lone = _train(model, model, opt, scope, rank, world, extra=False)
    mid = scope.report()
    mid_l2 = mid.stats.query("layer == '*' and stat == 'l2_norm'").set_index("step")["value"]
    mid_loss = mid.scalars["loss"]
    report = scope.close()
    local = {name: p.to_local().numel() for name, p in model.named_parameters()}
    warned = [str(w.message) for w in caught if issubclass(w.category, gradscope.GradscopeWarning)]
    _dump(
        out,
        f"fsdp-rank{rank}",
        report,
        {
            "local_numel": local,
            "warnings": warned,
            "lone": lone,
            "mid_live": mid.meta["live"],
            "mid_l2_norm": {int(k): None if v != v else float(v) for k, v in mid_l2.items()},
            "mid_loss": {int(k): float(v) for k, v in mid_loss.items()},
        },
    )


def scenario_fsdp_cuda(rank: int, world: int, out: Path) -> None:
    """FSDP2 on NCCL, one GPU per rank (run only where the machine has several)."""
    torch.cuda.set_device(rank)
    model = _fsdp_model(f"cuda:{rank}")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scope = gradscope.watch(model, optimizer=opt, **WATCH)
    _train(model, model, opt, scope, rank, world, extra=False, device=f"cuda:{rank}")
    _dump(out, f"fsdp_cuda-rank{rank}", scope.close(), {})


def scenario_fsdp_nan(rank: int, world: int, out: Path) -> None:
    """A NaN in one element of one rank's shard: every rank must stop at the same step."""
    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    raised = None
    try:
        with gradscope.watch(model, optimizer=opt, on_nonfinite="raise", **WATCH) as scope:
            for step in range(1, STEPS + 1):
                tokens, targets = batch(step)
                loss = loss_fn(model(_slice(tokens, rank, world)), _slice(targets, rank, world))
                loss.backward()
                if step == NAN_STEP and rank == world - 1:
                    model.fc1.weight.grad.to_local()[0, 0] = float("nan")  # only this rank's shard
                opt.step()
                scope.step(loss=loss)
                opt.zero_grad(set_to_none=True)
    except gradscope.NonFiniteGradientError as exc:
        raised = scope.step_count
        report = exc.report
    else:
        report = scope.report()
    _dump(out, f"fsdp_nan-rank{rank}", report, {"raised_at": raised})


def run_rank(
    rank: int, world: int, out: str, scenarios: tuple[str, ...], init: str | None, backend: str = "gloo"
) -> None:
    """Body of one rank: join the group, run the scenarios, leave."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2 on our out-of-place model
    if "test_probe" not in RULES:
        gradscope.register_rule("test_probe")(ProbeRule)
    if "test_abs_sum" not in STATISTICS:
        gradscope.register_statistic("test_abs_sum", reduce="sum")(lambda g, p: g.abs().sum())
    # A collective that only some ranks issue (report() on rank 0 alone must issue none) fails after
    # this timeout instead of hanging the test.
    timeout = datetime.timedelta(seconds=120)
    if init is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timeout)
    try:
        for name in scenarios:
            run = {
                "ddp": scenario_ddp,
                "fsdp": scenario_fsdp,
                "fsdp_nan": scenario_fsdp_nan,
                "fsdp_cuda": scenario_fsdp_cuda,
            }[name]
            run(rank, world, Path(out))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@functools.cache
def run_spawn(world: int, scenarios: tuple[str, ...] = SCENARIOS) -> Path:
    """Run the scenarios on ``world`` ranks started by ``torch.multiprocessing.spawn``; once per session."""
    import torch.multiprocessing as mp

    out = Path(tempfile.mkdtemp(prefix=f"gradscope-spawn{world}-"))
    _MADE.append(out)
    mp.spawn(run_rank, args=(world, str(out), scenarios, f"file://{out / 'rendezvous'}"), nprocs=world, join=True)
    return out


def run_spawn_cuda(world: int, out: Path) -> Path:
    """FSDP2 on NCCL, ``world`` GPUs, started by ``torch.multiprocessing.spawn``."""
    import torch.multiprocessing as mp

    mp.spawn(
        run_rank,
        args=(world, str(out), ("fsdp_cuda",), f"file://{out / 'rendezvous'}", "nccl"),
        nprocs=world,
        join=True,
    )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def run_torchrun(world: int, scenarios: tuple[str, ...] = SCENARIOS) -> Path:
    """Run the scenarios on ``world`` ranks started by ``torchrun``; once per session."""
    out = Path(tempfile.mkdtemp(prefix=f"gradscope-torchrun{world}-"))
    _MADE.append(out)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={world}",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        str(Path(__file__).resolve()),
        "--out",
        str(out),
        "--scenarios",
        ",".join(scenarios),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return out


_MADE: list[Path] = []


@atexit.register
def _cleanup() -> None:
    for path in _MADE:
        shutil.rmtree(path, ignore_errors=True)


@functools.cache
def reference_run(extra: bool) -> tuple[gradscope.Report, dict[int, dict[int, float]]]:
    """The same training on the whole global batch in one process.

    Args:
        extra: also pass the scalars of the DDP scenario (``val_loss`` every 3 steps, ``lr``).

    Returns:
        The report, and for each sampled step the reference ``act_dead_fraction`` of the ReLU for
        each world size (mean over ranks of the fraction of units dead on that rank's slice).
    """
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    seen: dict[str, torch.Tensor] = {}

    def first_output(module: nn.Module, args: Any, y: torch.Tensor) -> None:
        seen.setdefault("y", y.detach())  # the first forward of each step (the training batch), as gradscope

    handle = model.act.register_forward_hook(first_output)
    dead: dict[int, dict[int, float]] = {}
    with gradscope.watch(model, optimizer=opt, **WATCH) as scope:
        for step in range(1, STEPS + 1):
            seen.clear()
            tokens, targets = batch(step)
            loss = loss_fn(model(tokens), targets)
            loss.backward()
            opt.step()
            more = {"val_loss": val_loss(model)} if extra and step % VAL_EVERY == 0 else {}
            scope.step(loss=loss, **more, **({"lr": LR} if extra else {}))
            opt.zero_grad(set_to_none=True)
            if (step - 1) % WATCH["sample_every"] == 0:
                dead[step] = dead_fraction_by_rank(seen["y"])
    handle.remove()
    return scope.report(), dead


def dead_fraction_by_rank(y: torch.Tensor) -> dict[int, float]:
    """Mean over ranks of the fraction of hidden units that are <= 0 for every token of the rank's slice."""
    out = {}
    for world in (1, 2, 4):
        fr = [
            (_slice(y, r, world) <= 0).reshape(-1, y.shape[-1]).all(dim=0).double().mean().item() for r in range(world)
        ]
        out[world] = sum(fr) / world
    return out


def compare_stats(
    got: Any, ref: Any, *, rtol: float = 1e-5, atol: float = 1e-7, skip: tuple[str, ...] = ()
) -> list[str]:
    """Every (step, layer, param, stat) where two ``report.stats`` tables differ, as readable lines."""
    import numpy as np
    import pandas as pd

    key = ["step", "layer", "param", "stat"]
    g = got[~got["stat"].isin(skip)].set_index(key)["value"]
    r = ref[~ref["stat"].isin(skip)].set_index(key)["value"]
    both = pd.concat([r.rename("ref"), g.rename("got")], axis=1)
    bad = []
    for k, row in both.iterrows():
        a, b = row["ref"], row["got"]
        if np.isnan(a) and np.isnan(b):
            continue
        if np.isnan(a) or np.isnan(b) or abs(a - b) > atol + rtol * abs(a):
            bad.append(f"{k}: reference {a!r}, got {b!r}")
    return bad


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.out, tuple(args.scenarios.split(",")), None)


if __name__ == "__main__":
    _main()
