"""Rule about which parameters the backward pass reaches: trainable parameters that never get a gradient."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import layer_label, steps_label
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule
from gradscope.rules.window import steps_to_rows

__all__ = ["NoGradient"]


@register_rule("no_gradient")
class NoGradient(Rule):
    """Trainable parameters that never receive a gradient.

    Definition: a parameter with ``requires_grad=True`` whose ``.grad`` was None at every recorded
    step since it became trainable, over at least ``window`` steps (at the end of a shorter run: at
    least ``min_steps`` steps). The usual causes are a layer the forward pass never uses and a graph
    cut (``.detach()``, ``torch.no_grad()``, a NumPy round trip) before it. One finding per layer,
    listing its parameters. Frozen parameters (``requires_grad=False``) are never flagged, and a
    parameter that got a gradient even once (a branch used on some steps only) is not flagged either.

    A gradient of exact zeros is a gradient (e.g. behind dead units) and is left to the other rules.

    Thresholds:
        window: 50 steps, so that branches used every few steps (alternating heads, rarely routed
            experts) get a chance to receive one (our choice).
        min_steps: 2, the fewest steps judged at the end of a short run (e.g. a CI check).
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {"window": 50, "min_steps": 2}

    def validate(self) -> None:
        """Check threshold ranges."""
        for name in ("window", "min_steps"):
            if not self.thresholds[name] > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule 'no_gradient' to be > 0, but got {self.thresholds[name]!r}."
                )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._state: dict[str, np.ndarray] | None = None
        self._last_step = 0  # steps, not row indices: a bounded frame thins old rows between flushes
        self._reported: set[int] = set()

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Findings visible in the rows added since the last flush."""
        frame = ctx.frame
        P = len(frame.schema.param_names)
        if self._state is None:  # sized at the first flush: the rule is built before the model is seen
            self._state = {
                "ever": np.zeros(P, dtype=bool),
                "missing": np.zeros(P, dtype=np.int64),
                "since": np.full(P, -1, dtype=np.int64),
                "last": np.full(P, -1, dtype=np.int64),
            }
        st = self._state
        rows = np.flatnonzero((frame.steps > self._last_step) & ~frame.skipped)
        if len(frame):
            self._last_step = max(self._last_step, int(frame.steps[-1]))
        if len(rows):
            has = frame.has_grad[rows]
            trainable = frame.trainable[rows]
            steps = frame.steps[rows]
            st["ever"] |= (has & trainable).any(axis=0)
            missing = trainable & ~has
            st["missing"] += missing.sum(axis=0)
            first_missing = np.where(missing.any(axis=0), steps[np.argmax(missing, axis=0)], -1)
            st["since"] = np.where((st["since"] < 0) & (first_missing >= 0), first_missing, st["since"])
            last_missing = np.where(missing.any(axis=0), steps[len(steps) - 1 - np.argmax(missing[::-1], axis=0)], -1)
            st["last"] = np.maximum(st["last"], last_missing)
        every = ctx.every
        need = steps_to_rows(self.thresholds["window"], every, minimum=1)
        if ctx.final:
            need = min(need, int(self.thresholds["min_steps"]))
        never = ~st["ever"] & (st["missing"] >= need)
        if not never.any():
            return []
        out: list[Finding] = []
        schema = frame.schema
        for li, members in enumerate(schema.layer_members):
            bad = [p for p in members if never[p] and p not in self._reported]
            if not bad:
                continue
            self._reported.update(bad)
            layer = schema.layers[li]
            first = int(min(st["since"][p] for p in bad))
            last = int(max(st["last"][p] for p in bad))
            names = [schema.param_leaves[p] for p in bad]
            whole = len(bad) == len(members)
            out.append(
                self.finding(
                    step=first,
                    layer=layer,
                    message=(
                        f"{'All trainable parameters' if whole else 'Trainable parameter(s)'} of layer "
                        f"{layer_label(layer)} ({', '.join(names)}) never received a gradient over "
                        f"{steps_label(first, last)} ({int(max(st['missing'][p] for p in bad))} recorded steps): "
                        "the layer is not used by the forward pass, or the graph is cut before it."
                    ),
                    suggestion=(
                        "If the layer is unused on purpose, freeze it (requires_grad_(False)) or remove it; otherwise "
                        "look for a .detach(), torch.no_grad(), .item()/.numpy() round trip or integer cast between "
                        "it and the loss, or a branch the forward pass skips (with DDP, unused parameters also need "
                        "find_unused_parameters=True)."
                    ),
                    evidence={
                        "params": [schema.param_names[p] for p in bad],
                        "steps_without_grad": int(max(st["missing"][p] for p in bad)),
                        "window": [first, last],
                        "threshold_steps": int(need * every),
                    },
                )
            )
        return out
