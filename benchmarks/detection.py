"""How well gradscope's rules find training faults, against SageMaker Debugger's default rules.

Every scenario in ``benchmarks/scenarios/catalog.py`` (healthy runs and faults of every kind, seeded,
CPU, at most 300 steps) is trained once through ``gradscope.watch`` with its defaults (every=1,
sample_every=10, flush_every=50). The same run feeds both detectors: gradscope's rules, and the
SageMaker Debugger rules re-implemented in ``benchmarks/scenarios/smd.py``.

Scoring is over (scenario, kind) pairs. A scenario lists the kinds it objectively has (``expected``,
with the step each starts and, where objective, the layer it originates from) and the kinds that are
a physical consequence of them (``allowed``: a dead layer leaves every earlier layer with a zero
gradient, so those gradients did vanish); reporting an allowed kind is neither required nor false.
Any other kind reported is a false positive; on a healthy scenario it is a false alarm.

Latency = the finding's step (the first step of the episode it describes) minus the onset step.
Onsets are the step a fault is injected, or for faults that develop, what an independent observer
in the harness sees: the first step with a non-finite gradient (plain torch reads of ``.grad``), the
first step with half of a ReLU layer's units silent for the whole batch, the first validation after
the best one (the earliest step at which a rise of the validation loss can be seen). Because rules run at flushes, a finding is *reported* later, at the end of the flush
that sees it; "report delay" is that step minus the onset.

Run: ``python benchmarks/detection.py`` (about two minutes on two CPU cores); ``--only NAME`` runs
the scenarios whose name contains NAME; ``--no-timing`` skips the rule-time measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scenarios.catalog import SCENARIOS
from scenarios.harness import DeadOracle, RunResult, Scenario, run_scenario
from scenarios.heldout import HELDOUT
from scenarios.smd import MEAN_ABS, Probe, smd_findings

from gradscope.stats import DEFAULT_STATISTICS

KINDS = (
    "vanishing_gradients",
    "exploding_gradients",
    "nonfinite_gradients",
    "dead_units",
    "saturated_activations",
    "no_gradient",
    "loss_not_decreasing",
    "overfitting",
)
LATENCY_LIMIT = 20


@dataclass
class Detection:
    """What one detector reported for one scenario: kind -> (first step, layers named, reported at)."""

    found: dict[str, tuple[int, set[Optional[str]], Optional[int]]] = field(default_factory=dict)


@dataclass
class Outcome:
    scenario: Scenario
    onsets: dict[str, Optional[int]]
    gradscope: Detection
    smd: Detection
    seconds: float
    rule_seconds: float
    flushes: int


def _onsets(sc: Scenario, run: RunResult, oracle: DeadOracle) -> dict[str, Optional[int]]:
    out: dict[str, Optional[int]] = {}
    for kind, exp in sc.expected.items():
        if exp.onset is not None:
            out[kind] = exp.onset
        elif kind == "nonfinite_gradients":
            out[kind] = run.first_nonfinite
        elif kind == "dead_units":
            out[kind] = oracle.onset(exp.origin)
        elif kind == "overfitting" and run.val_losses:
            # visible at the first validation after the best one: the earliest step at which anyone
            # can see the validation loss rise
            steps = sorted(run.val_losses)
            vals = np.array([run.val_losses[s] for s in steps])
            best = int(np.nanargmin(vals))
            out[kind] = int(steps[min(best + 1, len(steps) - 1)])
        else:
            out[kind] = None
    return out


def evaluate(sc: Scenario) -> Outcome:
    probe, oracle = Probe(), DeadOracle()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_scenario(
            sc,
            watch_kwargs={"stats": (*DEFAULT_STATISTICS, MEAN_ABS)},
            observers=(probe, oracle),
        )
    mine = Detection()
    for f in run.findings:
        step, layers, rep = mine.found.get(f.kind, (f.step, set(), run.reported_at.get((f.kind, f.layer))))
        layers.add(f.layer)
        mine.found[f.kind] = (min(step, f.step), layers, rep)
    theirs = Detection()
    for f in smd_findings(run.extra["frame"], probe, run.losses, run.val_losses):
        theirs.found[f.kind] = (f.step, {f.layer}, None)
    flushes = -(-sc.steps // 50) + 1
    return Outcome(sc, _onsets(sc, run, oracle), mine, theirs, run.seconds, run.rule_seconds, flushes)


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    healthy_alarms: int = 0
    per_kind: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # found, expected
    latencies: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    delays: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    origin: list[int] = field(default_factory=lambda: [0, 0])  # correct, judged
    origin_by_kind: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    late: list[str] = field(default_factory=list)
    false: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    wrong_origin: list[str] = field(default_factory=list)

    def add(self, o: Outcome, det: Detection) -> None:
        sc = o.scenario
        for kind in det.found:
            if kind in sc.expected:
                continue
            if kind not in sc.allowed:
                self.fp += 1
                self.false.append(f"{sc.name}:{kind}")
                if sc.group == "healthy":
                    self.healthy_alarms += 1
        for kind, exp in sc.expected.items():
            self.per_kind[kind][1] += 1
            if kind not in det.found:
                self.fn += 1
                self.missed.append(f"{sc.name}:{kind}")
                continue
            self.tp += 1
            self.per_kind[kind][0] += 1
            step, layers, reported = det.found[kind]
            onset = o.onsets.get(kind)
            if onset is not None:
                lat = step - onset
                self.latencies[kind].append(lat)
                if reported is not None:
                    self.delays[kind].append(reported - onset)
                if not -LATENCY_LIMIT <= lat <= LATENCY_LIMIT:
                    self.late.append(f"{sc.name}:{kind} ({lat:+d})")
            if exp.origin is not None:
                ok = bool(layers & exp.origin)
                self.origin[0] += ok
                self.origin[1] += 1
                self.origin_by_kind[kind][0] += ok
                self.origin_by_kind[kind][1] += 1
                if not ok:
                    self.wrong_origin.append(f"{sc.name}:{kind} named {sorted(map(str, layers))}")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _cell(det: Detection, kind: str, onset: Optional[int]) -> str:
    if kind not in det.found:
        return "-"
    step, _, _ = det.found[kind]
    return f"{step}" + (f" ({step - onset:+d})" if onset is not None else "")


def _marked(kinds: list[str], sc: Scenario) -> str:
    """Extra kinds, false positives in bold (allowed consequences plain)."""
    return ", ".join(k if k in sc.allowed else f"**{k}**" for k in kinds) or "-"


def rule_timing(layers: int = 8, steps: int = 1000) -> dict[str, float]:
    """Rule time per flush on a GPT-style model with ~50 layers (tied embeddings), default settings."""
    from scenarios.models import GPT

    import gradscope

    torch.manual_seed(0)
    model = GPT(vocab=64, ctx=8, d=32, layers=layers, heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times: list[float] = []
    scope = gradscope.watch(model, optimizer=opt)
    run = scope.engine.run

    def timed(ctx: Any) -> list:
        t = time.perf_counter()
        try:
            return run(ctx)
        finally:
            times.append(time.perf_counter() - t)

    scope.engine.run = timed  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 8), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 64), x.reshape(-1))
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad()
    scope.close()
    return {
        "layers": len(scope.layout.layers),
        "params": len(scope.layout.params),
        "flushes": len(times),
        "median_ms": 1e3 * float(np.median(times)),
        "max_ms": 1e3 * float(np.max(times)),
        "last_ms": 1e3 * float(times[-1]),
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], help="run scenarios whose name contains this")
    ap.add_argument("--no-timing", action="store_true", help="skip the rule-time measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    chosen = [sc for sc in (*SCENARIOS, *HELDOUT) if not args.only or any(n in sc.name for n in args.only)]
    t0 = time.perf_counter()
    outcomes = []
    for sc in chosen:
        o = evaluate(sc)
        outcomes.append(o)
        print(f"  ran {sc.name:36s} {o.seconds:5.1f} s", file=sys.stderr)
    mine, theirs = Score(), Score()
    heldout_names = {sc.name for sc in HELDOUT}
    by_set = {"first set (tuned on)": (Score(), Score()), "held-out set (never tuned on)": (Score(), Score())}
    for o in outcomes:
        mine.add(o, o.gradscope)
        theirs.add(o, o.smd)
        part = by_set["held-out set (never tuned on)" if o.scenario.name in heldout_names else "first set (tuned on)"]
        part[0].add(o, o.gradscope)
        part[1].add(o, o.smd)

    print(f"# Detection benchmark: {len(outcomes)} scenarios, {time.perf_counter() - t0:.0f} s")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"1 thread\n"
    )
    print("## Per scenario: step of the first finding of each expected kind (latency vs onset)\n")
    print("| scenario | expected (onset) | gradscope | SageMaker rules | gradscope also reported |")
    print("|---|---|---|---|---|")
    for o in outcomes:
        sc = o.scenario
        exp = ", ".join(f"{k} ({o.onsets.get(k)})" for k in sc.expected) or "none (healthy)"
        g = ", ".join(_cell(o.gradscope, k, o.onsets.get(k)) for k in sc.expected) or "-"
        s = ", ".join(_cell(o.smd, k, o.onsets.get(k)) for k in sc.expected) or "-"
        extra_g = sorted(k for k in o.gradscope.found if k not in sc.expected)
        extra_s = sorted(k for k in o.smd.found if k not in sc.expected)
        print(f"| {sc.name} | {exp} | {g} | {s} | {_marked(extra_g, sc)} (SageMaker: {_marked(extra_s, sc)}) |")
    print("\n(bold: a false positive; other extra kinds are allowed consequences of the fault)\n")

    print("## Per kind\n")
    print(
        "| kind | recall gradscope | recall SageMaker | latency gradscope (median / max) | report delay gradscope (median / max) | latency SageMaker (median / max) | origin named (gradscope / SageMaker) |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind in KINDS:
        fm, em = mine.per_kind[kind]
        fs, _ = theirs.per_kind[kind]
        if em == 0:
            continue

        def lat(xs: list[int]) -> str:
            return f"{int(np.median(xs))} / {max(xs)}" if xs else "-"

        om, os_ = mine.origin_by_kind.get(kind, [0, 0]), theirs.origin_by_kind.get(kind, [0, 0])
        origin = f"{om[0]}/{om[1]} / {os_[0]}/{os_[1]}" if om[1] else "-"
        print(
            f"| {kind} | {fm}/{em} | {fs}/{em} | {lat(mine.latencies[kind])} | {lat(mine.delays[kind])} | "
            f"{lat(theirs.latencies[kind])} | {origin} |"
        )
    n_healthy = sum(o.scenario.group == "healthy" for o in outcomes)
    print("\n## Overall, over (scenario, kind) pairs\n")
    print(
        "| scenarios | detector | precision | recall | F1 | false alarms on healthy runs | origin named "
        "| detections more than 20 steps from the onset |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = [("all", mine, theirs, n_healthy)]
    for label, (m, t) in by_set.items():
        held = label.startswith("held-out")
        healthy = sum(o.scenario.group == "healthy" and (o.scenario.name in heldout_names) == held for o in outcomes)
        rows.append((label, m, t, healthy))
    for label, m, t, healthy in rows:
        for name, sc_ in (("gradscope", m), ("SageMaker default rules", t)):
            print(
                f"| {label} | {name} | {sc_.precision:.2f} ({sc_.tp}/{sc_.tp + sc_.fp}) | {sc_.recall:.2f} "
                f"({sc_.tp}/{sc_.tp + sc_.fn}) | {sc_.f1:.2f} | {sc_.healthy_alarms} in {healthy} runs | "
                f"{sc_.origin[0]}/{sc_.origin[1]} | {len(sc_.late)} |"
            )
    for name, sc_ in (("gradscope", mine), ("SageMaker", theirs)):
        for label, items in (
            ("false positives", sc_.false),
            ("missed", sc_.missed),
            ("detected more than 20 steps before or after the onset", sc_.late),
            ("wrong origin", sc_.wrong_origin),
        ):
            if items:
                print(f"\n{name} {label}: {', '.join(items)}")
    rule_s = sum(o.rule_seconds for o in outcomes)
    flushes = sum(o.flushes for o in outcomes)
    print(f"\nrule time in these runs: {1e3 * rule_s / max(1, flushes):.1f} ms per flush on average")
    if not args.no_timing:
        t = rule_timing()
        print(
            f"rule time per flush, GPT-style model with {t['layers']} layers ({t['params']} tensors), "
            f"{t['flushes']} flushes over 1000 steps: median {t['median_ms']:.1f} ms, max {t['max_ms']:.1f} ms, "
            f"last {t['last_ms']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
