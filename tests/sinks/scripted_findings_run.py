"""A training script whose findings surface late and out of step order (run by test_tb_default_server.py).

Four findings, each first seen at one step and reported by its rule only at a later flush, in the
order of the issue that found TensorBoard's default loader dropping them (first steps 11, 21, 8,
14); the last one's episode ends at step 33. Usage: ``python scripted_findings_run.py LOG_DIR``.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn as nn

import gradscope

#: (kind, layer, first step, step from which the rule reports it, step the episode ended or None)
PLAN = [
    ("late_a", "0", 11, 12, None),
    ("late_b", "2", 21, 23, None),
    ("late_c", "4", 8, 27, None),
    ("late_d", None, 14, 30, 33),
]


class Scripted(gradscope.Rule):
    """Reports one planned finding once the run has reached the step it is due."""

    severity = "warning"

    def __init__(self, kind: str, layer: str | None, first: int, due: int, resolved: int | None) -> None:
        super().__init__()
        self.name = kind
        self.plan = (layer, first, due, resolved)

    def check(self, ctx: gradscope.RuleContext) -> list[gradscope.Finding]:
        layer, first, due, resolved = self.plan
        now = int(ctx.steps[-1]) if len(ctx.steps) else 0
        if now < due:
            return []
        f = self.finding(
            step=first,
            layer=layer,
            message=f"Planned finding {self.name} from step {first}.",
            suggestion="Nothing; this is a test.",
            evidence={"first": first},
        )
        if resolved is not None and now > resolved:
            return [dataclasses.replace(f, last_step=resolved - 1, resolved_step=resolved)]
        return [dataclasses.replace(f, last_step=now)]


def main(log_dir: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rules = [Scripted(*p) for p in PLAN]
    with gradscope.watch(model, optimizer=opt, log_dir=log_dir, flush_every=4, rules=rules) as scope:
        for _ in range(40):
            x = torch.randn(16, 6)
            loss = (model(x) - x[:, :3].sin()).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
            opt.zero_grad()


if __name__ == "__main__":
    main(sys.argv[1])
