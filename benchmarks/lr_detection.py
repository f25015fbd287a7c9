"""Learning-rate verdicts and loss spikes against labelled runs: precision, recall, false alarms.

Learning rate, labelled by counterfactual: every (task, optimizer) pair (MLP, CNN, a 2-block transformer;
plain SGD, SGD with momentum 0.9, AdamW) is trained over a grid of learning rates, a decade apart, with the
same seed and data. A run is "too high" when the run at lr/10 ends at a clearly lower loss, "too low" when
the run at lr*10 does ("clearly": by more than 10 % of the loss at step 1, before any update, the same for
every learning rate of a task; a run that ends non-finite ends at +inf); a run no clearly lower than its
neighbour at lr/10 that is too high is too high as well (likewise too low below a run too low: the
counterfactual at lr/100 or lr*100); otherwise it is "fine". The rules see only their own run. The runs
labelled fine are trained again under a warm-up + cosine schedule and a step decay: no finding may appear.

Loss spikes: healthy runs (constant, warm-up + cosine, and warm restarts declared with phase=) must give no
loss_spike; the same runs with a fault injected at one step (a batch of shuffled labels, inputs scaled 100x,
a 100x learning-rate pulse) must give a loss_spike at that step (or the next, for the pulse, whose effect is
on the following forward).

    python benchmarks/lr_detection.py            # the full table (about 6 minutes on 2 CPU cores)
    python benchmarks/lr_detection.py --quick    # fewer steps and learning rates
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scenarios.data import ImageTask, TeacherTask, TokenTask, lm_loss
from scenarios.models import GPT, MLP, SmallCNN

import gradscope

LR_GRID = {
    "sgd": [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0],  # plain SGD: the step is lr * g
    "momentum": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0],  # SGD, momentum 0.9: about lr * g / (1 - 0.9)
    "adamw": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0],  # about lr per entry, whatever the gradient's scale
}
TASKS = ("mlp", "cnn", "gpt")
LR_RULES = ["learning_rate_too_high", "learning_rate_too_low"]


def build(task: str, opt: str, lr: float, seed: int = 0):
    torch.manual_seed(seed)
    if task == "mlp":
        data, model, loss_fn = TeacherTask(seed=1), MLP(32, [128, 128], 10), F.cross_entropy
    elif task == "cnn":
        data, model, loss_fn = ImageTask(seed=2), SmallCNN(width=16), F.cross_entropy
    else:
        data, model, loss_fn = (
            TokenTask(vocab=64, length=16, seed=3),
            GPT(vocab=64, ctx=16, d=32, layers=2, heads=4),
            lm_loss,
        )
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    elif opt == "momentum":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return data, model, loss_fn, optimizer


def train(task, opt, lr, steps, *, rules, schedule=None, inject=None, phase=None):
    """One watched run; returns (losses, findings)."""
    data, model, loss_fn, optimizer = build(task, opt, lr)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scope = gradscope.watch(model, optimizer=optimizer, rules=rules)
        for step in range(1, steps + 1):
            x, y = data.batch(step)
            if inject == ("labels", step):
                y = (
                    y[torch.randperm(len(y), generator=torch.Generator().manual_seed(step))]
                    if y.dim() == 1
                    else (torch.randint_like(y, 0, 64))
                )
            if inject == ("inputs", step):
                x = x * 100 if x.is_floating_point() else x
            for group in optimizer.param_groups:
                group["lr"] = lr * (schedule(step) if schedule else 1.0) * (100 if inject == ("lr", step) else 1)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scalars = {"phase": phase(step)} if phase else {}
            scope.step(loss=loss, **scalars)
            losses.append(loss.item())
        report = scope.close()
    return np.array(losses), report.findings


def final_loss(losses: np.ndarray) -> float:
    tail = losses[-20:]
    return float(np.median(tail)) if np.all(np.isfinite(tail)) else math.inf


def label_runs(losses: dict, grid: dict) -> dict:
    """``{(task, opt, lr): "too_high" | "too_low" | "fine" | "?"}`` by counterfactual (see the module docstring)."""
    labels = {}
    for task, opt, lr in losses:
        lrs = grid[opt]
        i = lrs.index(lr)
        final = final_loss(losses[(task, opt, lr)])
        # "clearly": 10 % of the loss before any update (step 1's loss: the same for every lr of a task)
        margin = 0.1 * abs(float(losses[(task, opt, lr)][0]))
        lower = final_loss(losses[(task, opt, lrs[i - 1])]) if i > 0 else None
        higher = final_loss(losses[(task, opt, lrs[i + 1])]) if i + 1 < len(lrs) else None
        if lower is None or higher is None:
            label = "?"  # at the edge of the grid: no counterfactual on one side
        elif not math.isfinite(final) and not math.isfinite(lower):
            label = "?"  # diverged, and so did the run at lr/10: no label by counterfactual
        elif lower < final - margin and (higher >= final - margin or lower <= higher):
            label = "too_high"
        elif higher < final - margin:
            label = "too_low"
        else:
            label = "fine"
        labels[(task, opt, lr)] = label
    # A learning rate above one that is too high, whose run ends no clearly lower, is too high as well (the
    # counterfactual at lr/100); likewise below one that is too low. Without this a run that blew up at lr
    # and at lr/10 alike would be "fine".
    for (task, opt, lr), label in sorted(labels.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        lrs = grid[opt]
        i = lrs.index(lr)
        final = final_loss(losses[(task, opt, lr)])
        margin = 0.1 * abs(float(losses[(task, opt, lr)][0]))
        if label in ("fine", "?") and i > 0 and math.isfinite(final) and labels[(task, opt, lrs[i - 1])] == "too_high":
            if not final < final_loss(losses[(task, opt, lrs[i - 1])]) - margin:
                labels[(task, opt, lr)] = "too_high"
    for (task, opt, lr), label in sorted(labels.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        lrs = grid[opt]
        i = lrs.index(lr)
        final = final_loss(losses[(task, opt, lr)])
        margin = 0.1 * abs(float(losses[(task, opt, lr)][0]))
        if label in ("fine", "?") and i + 1 < len(lrs) and labels[(task, opt, lrs[i + 1])] == "too_low":
            if not final < final_loss(losses[(task, opt, lrs[i + 1])]) - margin:
                labels[(task, opt, lr)] = "too_low"
    return labels


def lr_table(steps: int, grid: dict) -> None:
    print(f"\n== learning rate: {len(TASKS)} tasks x {sum(map(len, grid.values()))} runs, {steps} steps each ==")
    runs = {}
    for task in TASKS:
        for opt, lrs in grid.items():
            for lr in lrs:
                losses, findings = train(task, opt, lr, steps, rules=LR_RULES)
                runs[(task, opt, lr)] = (losses, {f.kind for f in findings})
    labels = label_runs({key: losses for key, (losses, _) in runs.items()}, grid)
    counts = {"too_high": [0, 0, 0], "too_low": [0, 0, 0]}  # true positives, false positives, false negatives
    false_alarms_on_fine = 0
    fine = 0
    print(f"{'task':5s} {'opt':8s} {'lr':>7s} {'first':>6s} {'final':>7s}  label      found")
    for (task, opt, lr), (losses, kinds) in runs.items():
        first = float(losses[0])
        final = final_loss(losses)
        label = labels[(task, opt, lr)]
        found = [k.replace("learning_rate_", "") for k in sorted(kinds)]
        print(f"{task:5s} {opt:8s} {lr:7g} {first:6.3f} {final:7.3f}  {label:9s}  {','.join(found) or '-'}")
        if label == "?":
            continue
        if label == "fine":
            fine += 1
            false_alarms_on_fine += bool(found)
        for kind in ("too_high", "too_low"):
            hit = kind in found
            if label == kind and hit:
                counts[kind][0] += 1
            elif label != kind and hit:
                counts[kind][1] += 1
            elif label == kind:
                counts[kind][2] += 1
    for kind, (tp, fp, fn) in counts.items():
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        print(
            f"learning_rate_{kind}: {tp + fn} labelled runs, precision {precision:.2f} ({tp}/{tp + fp}), recall {recall:.2f} ({tp}/{tp + fn})"
        )
    print(f"runs labelled fine with any learning-rate finding: {false_alarms_on_fine} of {fine}")
    # the runs labelled fine again under a schedule: a warm-up and a decay are the schedule at work, never a verdict
    schedules = {
        "warmup+cosine": lambda s: min(1.0, s / 40) * 0.5 * (1 + math.cos(math.pi * s / steps)),
        "step decay": lambda s: 1.0 if s <= steps // 2 else 0.1,
    }
    alarms = total = 0
    for (task, opt, lr), label in labels.items():
        if label != "fine":
            continue
        for name, schedule in schedules.items():
            _, findings = train(task, opt, lr, steps, rules=LR_RULES, schedule=schedule)
            total += 1
            if findings:
                alarms += 1
                print(f"  {task}/{opt}/{lr:g} {name}: {', '.join(f'{f.kind} at step {f.step}' for f in findings)}")
    print(
        f"runs labelled fine, under warm-up+cosine or step decay, with any learning-rate finding: {alarms} of {total}"
    )


def spike_table(steps: int) -> None:
    at = steps * 3 // 5
    configs = [("mlp", "momentum", 0.1), ("cnn", "momentum", 0.1), ("gpt", "adamw", 3e-3), ("mlp", "adamw", 1e-3)]
    schedules = {
        "constant": (None, None),
        "warmup+cosine": (lambda s: min(1.0, s / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)), None),
        "restarts (phase=)": (lambda s: 0.5 * (1 + math.cos(math.pi * (s % 50) / 50)), lambda s: s // 50),
    }
    print(f"\n== loss spikes: faults injected at step {at} of {steps} ==")
    false_alarms = runs = 0
    for task, opt, lr in configs:
        for name, (schedule, phase) in schedules.items():
            _, findings = train(task, opt, lr, steps, rules=["loss_spike"], schedule=schedule, phase=phase)
            spikes = [f for f in findings if f.kind == "loss_spike"]
            runs += 1
            false_alarms += bool(spikes)
            print(f"healthy {task}/{opt}/{lr:g} {name:18s}: {len(spikes)} loss_spike {[f.step for f in spikes]}")
    print(f"healthy runs with a loss_spike: {false_alarms} of {runs}")
    found = total = 0
    for task, opt, lr in configs:
        for fault in ("labels", "inputs", "lr"):
            if fault == "inputs" and task in ("gpt", "cnn"):
                continue  # token ids cannot be scaled; the CNN's BatchNorm undoes a scale of its inputs
            _, findings = train(task, opt, lr, steps, rules=["loss_spike"], inject=(fault, at))
            spikes = [f for f in findings if f.kind == "loss_spike"]
            want = {at, at + 1} if fault == "lr" else {at}
            hit = any(f.step in want for f in spikes)
            total += 1
            found += hit
            detail = "; ".join(
                f"step {f.step} layer {f.layer!r} rises {', '.join(f'{k or chr(40) + chr(41)}:{v:.1f}x' for k, v in f.evidence['gradient_rises'].items())}"
                f" recovered at {f.resolved_step}"
                for f in spikes
            )
            print(f"{task}/{opt}/{lr:g} {fault:6s}: {'found' if hit else 'MISSED'}  {detail}")
    print(f"injected spikes found at the right step: {found} of {total}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and learning rates")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", choices=["lr", "spike"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = 100 if args.quick else args.steps
    grid = {k: v[1:5] for k, v in LR_GRID.items()} if args.quick else LR_GRID
    start = time.perf_counter()
    if args.only in (None, "lr"):
        lr_table(steps, grid)
    if args.only in (None, "spike"):
        spike_table(steps)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
