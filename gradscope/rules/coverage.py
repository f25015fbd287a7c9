"""Rule about which parameters the backward pass reaches: trainable parameters that never get a gradient."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import layer_label, steps_label
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule
from gradscope.rules.window import Episode, follow_episodes, steps_to_rows

if TYPE_CHECKING:
    from gradscope.stats.frame import StatsFrame

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

    A recorded step at which *no* trainable parameter had a gradient says nothing about any layer:
    without ``optimizer=``, ``scope.step()`` called after ``opt.zero_grad()`` (or before the first
    ``backward()``) sees every gradient gone. Such steps are left out of the per-layer counts and
    reported once, as one model-level finding (``layer=None``), after ``confirm`` of them (at the last
    flush: ``min_steps``), saying where ``scope.step()`` belongs; it is resolved once steps with
    gradients follow.

    A parameter that had gradients and then *stops* getting them is reported too (a branch switched
    off, a graph cut introduced mid-run), once it has gone without for more than twice the longest gap
    it ever had between two gradients (a branch used every 30 steps needs 59), and for ``confirm``
    steps when it had gradients over at least ``window`` steps before the stop (its usual gaps are
    known), ``window`` steps otherwise. The finding follows the episode: ``last_step`` is the last step a reported
    parameter had no gradient, ``resolved_step`` the first step at which all of them had one again.

    Thresholds:
        window: 50 steps, so that branches used every few steps (alternating heads, rarely routed
            experts) get a chance to receive one (our choice).
        min_steps: 2, the fewest steps judged at the last flush: at the end of a short run (e.g. a
            CI check), and for a parameter made trainable fewer than ``window`` steps before the end.
        confirm: 10 steps. At an ordinary flush, a parameter made trainable after the first
            ``window`` steps (unfrozen mid-run) that has had no gradient since is confirmed after
            ``confirm`` steps; one trainable from the start keeps the full window (our choice: no
            healthy run of benchmarks/detection.py unfreezes a parameter). A parameter that stopped
            getting gradients after a window of history is confirmed after ``confirm`` steps and more
            than twice its longest earlier gap (the branch of healthy_alternating_branch, used every
            other step, would need 10 steps without one; it never has 2), at the last flush too: a
            branch used now and then looks exactly like one that stopped until its gap is longer than
            usual, so ``min_steps`` does not apply to a stop.
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {"window": 50, "min_steps": 2, "confirm": 10}

    def validate(self) -> None:
        """Check threshold ranges."""
        for name in ("window", "min_steps", "confirm"):
            if not self.thresholds[name] > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule 'no_gradient' to be > 0, but got {self.thresholds[name]!r}."
                )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._state: dict[str, np.ndarray] | None = None
        self._last_step = 0  # steps, not row indices: a bounded frame thins old rows between flushes
        self._reported: set[int] = set()
        self._episodes: dict[str, tuple[Finding, Episode, list[int]]] = {}  # layer -> (finding, episode, params)
        self._columns: tuple[tuple[int, ...], np.ndarray, np.ndarray] | None = None  # (key, parameters, starts)
        self._followed: tuple[int, np.ndarray] | None = None  # (episodes, the parameters of their layers)
        # steps at which no trainable parameter had a gradient (not kept beyond what is reported)
        self._empty = {"count": 0, "first": -1, "last": -1}
        self._empty_episode: tuple[Finding, Episode] | None = None

    def _update(self, frame: StatsFrame, rows: np.ndarray) -> None:
        """Fold the rows ``rows`` into the per-parameter counts, all rows at once.

        Row by row, the state would follow (per parameter, over the rows where some parameter had a
        gradient): ``gap`` counts the rows without a gradient since the last one (a row where the
        parameter was frozen leaves it), ``max_gap`` keeps the longest gap closed by a gradient after
        an earlier gradient, ``gap_since`` the step each gap began, ``first_grad``, ``ever``,
        ``missing``, ``since`` and ``last`` what their names say. Each is written here in closed form
        over the rows (cumulative counts and last-index scans), which gives the same values.
        """
        st = self._state
        assert st is not None
        has = frame.has_grad[rows]
        trainable = frame.trainable[rows]
        steps = frame.steps[rows]
        empty = _empty_rows(has, trainable)
        if empty.any():  # no gradient anywhere: says nothing about any one layer (see the class docstring)
            at = steps[empty]
            e = self._empty
            e["count"] += len(at)
            e["first"] = int(at[0]) if e["first"] < 0 else e["first"]
            e["last"] = int(at[-1])
            keep = ~empty
            has, trainable, steps = has[keep], trainable[keep], steps[keep]
        n = len(steps)
        if n == 0:
            return
        got = has & trainable
        miss = trainable & ~has
        any_got = got.any(axis=0)
        first_got = np.argmax(got, axis=0)
        if not miss.any():
            # every trainable parameter had a gradient: a gap can only close at its first gradient
            ended = any_got & (st["gap"] > 0) & st["ever"]
            st["max_gap"] = np.where(ended, np.maximum(st["max_gap"], st["gap"]), st["max_gap"])
            st["gap"] = np.where(any_got, 0, st["gap"])
        else:
            index = np.arange(n)[:, None]
            last_got = np.maximum.accumulate(np.where(got, index, -1), axis=0)  # [R, P] the last gradient so far
            misses = np.cumsum(miss, axis=0)
            since_got = misses - np.take_along_axis(misses, np.maximum(last_got, 0), axis=0)
            gap_after = np.where(last_got >= 0, since_got, st["gap"][None, :] + misses)  # gap after each row
            gap_before = np.concatenate([st["gap"][None, :], gap_after[:-1]])
            ever_before = st["ever"][None, :] | np.concatenate([np.zeros((1, got.shape[1]), bool), last_got[:-1] >= 0])
            ended = got & (gap_before > 0) & ever_before
            st["max_gap"] = np.maximum(st["max_gap"], np.where(ended, gap_before, 0).max(axis=0))
            starts = miss & (gap_before == 0)
            last_start = n - 1 - np.argmax(starts[::-1], axis=0)
            st["gap_since"] = np.where(starts.any(axis=0), steps[last_start], st["gap_since"])
            st["gap"] = gap_after[-1]
            any_miss = miss.any(axis=0)
            st["missing"] += miss.sum(axis=0)
            st["since"] = np.where((st["since"] < 0) & any_miss, steps[np.argmax(miss, axis=0)], st["since"])
            st["last"] = np.where(any_miss, steps[n - 1 - np.argmax(miss[::-1], axis=0)], st["last"])
        st["first_grad"] = np.where(any_got & ~st["ever"], steps[first_got], st["first_grad"])
        st["ever"] |= any_got

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Findings visible in the rows added since the last flush, and updates of the episodes reported."""
        frame = ctx.frame
        P = len(frame.schema.param_names)
        if self._state is None:  # sized at the first flush: the rule is built before the model is seen
            self._state = {
                "ever": np.zeros(P, dtype=bool),
                "missing": np.zeros(P, dtype=np.int64),
                "since": np.full(P, -1, dtype=np.int64),
                "last": np.full(P, -1, dtype=np.int64),
                "gap": np.zeros(P, dtype=np.int64),  # recorded steps without a gradient, up to the last
                "gap_since": np.full(P, -1, dtype=np.int64),
                "max_gap": np.zeros(P, dtype=np.int64),  # the longest gap between two gradients so far
                "first_grad": np.full(P, -1, dtype=np.int64),  # the step of the first gradient
            }
        st = self._state
        lo = int(np.searchsorted(frame.steps, self._last_step, side="right"))
        rows = lo + np.flatnonzero(~frame.skipped[lo:])  # the rows not folded in yet
        if len(frame):
            self._last_step = max(self._last_step, int(frame.steps[-1]))
        if len(rows):
            self._update(frame, rows)
        out = self._follow(frame, rows)
        th = self.thresholds
        every = ctx.every
        out.extend(self._no_gradient_anywhere(ctx, rows))
        window = steps_to_rows(th["window"], every, minimum=1)
        # never had a gradient: a full window from initialisation, `confirm` steps for a parameter that
        # became trainable mid-run, `min_steps` at the last flush
        confirm = steps_to_rows(th["confirm"], every, minimum=1)
        late = st["since"] > int(th["window"])
        need = np.where(late, confirm, window)
        if ctx.final:
            need = np.minimum(need, int(th["min_steps"]))
        never = ~st["ever"] & (st["missing"] >= need)
        # stopped: had gradients, then none for more than twice its longest earlier gap, and for `confirm`
        # steps once a window of its history shows how long its gaps get (a full window before that)
        known = (st["gap_since"] - st["first_grad"]) >= int(th["window"])
        stopped = st["ever"] & (st["gap"] >= np.maximum(np.where(known, confirm, window), 2 * st["max_gap"] + 1))
        flagged = never | stopped
        if not flagged.any():
            return out
        schema = frame.schema
        done = np.zeros(P, dtype=bool)  # reported, or in a layer whose episode is followed
        done[list(self._reported)] = True
        if self._episodes:
            done[self._episode_params(schema)] = True
        if not (flagged & ~done).any():
            return out  # nothing the loop below could report
        for li, members in enumerate(schema.layer_members):
            layer = schema.layers[li]
            if layer in self._episodes:
                continue  # one finding per layer: its episode is followed
            bad = [p for p in members if never[p] and p not in self._reported]
            if not bad:
                bad = [p for p in members if stopped[p] and p not in self._reported]
                if bad:
                    out.append(self._stopped(ctx, layer, bad, len(bad) == len(members)))
                continue
            self._reported.update(bad)
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
                        "find_unused_parameters=True). An expert of a mixture-of-experts layer that the router never "
                        "picks: add a load-balancing (auxiliary) loss, or router noise."
                    ),
                    evidence={
                        "params": [schema.param_names[p] for p in bad],
                        "steps_without_grad": int(max(st["missing"][p] for p in bad)),
                        "window": [first, last],
                        "threshold_steps": int(max(need[p] for p in bad) * every),
                    },
                )
            )
            self._episodes[layer] = (out[-1], Episode(last=last), bad)
            out[-1] = dataclasses.replace(out[-1], last_step=last)
        return out

    def _stopped(self, ctx: RuleContext, layer: str, bad: list[int], whole: bool) -> Finding:
        """The finding for parameters of ``layer`` that had gradients and stopped getting them."""
        st = self._state
        assert st is not None
        schema = ctx.frame.schema
        self._reported.update(bad)
        first = int(min(st["gap_since"][p] for p in bad))
        last = int(max(st["last"][p] for p in bad))
        gap = int(max(st["gap"][p] for p in bad))
        names = [schema.param_leaves[p] for p in bad]
        finding = self.finding(
            step=first,
            layer=layer,
            message=(
                f"{'All trainable parameters' if whole else 'Trainable parameter(s)'} of layer {layer_label(layer)} "
                f"({', '.join(names)}) stopped receiving a gradient at step {first}: none over "
                f"{steps_label(first, last)} ({gap} recorded steps), after getting one before. The graph was cut "
                "before the layer or the forward pass stopped using it."
            ),
            suggestion=(
                "Look for what changed at that step: a branch or module switched off, a .detach() or "
                "torch.no_grad() that now covers it, parameters frozen without requires_grad_(False), or a "
                "new model or optimizer built from a copy of the parameters."
            ),
            evidence={
                "params": [schema.param_names[p] for p in bad],
                "steps_without_grad": gap,
                "window": [first, last],
                "longest_earlier_gap": int(max(st["max_gap"][p] for p in bad)) * ctx.every,
            },
        )
        self._episodes[layer] = (finding, Episode(last=last), bad)
        return dataclasses.replace(finding, last_step=last)

    def _follow(self, frame: StatsFrame, rows: np.ndarray) -> list[Finding]:
        """Episode updates: the last step a reported parameter lacked a gradient, or the step all got one again."""
        out: list[Finding] = []
        if not len(rows):
            return out
        steps = frame.steps[rows]
        has, trainable = frame.has_grad[rows], frame.trainable[rows]
        keep = ~_empty_rows(has, trainable)
        episodes = list(self._episodes.values())
        if not episodes:
            return out
        # every episode's flags at once: the parameters of each, one after the other, reduced per episode
        # (a mixture of experts has one episode per expert layer the router left out for long)
        cols, starts = self._episode_columns(episodes)
        missing = (trainable & ~has)[keep][:, cols]
        flags = np.logical_or.reduceat(missing, starts, axis=1) if len(missing) else missing[:, : len(starts)]
        changed = follow_episodes([ep for _, ep, _ in episodes], steps[keep], flags, 1)
        for j in np.flatnonzero(changed).tolist():
            finding, ep, _ = episodes[j]
            out.append(finding.with_episode(ep.last, ep.resolved))
        return out

    def _episode_params(self, schema: Any) -> np.ndarray:
        """Every parameter of the layers whose episode is followed (kept while those layers are the same)."""
        key = len(self._episodes)
        cached = self._followed
        if cached is None or cached[0] != key:
            index = {layer: i for i, layer in enumerate(schema.layers)}
            params = [p for layer in self._episodes for p in schema.layer_members[index[layer]]]
            cached = self._followed = (key, np.asarray(params, dtype=np.int64))
        return cached[1]

    def _episode_columns(self, episodes: list[tuple[Finding, Episode, list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """The parameters of ``episodes`` one after the other, and where each episode's start (kept while they are the same)."""
        key = tuple(id(bad) for _, _, bad in episodes)  # (each episode's own list of parameters)
        cached = self._columns
        if cached is None or cached[0] != key:
            sizes = [len(bad) for _, _, bad in episodes]
            cols = np.fromiter((p for _, _, bad in episodes for p in bad), dtype=np.int64, count=sum(sizes))
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            cached = self._columns = (key, cols, starts)
        return cached[1], cached[2]

    def _no_gradient_anywhere(self, ctx: RuleContext, rows: np.ndarray) -> list[Finding]:
        """The model-level finding for steps at which no trainable parameter had a gradient, and its episode."""
        frame = ctx.frame
        if self._empty_episode is not None:
            finding, ep = self._empty_episode
            if not len(rows):
                return []
            flags = _empty_rows(frame.has_grad[rows], frame.trainable[rows])
            if ep.follow(frame.steps[rows], flags, 1):
                return [finding.with_episode(ep.last, ep.resolved)]
            return []
        e = self._empty
        th = self.thresholds
        need = steps_to_rows(th["confirm"], ctx.every, minimum=1)
        if ctx.final:
            need = min(need, int(th["min_steps"]))
        if e["count"] < need:
            return []
        first, last = e["first"], e["last"]
        finding = self.finding(
            step=first,
            layer=None,
            message=(
                f"No trainable parameter had a gradient when scope.step() ran, at {e['count']} recorded steps "
                f"({steps_label(first, last)}): the gradients were cleared (optimizer.zero_grad()) or not yet "
                "computed when gradscope read them, so no layer can be judged at those steps."
            ),
            suggestion=(
                "Call scope.step() after opt.step() and before opt.zero_grad(), or pass optimizer= to watch() "
                "(gradscope then reads the gradients when the optimizer uses them)."
            ),
            evidence={"steps_without_any_grad": int(e["count"]), "window": [first, last]},
        )
        ep = Episode(last=last)
        if len(rows):
            ep.follow(frame.steps[rows], _empty_rows(frame.has_grad[rows], frame.trainable[rows]), 1)
        self._empty_episode = (finding, ep)
        return [finding.with_episode(ep.last, ep.resolved)]


def _empty_rows(has: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """Rows ``[R]`` at which some parameter was trainable and none had a gradient."""
    return trainable.any(axis=1) & ~(has & trainable).any(axis=1)
