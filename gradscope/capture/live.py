"""Live diagnosis: the rules judge the rows recorded so far, between flushes, within the overhead budget.

:class:`Diagnosis` runs the scope's :class:`~gradscope.rules.engine.RuleEngine` on the host frame and
hands each new **confirmed** finding on (sinks at the next flush, ``on_finding``, ``stop_on``):

* at every flush (``flush_every`` recorded steps, ``flush()``, ``close()``), as before, except a
  ``flush_every`` flush that falls between live evaluations (below), after the first: those rows
  are judged at the next one, within ``k`` steps, so the flush adds no evaluation beyond the live
  budget;
* **live**, between flushes, every ``k`` recorded steps, where :class:`LiveCadence` picks ``k`` so
  that the host time of these evaluations stays about half of :data:`LIVE_BUDGET` of the training's
  own step time. The rows reach the host without a blocking device sync (``StepRecorder.stream``:
  read directly on a CPU, a non-blocking copy into pinned memory consumed once its event has
  completed on an accelerator). Sinks still write at flushes only. An active distributed run has no
  live evaluation: its rows become global only through the collective reduction of a flush, and a
  cadence measured per rank would not line up across ranks;
* **screened**: a full evaluation costs milliseconds, far more than 1% of a short step, so between
  them :class:`LiveScreen` looks at the few numbers of the new rows that the rules' conditions start
  from (non-finite moments, a jump of a parameter's gradient RMS, a parameter that stops getting a
  gradient, an activation module crossing its rule's threshold), a block of rows at a time with a
  fixed number of NumPy calls. On a CPU it reads the rows in place, in the buffer's host memory:
  nothing is copied into the frame unless the rules are about to run. It runs every ``k_s`` steps,
  ``k_s`` from a quarter of the budget (a 1 ms step gets a screen every few steps, a 20 ms one
  every step or two), and at once on a sampled row (activation statistics), on the step a steady
  gradient (one present at every row so far) goes missing and at the row where its gap reaches the
  screen's limit (:attr:`LiveScreen.gap_due`). When it sees something new, the rules run
  at once and then at every recorded step for :data:`HOT_STEPS` steps, so that a rule's ``confirm``
  span is judged as it completes (when only activation modules crossed a threshold, at the sampled
  steps of the next ``3 * sample_every`` instead: their evidence arrives there alone). A healthy run rarely triggers it; a broken one pays a few
  milliseconds per step for a while. On a CPU, the newest row's non-finite counts are checked at
  every recorded step whatever ``k_s`` (a comparison of bytes of host memory), so a NaN is
  confirmed at the step that produced it. The ordinary step, with nothing due, compares a few
  counters and makes that one comparison;
* **the origin of the first NaN**: when the first ``nonfinite_gradients`` finding is confirmed,
  :attr:`Diagnosis.first_nonfinite` is called (:func:`gradscope.capture.nonfinite.auto_locate` arms
  the checks of the next forward there; nothing is installed before);
* for ``report()``, once more on a throw-away copy of the engine in final mode
  (:meth:`Diagnosis.provisional`): what ``close()`` would add if the run ended now, shown as
  **provisional** findings and never written anywhere. The real engine's state is untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradscope.capture.kernels import cpu_act_screen_kernel, cpu_screen_kernel
from gradscope.findings import Finding, selects
from gradscope.rules.base import RuleContext
from gradscope.sinks.base import Sink, SinkUpdate
from gradscope.stats.frame import ACTIVATION_STATISTICS
from gradscope.stats.moments import MOMENT_INDEX

if TYPE_CHECKING:
    from gradscope.capture.distributed import DistributedContext
    from gradscope.capture.order import ForwardOrder
    from gradscope.capture.step import RecordedRow, StepRecorder
    from gradscope.options import WatchOptions
    from gradscope.rules.engine import RuleEngine
    from gradscope.stats.frame import StatsFrame

__all__ = [
    "ACT_REARM_ROWS",
    "HOT_STEPS",
    "LIVE_BUDGET",
    "SCREEN_SHARE",
    "Diagnosis",
    "LiveCadence",
    "LiveScreen",
    "log_finding",
    "stop_message",
]

#: Share of the training's own step time that live evaluations may take on the host, on average: at
#: most half for the full evaluations at the cadence and a quarter for the screen (:data:`SCREEN_SHARE`).
LIVE_BUDGET = 0.01

#: A parameter's band around its level is this many times its mean deviation from it, when that is wider than
#: ``decades`` (up to ``max_decades``): see :class:`LiveScreen`.
NOISE_FACTOR = 4.0

#: Weight of a new row in the mean deviation (an exponential moving average over about 10 rows).
NOISE_RATE = 0.1

#: The screen's share of :data:`LIVE_BUDGET`. A quarter: its shift test needs two rows in a row and the
#: rules confirm over ten, so a screen every step or two finds nothing sooner than one every few steps
#: (benchmarks/detection.py: the same latencies, to half a step, with a screen at every step as every two).
SCREEN_SHARE = 0.25

#: An activation module the screen has flagged is flagged afresh only after this many sampled rows
#: below its threshold (or one row clearly below, under half of it): a dead fraction hovering about
#: the threshold does not keep the rules running (:meth:`LiveScreen._activations`).
ACT_REARM_ROWS = 10

#: After the screen flags something new, the rules run at every recorded step for this many steps:
#: long enough for the ``confirm`` spans of the rules (10 steps; one sampled step for activations).
HOT_STEPS = 25

# The modules saturated_activations judges (gradscope.rules.activations; not imported: capture/ stays
# below rules/ families).
_SATURATING = ("tanh", "sigmoid", "hardtanh", "hardsigmoid")

_SUMSQ, _NONFINITE = MOMENT_INDEX["sumsq"], MOMENT_INDEX["nonfinite"]
_NEVER = 1 << 62  # LiveScreen.gap_due with no gap open
_ACT_DEAD = ACTIVATION_STATISTICS.index("act_dead_fraction")
_ACT_SATURATED = ACTIVATION_STATISTICS.index("act_saturated_fraction")

#: The logger that announces each new finding as it becomes visible (``logging.getLogger("gradscope")``).
logger = logging.getLogger("gradscope")


class LiveCadence:
    """How often the rules run live: every ``k`` recorded steps, ``k`` chosen from measured times.

    Policy: ``step_time`` is the wall time the training spends between two ``scope.step()`` calls
    (from the end of one call to the start of the next, so gradscope's own flushes and evaluations are
    not counted in it), and ``eval_time`` the wall time of one evaluation; both are smoothed
    (exponential moving averages, below). An evaluation every ``k`` recorded steps costs
    ``eval_time / (k * step_time)`` of the run, so::

        k = clamp(ceil(eval_time / (budget / 2 * step_time)), 1, flush_every)

    A slow step (a real model, seconds per step) gets ``k = 1``: the rules see every step as it
    ends. Tiny steps (a toy model, a millisecond) get ``k = flush_every``, i.e. no evaluation besides
    the flushes. The first evaluation runs as soon as one step time is known, to measure
    ``eval_time``. The screen (:class:`LiveScreen`) gets a quarter of the budget (:data:`SCREEN_SHARE`)
    the same way: every ``k_s = clamp(ceil(screen_time / (budget / 4 * step_time)), 1, flush_every)``
    steps.

    Both times are measured at every live screen and evaluation, and at a flush's own while ``k_s``
    or ``k`` is ``flush_every`` (no live one measures it then; a flush's counts in neither
    :attr:`screens` nor :attr:`evaluations`). A measurement under half the estimate replaces it; others
    are averaged in. The first screens and evaluations of a run pay one-time costs (first calls), so a
    high estimate is common early, and it makes the next measurement rare; a low one corrects itself
    quickly, by the frequent measurements it brings. The screen's warm-up rows
    (:attr:`LiveScreen.warming`: its full path) are not measured at all; until they are screened,
    ``k_s`` is 1. Before, only live ones were measured, so a first figure that pinned ``k_s`` at
    ``flush_every`` was never corrected: a 21-tensor model whose first two screens took 0.60 and 0.45
    ms (60 us later) was screened at flushes alone for the whole run, and a blow-up of its gradients
    waited for the next flush.

    Args:
        flush_every: the scope's ``flush_every`` (the largest ``k``).
        budget: the share of the step time to spend (default :data:`LIVE_BUDGET`).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self, flush_every: int, *, budget: float = LIVE_BUDGET, clock: Callable[[], float] | None = None
    ) -> None:
        self.flush_every = int(flush_every)
        self.budget = float(budget)
        #: The clock (seconds); tests may replace it.
        self.clock = clock if clock is not None else time.perf_counter
        #: Smoothed training time per ``scope.step()`` (seconds), None before two steps.
        self.step_time: float | None = None
        #: Smoothed wall time of one live evaluation (seconds), None before the first.
        self.eval_time: float | None = None
        #: Recorded steps since the last evaluation (live or at a flush).
        self.waiting = 0
        #: Live evaluations so far.
        self.evaluations = 0
        #: Smoothed wall time of one screen (seconds), None before the first.
        self.screen_time: float | None = None
        #: Recorded steps since the last screen.
        self.screen_waiting = 0
        #: Screens so far, and the full evaluations they triggered.
        self.screens = 0
        self.triggered = 0
        self._ended: float | None = None
        #: ``every`` and ``screen_every`` as last computed (refreshed every few steps and after each
        #: evaluation or screen): ``live()`` compares counters with them, nothing more, on an ordinary step.
        self.k_eval = self.flush_every
        self.k_screen = self.flush_every
        self._started = 0

    def refresh(self) -> None:
        """Recompute the cached ``k`` and ``k_s`` from the smoothed times."""
        self.k_eval = self.every
        self.k_screen = self.screen_every

    def step_started(self) -> None:
        """At the start of ``scope.step()``: the training's time since the previous call ended."""
        now = self.clock()
        if self._ended is not None:
            dt = max(0.0, now - self._ended)
            self.step_time = dt if self.step_time is None else 0.8 * self.step_time + 0.2 * dt
            self._started += 1
            if self._started < 3 or not self._started % 16:
                self.refresh()

    def step_ended(self) -> None:
        """At the end of ``scope.step()``."""
        self._ended = self.clock()

    def _steps_for(self, cost: float | None, share: float = 0.5) -> int:
        if self.step_time is None:
            return self.flush_every
        if cost is None:
            return 1  # measure it once
        k = math.ceil(cost / (self.budget * share * max(self.step_time, 1e-9)))
        return min(max(k, 1), self.flush_every)

    @property
    def every(self) -> int:
        """``k``: recorded steps between live evaluations (``flush_every``: none besides flushes)."""
        return self._steps_for(self.eval_time)

    @property
    def screen_every(self) -> int:
        """``k_s``: recorded steps between screens (``flush_every``: none besides flushes)."""
        return self._steps_for(self.screen_time, SCREEN_SHARE)

    def screen_due(self) -> bool:
        """Whether the screen should look at the new rows now."""
        k = self.k_screen = self.screen_every
        return k < self.flush_every and self.screen_waiting >= k

    def screened(self, seconds: float | None, *, live: bool = True) -> None:
        """A screen ran and took ``seconds`` (None: not timed; ``live=False``: a flush's, not in :attr:`screens`)."""
        self.screen_waiting = 0
        if live:
            self.screens += 1
        if seconds is not None:
            self.screen_time = _smoothed(self.screen_time, seconds, 0.8)
        self.k_screen = self.screen_every

    @property
    def settled(self) -> bool:
        """Whether ``flush_every`` step times have been measured.

        Before, ``k`` rests on the first steps of a run, often slow ones (warm-up, compilation), and
        the first flush judges its rows itself.
        """
        return self._started >= self.flush_every

    def due(self) -> bool:
        """Whether a live evaluation should run now (``k`` recorded steps waited, fewer than a flush)."""
        k = self.k_eval = self.every
        return k < self.flush_every and self.waiting >= k

    def evaluated(self, seconds: float | None = None, *, live: bool = True) -> None:
        """An evaluation ran and took ``seconds`` (None: not timed; ``live=False``: a flush's, not in :attr:`evaluations`)."""
        self.waiting = 0
        if seconds is not None:
            if live:
                self.evaluations += 1
            self.eval_time = _smoothed(self.eval_time, seconds, 0.5)
        self.k_eval = self.every


def _smoothed(estimate: float | None, seconds: float, keep: float) -> float:
    """An exponential moving average keeping ``keep`` of ``estimate``; a sample under half of it replaces it."""
    if estimate is None or seconds < 0.5 * estimate:
        return seconds
    return keep * estimate + (1.0 - keep) * seconds


class LiveScreen:
    """A cheap look at the newest rows: has a condition that a rule judges just started?

    The rules' conditions start from a few numbers per row, which the screen compares with what it saw
    before, over a block of rows at once (a fixed number of NumPy calls per block, whatever the number
    of rows or parameters). It flags:

    * ``nonfinite``: a gradient with a NaN/Inf entry (the ``nonfinite`` moment, or a non-finite sum of
      squares);
    * ``no_gradient``: no trainable parameter had a gradient (the whole step), or a parameter that
      had gradients has gone without one for :attr:`gap_rows` rows, or for more than twice its longest
      gap so far when that is longer (a parameter that gets a gradient now and then, the experts of a
      mixture-of-experts layer, a branch taken at some steps, is judged against its own gaps, as
      ``no_gradient`` judges it; not a parameter whose layer that rule has reported:
      :meth:`reported_params`);
    * ``shift``: a parameter's gradient RMS moved out of its band around its own running level (an
      exponential moving average of log10 RMS, after :attr:`warm_rows` rows), at two rows in a row: the
      start of a collapse or a blow-up (a one-row spike of a noisy bias is not, and does not move the
      level). The band is :attr:`decades` decades, or :data:`NOISE_FACTOR` times the parameter's mean
      deviation from its level when that is wider, up to :attr:`max_decades`: a gradient whose RMS
      moves most of a decade from batch to batch (the early layers of a deep tanh network) would
      otherwise flag again and again. Collapses no longer flag once :attr:`mute_down` is set
      (``vanishing_gradients`` has reported, which it does once a run), blow-ups once :attr:`mute_up` is;
    * ``activation``: a ReLU-family module with at least ``dead_threshold`` of its units dead, or a
      tanh/sigmoid module with ``saturated_threshold`` of its outputs saturated, on a sampled row
      (not a module whose finding of that kind a rule has reported: :meth:`reported`).

    Only what is *new* counts (a parameter or module flagged that was not at the previous row; a module
    flagged within :data:`ACT_REARM_ROWS` sampled rows of its last flag is not new), so a condition that
    persists, or hovers about its threshold, does not keep the rules running. The screen decides nothing: it only
    makes the rules run now; a false alarm of the screen costs time, never a finding.

    The rows of a block are compared with the level as it stood before the block (one row per block
    is the exact moving average; a block of ``n`` rows moves the level by the same weights at once).
    The common block, every gradient present, finite and within the band around its level, costs
    seven NumPy calls (the ratio to the level, its extremes, the level's update), or on a CPU buffer
    one call of the compiled kernel when this machine has it built
    (:func:`~gradscope.capture.kernels.cpu_screen_kernel`, the same arithmetic: between training steps,
    with cold caches, each NumPy call costs about 10 us); anything else takes the full path.

    Args:
        decades: the RMS jump that counts as a shift (the band of a steady gradient).
        max_decades: the widest band a noisy gradient gets.
        warm_rows: rows before shifts are looked for (the first steps of training move fast).
        gap_rows: rows without a gradient that count as a parameter having stopped getting one.
        gap_confirm_rows: ``no_gradient``'s ``confirm``, in rows: the rows the rules need to run after a gap
            flag (:attr:`gap_span`).
        dead_threshold: ``dead_units``' threshold.
        saturated_threshold: ``saturated_activations``' threshold.
    """

    def __init__(
        self,
        *,
        decades: float = 1.0,
        warm_rows: int = 10,
        gap_rows: int = 5,
        dead_threshold: float = 0.5,
        saturated_threshold: float = 0.5,
        max_decades: float = 2.0,
        gap_confirm_rows: int = 10,
    ) -> None:
        self.decades = float(decades)
        self.max_decades = max(float(max_decades), self.decades)
        self.warm_rows = int(warm_rows)
        self.gap_rows = int(gap_rows)
        self.gap_confirm_rows = int(gap_confirm_rows)
        #: After a block that flagged gaps alone: rows until ``no_gradient`` can confirm the longest of them
        #: (its ``confirm`` rows without a gradient; at once when the gap is that long already).
        self.gap_span = 0
        self.dead_threshold = float(dead_threshold)
        self.saturated_threshold = float(saturated_threshold)
        #: Last step screened.
        self.screened_step = 0
        # The level is kept in log10 of the sum of squares: log10 RMS = (that - log10 numel) / 2, so a
        # shift of `decades` in RMS is one of 2 * decades here, and the numel cancels.
        self._band = 10.0 ** (2.0 * self.decades)
        self._band_max = 10.0 ** (2.0 * self.max_decades)
        self._rows = 0
        self._P = -1
        self._level = np.zeros(0)  # [P] running log10 sum of squares (NaN: none seen yet)
        self._dev = np.zeros(0)  # [P] running mean of |log10 sum of squares - level| (0: none seen yet)
        self._inv = np.zeros(0)  # [P] 10 ** -level: the ratio of a row to the level is one multiplication
        self._watch: np.ndarray | None = None  # indices of the parameters with a level (None: all of them)
        self._inv_w = self._inv  # _inv of those
        self._shifted = np.zeros(0, dtype=bool)  # [P] flagged at the previous row
        self._held = np.zeros(0, dtype=bool)  # [P] shifted at the previous two rows
        self._bad = np.zeros(0, dtype=bool)  # [P] non-finite at the previous row
        self._gap = np.zeros(0, dtype=np.int64)  # [P] rows without a gradient, since the last one
        self._ever = np.zeros(0, dtype=bool)  # [P] had a gradient once
        self._closed = np.zeros(0, dtype=bool)  # [P] went without one and got it again (not steady)
        self._limit = np.zeros(0, dtype=np.int64)  # [P] the gap that flags: gap_rows, or 2 x the longest + 1
        self._gap_quiet = np.zeros(0, dtype=bool)  # [P] reported by no_gradient: never flagged again
        self._gap_muted: set[int] = set()  # (those parameters, kept for a new P)
        self._quiet = True  # nothing shifted or non-finite at the previous row: the fast path may run
        #: Shifts down (a collapse) no longer flag: ``vanishing_gradients`` has reported (once a run).
        self.mute_down = False
        #: Shifts up (a blow-up) no longer flag: ``exploding_gradients`` has reported (once a run).
        self.mute_up = False
        # (kind, module) whose finding a rule has reported: a crossing there can only update it, not flag
        self._act_reported: set[tuple[str, int]] = set()
        self._gaps_clean = True  # no gap counted, and the previous row had gradients
        self._none = False  # the previous row had no gradient at all
        #: Rows after the last one screened at which the first open gap of a *steady* parameter (one that
        #: had its gradient at every row so far, then lost it) reaches its limit: the live diagnosis screens
        #: that row, so the flag comes at the row that reaches the limit. :data:`_NEVER` when none is open.
        #: Parameters whose gradient comes and goes (an expert, a branch) are judged at the screen's cadence.
        self.gap_due = _NEVER
        self._steady_checked: tuple[Any, Any] | None = None  # (has, trainable) masks last found complete
        self._fresh: list[int] | None = None  # steady, not muted, with their gradient at the last row screened
        # [A] sampled rows since each activation module was last flagged, up to ACT_REARM_ROWS (armed)
        self._act: np.ndarray | None = None
        self._act_masks: tuple[Any, ...] | None = None
        self._act_tensor: tuple[np.ndarray, torch.Tensor] | None = None  # _act, and a tensor sharing it
        # EMA weights of the rows of a block, newest last: 0.2 * 0.8 ** (n - 1 - r)
        self._weights = 0.2 * 0.8 ** np.arange(64, dtype=np.float64)[::-1]
        # the mean deviation's: NOISE_RATE * (1 - NOISE_RATE) ** (n - 1 - r)
        self._dev_weights = NOISE_RATE * (1.0 - NOISE_RATE) ** np.arange(64, dtype=np.float64)[::-1]
        self._held_tensors: tuple[Any, ...] | None = None  # (level, inv, weights, dev, dev weights; their tensors)

    @property
    def warming(self) -> bool:
        """Whether the next block is screened on the full path for want of rows (the first :attr:`warm_rows`)."""
        return self._rows < self.warm_rows

    def _ensure(self, P: int) -> None:
        if self._P == P:
            return
        self._P = P
        self._level = np.full(P, np.nan)
        self._dev = np.zeros(P)
        self._inv = np.full(P, np.nan)
        self._watch = np.zeros(0, dtype=np.int64)
        self._inv_w = self._inv[:0]
        self._shifted = np.zeros(P, dtype=bool)
        self._held = np.zeros(P, dtype=bool)
        self._bad = np.zeros(P, dtype=bool)
        self._gap = np.zeros(P, dtype=np.int64)
        self._ever = np.zeros(P, dtype=bool)
        self._closed = np.zeros(P, dtype=bool)
        self._limit = np.full(P, self.gap_rows, dtype=np.int64)
        self._gap_quiet = np.zeros(P, dtype=bool)
        self._gap_quiet[[p for p in self._gap_muted if p < P]] = True
        self._quiet = False
        self._gaps_clean = False
        self._fresh = None

    def __getstate__(self) -> dict[str, Any]:
        # (a copy's tensors would not share the copied arrays' memory: it makes its own when it needs them)
        return {**self.__dict__, "_held_tensors": None, "_act_tensor": None}

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        """``_level``, ``_inv``, ``_weights``, ``_dev``, ``_dev_weights`` as tensors sharing their memory (made again when replaced)."""
        arrays = (self._level, self._inv, self._weights, self._dev, self._dev_weights)
        held = self._held_tensors
        if held is None or any(h is not a for h, a in zip(held, arrays)):
            held = self._held_tensors = (*arrays, *(torch.from_numpy(a) for a in arrays))
        return held[5:]

    def _factor(self) -> float:
        """NOISE_FACTOR over the weight the mean deviation has gathered (it starts from 0 at the second row, as Adam's moments)."""
        return NOISE_FACTOR / (1.0 - (1.0 - NOISE_RATE) ** max(self._rows - 1, 1))

    def _w(self, n: int) -> np.ndarray:
        if n > len(self._weights):
            self._weights = 0.2 * 0.8 ** np.arange(2 * n, dtype=np.float64)[::-1]
            self._dev_weights = NOISE_RATE * (1.0 - NOISE_RATE) ** np.arange(2 * n, dtype=np.float64)[::-1]
        return self._weights[len(self._weights) - n :]

    def _dw(self, n: int) -> np.ndarray:
        self._w(n)
        return self._dev_weights[len(self._dev_weights) - n :]

    def __call__(self, frame: StatsFrame, skip_activations: Sequence[int] = ()) -> list[str]:
        """Look at the frame's rows after :attr:`screened_step`; the reasons to run the rules now (often none).

        Args:
            frame: the host frame.
            skip_activations: activation modules not judged (output activations, saturated by design).
        """
        steps = frame.steps
        n = len(steps)
        if not n or steps[-1] <= self.screened_step:
            return []
        start = (
            n - 1
            if n < 2 or steps[-2] <= self.screened_step
            else int(np.searchsorted(steps, self.screened_step, "right"))
        )
        moments = frame.moments[start:]
        has, trainable, skipped = frame.has_grad[start:], frame.trainable[start:], frame.skipped[start:]
        act = None
        kinds = frame.schema.act_kinds
        if len(kinds):
            sampled = frame.sampled[start:]
            if sampled.any():
                act = (
                    frame.act_values("act_dead_fraction")[start:][sampled],
                    frame.act_values("act_saturated_fraction")[start:][sampled],
                )
        return sorted(
            self.block(
                int(steps[-1]),
                moments[:, :, _SUMSQ],
                moments[:, :, _NONFINITE],
                has,
                trainable,
                skipped if skipped.any() else None,
                act,
                kinds,
                skip_activations,
            )
        )

    def block(
        self,
        last_step: int,
        sumsq: np.ndarray,
        nonfinite: np.ndarray,
        has: np.ndarray | None,
        trainable: np.ndarray | None,
        skipped: np.ndarray | None,
        act: tuple[np.ndarray, np.ndarray] | None = None,
        act_kinds: Sequence[str] = (),
        skip_activations: Sequence[int] = (),
        *,
        suspect: bool = False,
        rows_at: tuple[torch.Tensor, int, int] | None = None,
        act_at: tuple[torch.Tensor, list[int], int, int] | None = None,
    ) -> set[str]:
        """Screen ``n`` new rows at once; the reasons to run the rules now (often none).

        Args:
            last_step: the step of the newest row (becomes :attr:`screened_step`).
            sumsq: ``[n, P]`` the ``sumsq`` moment of every parameter (NaN without a gradient).
            nonfinite: ``[n, P]`` the ``nonfinite`` moment.
            has: ``[n, P]`` a gradient was captured; None: every parameter had one and is trainable.
            trainable: ``[n, P]`` ``requires_grad`` (None with ``has``).
            skipped: ``[n]`` steps the optimizer skipped (GradScaler), or None when none was.
            act: ``(dead, saturated)``, each ``[S, A]``: the activation modules' dead and saturated
                fractions at the sampled rows among them, or None.
            act_kinds: the kind of each activation module (``"relu"``, ``"tanh"``...).
            skip_activations: activation modules not judged (output activations).
            suspect: a row is known to hold a non-finite count (the full path, which reads every parameter).
            rows_at: where ``sumsq`` lies in a CPU buffer, ``(storage, first, n_cols)``: rows ``first..`` of
                ``storage``, parameter ``p``'s sum of squares at column ``_SUMSQ + p * n_cols``. The common
                block is then one call of the compiled kernel when it is built (:func:`cpu_screen_kernel`).
            act_at: instead of ``act``, where the sampled rows' activation statistics lie in a CPU buffer,
                ``(storage, rows, a, n_act_cols)``: module ``j`` of row ``r`` at column ``a + j * n_act_cols``;
                read by the compiled kernel (the caller passes it only when that is built).
        """
        self.screened_step = last_step
        self._ensure(sumsq.shape[1])
        reasons: set[str] = set()
        self.gap_span = 0
        self.gap_due = _NEVER
        self._fresh = self._steady_checked = None  # (what the check of the rows to come compares with)
        if has is not None:
            self._gaps_block(has, trainable, reasons)
        elif not self._gaps_clean:  # every parameter had its gradient: the gaps counted close
            self._gaps_block(np.ones(sumsq.shape, dtype=bool), None, reasons)
        if skipped is not None:
            keep = ~skipped
            sumsq, nonfinite = sumsq[keep], nonfinite[keep]
            has = has[keep] if has is not None else None
        fast = self._quiet and not suspect and self._rows >= self.warm_rows
        if len(sumsq) and not (fast and self._fast(sumsq, nonfinite, has, None if skipped is not None else rows_at)):
            self._full(sumsq, nonfinite, has, reasons)
        if act_at is not None and len(act_at[1]) and len(act_kinds):
            if self._activations_at(act_at, act_kinds, skip_activations):
                reasons.add("activation")
        elif act is not None and len(act[0]) and len(act_kinds):
            if self._activations(act, act_kinds, skip_activations):
                reasons.add("activation")
        return reasons

    # -- the fast path: every gradient finite and inside the band around its level -----------------------
    def _fast(
        self,
        sumsq: np.ndarray,
        nonfinite: np.ndarray,
        has: np.ndarray | None,
        rows_at: tuple[torch.Tensor, int, int] | None = None,
    ) -> bool:
        watch = self._watch  # parameters with a level (None: all); one whose gradient is always 0 has none
        if rows_at is not None and has is None:
            kernel = cpu_screen_kernel()
            if kernel is not None:  # the same block in one call (the NumPy calls below cost ~10 us each, cold)
                # (the kernel leaves out the parameters without a level, as `watch` does below)
                n = len(sumsq)
                if n > len(self._weights):
                    self._w(n)
                level, inv, weights, dev, dev_weights = self._tensors()
                storage, first, n_cols = rows_at
                own = (self._factor(), 2.0 * self.max_decades)
                if not kernel(
                    storage, first, n, _SUMSQ, n_cols, level, inv, weights, self._band, dev, dev_weights, *own
                ):
                    return False
                self._rows += n
                return True
        if watch is not None:
            if not len(watch):
                return False
            sumsq = sumsq[:, watch]
            has = None if has is None else has[:, watch]
        ratio = sumsq * self._inv_w
        pos = None
        if has is None:
            # NaN (a non-finite gradient) propagates to the extremes: the full path
            lo, hi = np.minimum.reduce(ratio, axis=None), np.maximum.reduce(ratio, axis=None)
        else:
            # parameters without a gradient are NaN: ignored, so the non-finite counts are read instead
            if np.fmax.reduce(nonfinite, axis=None) > 0:
                return False
            lo, hi = 0.0, np.fmax.reduce(ratio, axis=None)
        if lo == 0.0:  # gradients that are exactly 0 (a unit silent for the whole batch) are left out, as below
            pos = ratio > 0
            lo = np.minimum.reduce(ratio, axis=None, where=pos, initial=np.inf)
        band = self._band
        wide = not (lo * band >= 1.0 and hi <= band)
        if wide and not (hi <= self._band_max and lo * self._band_max >= 1.0):
            return False  # beyond the widest band any parameter can have
        # the level moves by the weighted log-ratios, L += sum_r w_r (y_r - L), the moving average's update
        if pos is None:
            step = np.log10(ratio)
        else:
            step = np.zeros(ratio.shape)
            np.log10(ratio, out=step, where=pos)  # no gradient, or a zero one: the level stays
        size = np.abs(step)  # (0 where not positive)
        narrow = 2.0 * self.decades
        if wide:  # outside the common band: within the parameter's own? (a noisy gradient's, see _full)
            spread_now = self._dev if watch is None else self._dev[watch]
            if (size > np.clip(self._factor() * spread_now, narrow, 2.0 * self.max_decades)).any():
                return False
            size = np.minimum(size, narrow)
        move = self._w(len(ratio)) @ step
        # the mean deviation, over the positive ratios (the others keep it)
        dw = self._dw(len(ratio))
        kept = dw.sum() if pos is None else dw @ pos
        spread = dw @ size
        if watch is None:
            self._level += move
            np.power(0.1, self._level, out=self._inv)
            self._dev *= 1.0 - kept
            self._dev += spread
        else:
            level = self._level[watch] + move
            self._level[watch] = level
            self._inv_w = np.power(0.1, level)
            self._inv[watch] = self._inv_w
            self._dev[watch] = self._dev[watch] * (1.0 - kept) + spread
        self._rows += len(ratio)
        return True

    # -- the full path -----------------------------------------------------------------------------------
    def _full(self, sumsq: np.ndarray, nonfinite: np.ndarray, has: np.ndarray | None, reasons: set[str]) -> None:
        # Comparisons with NaN are False, so parameters without a gradient (NaN moments) drop out.
        nan = np.isnan(sumsq)
        bad = (nonfinite > 0) | np.isinf(sumsq) | (nan if has is None else nan & has)
        if bad.any():
            # new only: once NaN is in the weights every later row holds it (the rule reports once)
            if (bad > np.vstack([self._bad[None], bad[:-1]])).any():
                reasons.add("nonfinite")
            self._bad = bad[-1].copy()
        elif self._bad.any():
            self._bad = np.zeros(self._P, dtype=bool)
        y = np.full(sumsq.shape, np.nan)
        np.log10(sumsq, out=y, where=(sumsq > 0) & (sumsq < np.inf))
        level = self._level
        m = len(y)
        late = max(0, self.warm_rows - self._rows)  # rows of this block still in the warm-up
        # Each parameter's own band: `decades`, wider (up to `max_decades`) for a parameter whose gradient
        # RMS is noisy from row to row (NOISE_FACTOR times its mean deviation from the level), so that
        # its noise does not keep the rules running.
        signed = y - level
        deviation = np.abs(signed)
        shifted = deviation > np.clip(self._factor() * self._dev, 2.0 * self.decades, 2.0 * self.max_decades)
        # two rows in a row: a one-step spike of a noisy parameter (a bias, an embedding row) is not the
        # start of a collapse or a blow-up, which last
        held = shifted & np.vstack([self._shifted[None], shifted[:-1]])
        new = held > np.vstack([self._held[None], held[:-1]])
        if late < m and not (self.mute_down and self.mute_up):
            if self.mute_down or self.mute_up:  # one direction left to a rule that can still report
                new = new & ((signed > 0) if self.mute_down else (signed < 0))
            if new[late:].any():
                reasons.add("shift")
        self._shifted, self._held = shifted[-1].copy(), held[-1].copy()
        self._rows += m
        valid = ~np.isnan(y)
        # The mean deviation, each row's deviation counted up to `decades` (the fast path's rows lie within
        # it): a shift raises it by at most NOISE_RATE of that per row, so it does not hide its own second
        # row. The warm-up's rows count too (a band not yet learnt would be one decade for everyone).
        d = np.isfinite(deviation)
        dw = self._dw(m)
        self._dev = self._dev * (1.0 - dw @ d) + dw @ np.where(d, np.minimum(deviation, 2.0 * self.decades), 0.0)
        # A row out of the band that is not the second in a row (a spike, or the first row of a shift) does
        # not move the level: the next row is compared with the level from before it, so a shift is judged
        # on its full size at its second row, not on what is left once the level has chased it.
        moves = valid & ~(shifted & ~held)
        w = self._w(m)
        sw = w @ moves
        sy = w @ np.where(moves, y, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            self._level = np.where(np.isnan(level), np.where(sw > 0, sy / sw, np.nan), level * (1.0 - sw) + sy)
        self._inv = np.power(0.1, self._level)
        known = ~np.isnan(self._level)
        self._watch = None if known.all() else np.flatnonzero(known)
        self._inv_w = self._inv if self._watch is None else self._inv[self._watch]
        self._quiet = not (bad[-1].any() or shifted[-1].any())

    # -- gaps ----------------------------------------------------------------------------------------------
    def _gaps_block(self, has: np.ndarray, trainable: np.ndarray | None, reasons: set[str]) -> None:
        """Per parameter, the rows since its last gradient: a stop, or a step with no gradient at all.

        A parameter flags when its gap reaches its limit: ``gap_rows``, or twice the longest gap it
        has closed (had a gradient again after) plus one, when that is more. A branch used every
        other step, or an expert picked by a router at one step in three, so flags only when its
        gap is longer than it has been, not at every gap.
        """
        if trainable is None:
            trainable = np.ones_like(has)
        missing = trainable > has
        if self._gaps_clean and not missing.any():  # the common case: nothing counted, nothing missing
            self._ever |= has.any(axis=0)
            return
        watched = ~self._gap_quiet
        got = has & trainable
        # rows with no gradient anywhere: flagged when they start; they say nothing about one parameter
        none = ~got.any(axis=1)
        if none.any():
            if (none & ~np.concatenate([[self._none], none[:-1]])).any():
                reasons.add("no_gradient")
                self.gap_span = max(self.gap_span, self.gap_confirm_rows)
            keep = ~none
            got, missing = got[keep], missing[keep]
        self._none = bool(none[-1])
        m = len(got)
        if m:
            # Row by row, each parameter's gap would go: 0 at a row with its gradient, +1 at a row without
            # (not while frozen); a gap that closes raises the limit to 2 x gap + 1; a flag where the gap
            # reaches the limit. Written in closed form over the block (cumulative counts and scans), as
            # no_gradient's own update: a fixed number of NumPy calls, whatever the rows.
            index = np.arange(m)[:, None]
            last_got = np.maximum.accumulate(np.where(got, index, -1), axis=0)  # [m, P] the last row with one
            misses = np.cumsum(missing, axis=0)
            since: np.ndarray = misses - np.take_along_axis(misses, np.maximum(last_got, 0), axis=0)
            gap_after = np.where(last_got >= 0, since, self._gap[None, :] + misses)
            gap_before = np.concatenate([self._gap[None, :], gap_after[:-1]])
            ever_before = self._ever[None, :] | np.concatenate([np.zeros((1, got.shape[1]), bool), last_got[:-1] >= 0])
            closed = got & (gap_before > 0) & ever_before
            limit = np.maximum(
                self._limit[None, :], np.maximum.accumulate(np.where(closed, 2 * gap_before + 1, 0), axis=0)
            )
            hit = ever_before & watched[None, :] & (gap_after > 0) & (gap_after == limit)
            if hit.any():
                reasons.add("no_gradient")
                # the rule confirms at `confirm` rows (or at once past it): the rules run until then, not longer
                self.gap_span = max(self.gap_span, 1, self.gap_confirm_rows - int(limit[hit].min()) + 1)
            self._gap, self._limit = gap_after[-1].copy(), limit[-1].copy()
            self._ever |= got.any(axis=0)
            self._closed |= closed.any(axis=0)
        # a steady parameter's open gap, short of its limit: the row that reaches the limit is screened
        open_gaps = self._ever & watched & ~self._closed & (self._gap > 0) & (self._gap < self._limit)
        if open_gaps.any():
            self.gap_due = int((self._limit - self._gap)[open_gaps].min())
        self._gaps_clean = not (self._none or self._gap.any())

    def went_missing(self, has: np.ndarray, trainable: np.ndarray) -> bool:
        """Whether a row not screened yet lacks the gradient of a steady trainable parameter the screen saw last with one.

        ``has`` / ``trainable``: the row's masks ``[P]``. A parameter that always had its gradient and
        stops getting one (a detached branch) is then screened from the row it goes missing; one whose
        gradient comes and goes is not looked at here. The same masks as the last call since the last
        screen that found nothing (a partly frozen model's rows share theirs) cost one comparison; others a Python loop over the
        steady parameters, no NumPy call (it runs at every step of a mixture of experts, between
        training steps, where each NumPy call costs about 10 us).
        """
        checked = self._steady_checked
        if checked is not None and checked[0] is has and checked[1] is trainable:
            return False
        if len(has) != self._P:
            return False  # nothing screened yet: the first screen looks at every row
        fresh = self._fresh
        if fresh is None:  # (once per screen)
            steady = self._ever & ~self._closed & ~self._gap_quiet & (self._gap == 0)
            fresh = self._fresh = np.flatnonzero(steady).tolist()
        got, allowed = has.data, trainable.data  # (memoryviews: bools by index, no NumPy call)
        for i in fresh:
            if not got[i] and allowed[i]:
                return True
        self._steady_checked = (has, trainable)
        return False

    def reported_params(self, params: Sequence[int]) -> None:
        """``no_gradient`` reported the layer of ``params``: their gaps no longer flag (the rule follows them)."""
        self._gap_muted.update(int(p) for p in params)
        self._fresh = self._steady_checked = None
        if len(self._gap_quiet):
            self._gap_quiet[[p for p in params if p < len(self._gap_quiet)]] = True

    # -- activations ---------------------------------------------------------------------------------------
    def reported(self, kind: str, module: int) -> None:
        """A rule reported activation module ``module`` (``kind``: ``"dead"`` or ``"saturated"``): stop flagging it.

        A rule reports a (kind, module) once a run; later crossings only update that finding (its
        ``last_step``, ``resolved_step``), which the evaluations at the cadence do. Running the rules
        at once for them would find nothing new: in a deep ReLU network where many modules hover about
        the threshold it made them run for tens of steps after every few sampled steps.
        """
        self._act_reported.add((kind, int(module)))

    def _masks(self, kinds: Sequence[str], skip: Sequence[int]) -> tuple[Any, ...]:
        """``(key, relu, saturating, dead threshold, saturated threshold)`` per module, made once per set."""
        key = (tuple(kinds), tuple(skip), frozenset(self._act_reported))
        if self._act_masks is None or self._act_masks[0] != key:
            relu = np.array([k == "relu" for k in kinds], dtype=bool)
            saturating = np.array([k in _SATURATING for k in kinds], dtype=bool)
            saturating[list(skip)] = False
            for kind, a in self._act_reported:
                if a < len(kinds):
                    (relu if kind == "dead" else saturating)[a] = False
            dead_thr = torch.from_numpy(np.where(relu, self.dead_threshold, np.inf))
            sat_thr = torch.from_numpy(np.where(saturating, self.saturated_threshold, np.inf))
            self._act_masks = (key, relu, saturating, dead_thr, sat_thr)
        return self._act_masks

    def _act_quiet(self, n: int) -> np.ndarray:
        if self._act is None or len(self._act) != n:
            self._act = np.full(n, ACT_REARM_ROWS, dtype=np.int32)
        return self._act

    def _activations_at(
        self, act_at: tuple[torch.Tensor, list[int], int, int], kinds: Sequence[str], skip: Sequence[int]
    ) -> bool:
        """:meth:`_activations` in one call of the compiled kernel, reading the buffer in place."""
        kernel = cpu_act_screen_kernel()
        assert kernel is not None  # the caller passes act_at only then
        _, _, _, dead_thr, sat_thr = self._masks(kinds, skip)
        quiet = self._act_quiet(len(kinds))
        held = self._act_tensor
        if held is None or held[0] is not quiet:
            held = self._act_tensor = (quiet, torch.from_numpy(quiet))
        storage, rows, a, n_act_cols = act_at
        return bool(
            kernel(storage, rows, a, n_act_cols, _ACT_DEAD, _ACT_SATURATED, dead_thr, sat_thr, held[1], ACT_REARM_ROWS)
        )

    def _activations(self, act: tuple[np.ndarray, np.ndarray], kinds: Sequence[str], skip: Sequence[int]) -> bool:
        """Whether an activation module crossed its threshold *afresh* at the sampled rows ``act``.

        A module flagged again within :data:`ACT_REARM_ROWS` sampled rows of its last flag is not new:
        a fraction that hovers about its threshold (56 % dead, then 48 %, then 53 %) would otherwise
        make the rules run at every other sampled step for as long as it hovers. A row clearly below
        the thresholds (under half of each) re-arms the module at once.
        """
        _, relu, saturating, _, _ = self._masks(kinds, skip)
        dead, sat = act
        quiet = self._act_quiet(len(kinds))
        judged = relu | saturating
        fresh = False
        for d, s in zip(dead, sat):  # the sampled rows of the block, oldest first (usually one)
            with np.errstate(invalid="ignore"):
                # NaN (a module that did not run) compares False
                flags = (relu & (d >= self.dead_threshold)) | (saturating & (s >= self.saturated_threshold))
                ran = judged & ~((relu & np.isnan(d)) | (saturating & np.isnan(s)))
                clear = ran & ~flags & (~relu | (d < 0.5 * self.dead_threshold))
                clear &= ~saturating | (s < 0.5 * self.saturated_threshold)
            fresh = fresh or bool((flags & (quiet >= ACT_REARM_ROWS)).any())
            counted = ran & ~flags & ~clear
            quiet[counted] = np.minimum(quiet[counted] + 1, ACT_REARM_ROWS)
            quiet[clear] = ACT_REARM_ROWS
            quiet[flags] = 0
        return fresh


class Diagnosis:
    """Runs the rules on the frame (at flushes, live, provisionally) and hands new findings on.

    Args:
        engine: the scope's rule engine (its findings are the confirmed ones).
        recorder: the scope's step recorder (frame, buffer, rows waiting).
        order: the forward order (rule context).
        options: the scope's options (``on_finding``, ``stop_on``, ``every``, ``sample_every``, ``flush_every``).
        has_optimizer: whether the scope has an optimizer (rule context).
        dist: the distributed context.
        sinks: the scope's sinks (written at flushes).
        problem: ``problem(key, message)``: an error of gradscope itself, recorded, training goes on.
        clock: for :class:`LiveCadence`.
    """

    def __init__(
        self,
        *,
        engine: RuleEngine,
        recorder: StepRecorder,
        order: ForwardOrder,
        options: WatchOptions,
        has_optimizer: bool,
        dist: DistributedContext,
        sinks: Sequence[Sink],
        problem: Callable[[str, str], None],
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.engine = engine
        self.recorder = recorder
        self.cadence = LiveCadence(options.flush_every, clock=clock)
        self.sinks = sinks
        self._order = order
        self._options = options
        self._has_optimizer = has_optimizer
        self._dist = dist
        self._problem = problem
        self._judged_step = 0  # last step the engine has judged
        self._written_step = 0  # last step the sinks have been given
        self._unsent: list[Finding] = []  # confirmed since the last sink write
        self._unsent_updates: dict[tuple[str, str | None], Finding] = {}  # episodes changed since the last write
        self._stop: list[Finding] = []  # confirmed findings that stop_on selects, not raised yet
        #: Recorded steps not yet written by the sinks (a flush is due at ``flush_every``).
        self.unflushed = 0
        th = {rule.name: rule.thresholds for rule in engine.rules}
        #: The per-row screen that triggers full evaluations (see :class:`LiveScreen`).
        confirm = int(th.get("no_gradient", {}).get("confirm", 10))
        self.screen = LiveScreen(
            dead_threshold=float(th.get("dead_units", {}).get("threshold", 0.5)),
            saturated_threshold=float(th.get("saturated_activations", {}).get("threshold", 0.5)),
            gap_confirm_rows=max(1, -(-confirm // max(1, int(options.every)))),
        )
        self._hot_until = 0  # the rules run at every recorded step up to this step (after a screen flag)
        self._hot_acts = False  # ... at its sampled steps only (the flag was about activations alone)
        self._nan_seen = False  # the screen saw a non-finite gradient (the per-step check has done its job)
        buffer = recorder.buffer
        # A CPU buffer is host memory: the screen reads its rows in place (no copy, no frame) and the
        # newest row's non-finite counts are one NumPy reduction. None on an accelerator.
        self._host: np.ndarray | None = None
        self._nf_rows: list[np.ndarray] = []
        self._nf_all = self._sumsq_all = np.zeros((0, 0))
        self._flat: memoryview[Any] = memoryview(b"")
        self._row_size = self._n_cols = self._nf_span = 0
        self._zeros = b""
        if buffer.device.type == "cpu" and buffer.storage.dtype == torch.float64:
            # sync point: CPU tensors only; a view of the buffer's host memory, made once, nothing to wait for.
            self._host = buffer.storage.numpy()
            n_params, n_cols = buffer.shape_moments
            # per row, the `nonfinite` moment of every parameter: a strided view, made once per row
            self._nf_all = self._host[:, _NONFINITE : n_params * n_cols : n_cols]  # [capacity, P]
            self._sumsq_all = self._host[:, _SUMSQ : n_params * n_cols : n_cols]
            self._nf_rows = list(self._nf_all)
            # the same memory as a flat memoryview: slicing and comparing its bytes are plain C calls
            self._flat = self._host.data.cast("B").cast("d")
            self._row_size, self._n_cols = buffer.row_size, n_cols
            self._nf_span = n_params * n_cols - _NONFINITE
            self._zeros = bytes(8 * n_params)
        #: Called once, with the finding, when the first ``nonfinite_gradients`` finding is confirmed
        #: (:func:`gradscope.capture.nonfinite.auto_locate` arms the checks of the next forward).
        self.first_nonfinite: Callable[[Finding], None] | None = None
        self._first_nonfinite_done = False
        self._was_full = True  # the previous row had every gradient (the shared all-true mask)
        #: Why the screen last made the rules run, and at which step (for report.meta["live"]).
        self.last_trigger: tuple[int, list[str]] | None = None

    # -- running the engine ----------------------------------------------------------------------------
    def context(self, frame: StatsFrame, *, new_from: int, final: bool, step_count: int) -> RuleContext:
        """The rule context over ``frame``, rows from ``new_from`` new."""
        return RuleContext(
            frame=frame,
            new_from=new_from,
            forward_order=self._order.depth_order(),
            has_optimizer=self._has_optimizer,
            final=final,
            every=self._options.every,
            sample_every=self._options.sample_every,
            step_count=step_count,
            output_activations=tuple(self._order.output_activations()),
            nonfinite_counted=not self.recorder.moments.flags_nonfinite,
        )

    def _judge(self, *, final: bool, step_count: int) -> list[Finding]:
        frame = self.recorder.frame
        steps = frame.steps
        start = int(np.searchsorted(steps, self._judged_step, side="right"))
        if not len(steps) or (start == len(steps) and not final):
            return []
        new = self.engine.run(self.context(frame, new_from=start, final=final, step_count=step_count))
        self._judged_step = int(steps[-1])
        self._unsent.extend(new)
        for f in self.engine.updated:  # an episode that ended (or resumed): sinks write it as a new record
            self._unsent_updates[(f.kind, f.layer)] = f
        self._announce(new, step_count)
        return new

    def recorded(self) -> None:
        """A recorded step ended."""
        self.cadence.waiting += 1
        self.cadence.screen_waiting += 1
        self.unflushed += 1

    def live(self, step_count: int) -> None:
        """After ``scope.step()``: screen the new rows, and run the rules when due or when the screen asks.

        The rules run when the cadence says an evaluation is due, when the screen flags something
        new (then at every recorded step for :data:`HOT_STEPS` steps). Never in an active distributed run, nor
        without rules (nothing to judge: rows stay in the buffer until the flush).

        On a CPU the screen reads the new rows where they are, in the buffer's host memory: only
        rows the rules are about to judge are moved into the frame (``StepRecorder.stream``), so an
        ordinary step costs one reduction (the newest row's non-finite counts) and the screen, every
        ``k_s`` steps, a fixed number of NumPy calls. A sampled row (activation statistics) is screened
        at once.
        """
        if self._dist.active or not self.engine.rules:
            return
        cadence = self.cadence
        host = self._host
        if host is not None:
            rows = self.recorder.rows
            if not rows:
                return
            last = rows[-1]
            full = last.has_grad is last.trainable  # the shared all-true mask: every gradient present
            was_full, self._was_full = self._was_full, full
            # the newest row's non-finite counts, at every recorded step (NaN is judged at its own step)
            # known since the optimizer's pre-hook (the kernel's return, or pending_finite()): not read twice
            known = self.recorder.finite_known
            suspect = not (
                self._nan_seen
                or last.skipped
                or (known[1] if known[0] == last.step else self._row_finite(len(rows) - 1, full))
            )
            if (
                not suspect
                and not self._is_hot(step_count, last)
                and cadence.screen_waiting < cadence.k_screen
                and cadence.waiting < cadence.k_eval
                and not (last.sampled and self._acts)
                and not self._gap_check(last, full, was_full)
            ):
                return  # the ordinary step: counters compared, one row's non-finite counts read
        else:
            suspect = False
        rows = self.recorder.rows
        hot = self._is_hot(step_count, rows[-1] if rows else None) and cadence.waiting > 0
        if host is not None:
            screen = True
        else:
            screen = cadence.screen_due() or hot
            if rows:  # (the same look for a steady gradient's gap as on a CPU: host masks, no copy)
                last = rows[-1]
                full = last.has_grad is last.trainable
                was_full, self._was_full = self._was_full, full
                screen = screen or self._gap_check(last, full, was_full)
        evaluate = hot or cadence.due()
        if not (screen or evaluate):
            return
        clock = cadence.clock
        warming = self.screen.warming
        t0 = clock()
        try:
            if host is None:
                self.recorder.stream()
                reasons = self.screen(self.recorder.frame, self._order.output_activations()) if screen else []
            else:
                reasons = self._screen_host(suspect=suspect)  # before the rows move to the frame
                screen = True
            if screen:
                t1 = clock()
                cadence.screened(None if warming else t1 - t0)  # (the warm-up's full path: not what it costs later)
                t0 = t1
                if reasons:
                    self._triggered(reasons, step_count)
                    evaluate = True
            if evaluate:
                if host is not None:
                    self.recorder.stream()
                self._judge(final=False, step_count=step_count)
        except Exception as exc:  # monitoring must never stop training
            self._problem("live", f"live evaluation at step {step_count} failed: {type(exc).__name__}: {exc}")
        if evaluate:
            cadence.evaluated(clock() - t0)

    def _gap_check(self, last: RecordedRow, full: bool, was_full: bool) -> bool:
        """Whether row ``last`` is screened now for a steady gradient: it just went missing, or its gap reaches the limit here.

        ``full``: ``last`` has every gradient (``was_full``: the row before had). A parameter that had its
        gradient at every row and stops getting one is so flagged at the row its gap reaches the screen's
        limit, and ``no_gradient`` confirms it about ten steps after the stop, whatever ``k_s``.
        """
        if full:
            return False
        screen = self.screen
        return (
            was_full
            or self.cadence.screen_waiting >= screen.gap_due
            or screen.went_missing(last.has_grad, last.trainable)
        )

    def _live_judges(self, step_count: int) -> bool:
        """At a due flush: the live cadence will judge these rows before the next flush, and nothing is due now."""
        cadence = self.cadence
        if self._dist.active or not self.engine.rules or step_count <= self._hot_until or not cadence.settled:
            return False
        k = cadence.every
        return k < cadence.flush_every and cadence.waiting < k

    def _is_hot(self, step_count: int, last: RecordedRow | None) -> bool:
        """Whether the rules run at this step after a trigger (at sampled rows only, for activations alone)."""
        if step_count > self._hot_until:
            return False
        return not self._hot_acts or (last is not None and last.sampled)

    def _triggered(self, reasons: list[str], step_count: int) -> None:
        self._nan_seen = self._nan_seen or "nonfinite" in reasons
        acts_only = all(r == "activation" for r in reasons)
        if acts_only and not self._hot_acts and step_count <= self._hot_until:
            acts_only = False  # already running at every step for gradient evidence: keep that
        self._hot_acts = acts_only
        # Activation statistics arrive at sampled steps only: rules that confirm over 3 of them need 3 x sample_every.
        span = max(HOT_STEPS, 3 * self._options.sample_every) if acts_only else HOT_STEPS
        if reasons == ["no_gradient"]:
            # gaps alone: until no_gradient can confirm them (at once for a gap as long as its `confirm`), not
            # 25 steps (the experts of a mixture of experts flag now and then early in a run: 25 evaluations each)
            span = max(1, self.screen.gap_span)
        self._hot_until = max(self._hot_until, step_count + span)
        self.last_trigger = (step_count, reasons)
        self.cadence.triggered += 1

    @property
    def _acts(self) -> bool:
        return self.recorder.buffer.shape_act[0] > 0

    def _row_finite(self, slot: int, every: bool) -> bool:
        """On a CPU buffer, whether row ``slot`` holds only finite gradients (host memory, read in place).

        A NaN or Inf entry is then judged (and announced) at the step that produced it. With every
        gradient present the row's ``nonfinite`` counts are all exactly 0.0, i.e. zero bytes: one
        comparison of bytes, no NumPy call. Otherwise one reduction (NaN, no gradient, is ignored by
        ``fmax``). A norm that overflows with finite entries is left to the screen.

        ``every``: every watched tensor had its gradient captured in that row.
        """
        if every:
            start = slot * self._row_size + _NONFINITE
            return self._flat[start : start + self._nf_span : self._n_cols].tobytes() == self._zeros
        return not np.fmax.reduce(self._nf_rows[slot]) > 0

    def _screen_host(self, *, suspect: bool = False) -> list[str]:
        """Screen the rows waiting in a CPU buffer that the screen has not seen (in place, no copy)."""
        host = self._host
        recorder = self.recorder
        rows = recorder.rows
        screen = self.screen
        n = len(rows)
        first = n
        while first and rows[first - 1].step > screen.screened_step:
            first -= 1
        if first == n or host is None or recorder.buffer.used < n:
            return []
        new = rows[first:] if first else rows
        if all(r.has_grad is r.trainable for r in new):  # the shared all-true mask: every gradient present
            has = trainable = None
        else:
            has = np.stack([r.has_grad for r in new])
            trainable = np.stack([r.trainable for r in new])
        skipped = np.array([r.skipped for r in new]) if any(r.skipped for r in new) else None
        act = act_at = None
        buffer = recorder.buffer
        n_act, n_act_cols = buffer.shape_act
        if n_act:
            sampled = [first + i for i, r in enumerate(new) if r.sampled]
            if sampled:
                a = buffer.shape_moments[0] * buffer.shape_moments[1]
                if cpu_act_screen_kernel() is not None:  # read in place by the kernel: one call
                    act_at = (buffer.storage, sampled, a, n_act_cols)
                else:
                    stats = host[sampled, a : a + n_act * n_act_cols].reshape(len(sampled), n_act, n_act_cols)
                    act = (stats[:, :, _ACT_DEAD], stats[:, :, _ACT_SATURATED])
        found = screen.block(
            new[-1].step,
            self._sumsq_all[first:n],
            self._nf_all[first:n],
            has,
            trainable,
            skipped,
            act,
            recorder.schema.act_kinds,
            self._order.output_activations() if act is not None or act_at is not None else (),
            suspect=suspect,
            rows_at=(buffer.storage, first, self._n_cols),
            act_at=act_at,
        )
        return sorted(found)

    def flush(self, *, final: bool, collective: bool, step_count: int, due: bool = False) -> list[Finding]:
        """Commit the rows waiting, run the rules, write the sinks; the findings confirmed by this flush.

        ``due``: the flush ``scope.step()`` makes every ``flush_every`` steps. Its rules are left to
        the live cadence when that evaluates more often than flushes and no evaluation is due yet
        (nothing triggered, not hot): the rows are judged at the cadence's next evaluation, within
        ``k`` steps, as if no flush had fallen in between; running them here too would spend a full
        evaluation outside the live budget. ``flush()``, ``close()``, a distributed run and the first
        flush of a run (the cadence not settled yet, :attr:`LiveCadence.settled`) always judge.
        """
        cadence, clock = self.cadence, self.cadence.clock
        if self._host is not None and not self._dist.active and self.engine.rules and self.recorder.rows:
            try:  # the rows about to leave the buffer: the screen keeps its levels and counts continuous
                t0, seen, warming = clock(), self.screen.screened_step, self.screen.warming
                reasons = self._screen_host()
                if self.screen.screened_step != seen:  # it screened rows
                    # timed where the live screens are too rare to keep the estimate current (k_s = flush_every)
                    pinned = cadence.k_screen >= cadence.flush_every and not warming
                    cadence.screened(clock() - t0 if pinned else None, live=False)
                if reasons:
                    self._triggered(reasons, step_count)
            except Exception as exc:  # monitoring must never stop training
                self._problem("live", f"screening at step {step_count} failed: {type(exc).__name__}: {exc}")
        self.recorder.commit(collective=collective)
        self.unflushed = 0
        if due and not final and self._live_judges(step_count):
            new: list[Finding] = []
        else:
            t0, rows = clock(), cadence.waiting
            new = self._judge(final=final, step_count=step_count)
            # timed where no live evaluation keeps the estimate current (k = flush_every), when it judged
            # new rows and not in final mode (closing: never repeated)
            timed = rows and cadence.k_eval >= cadence.flush_every and not (final or self._dist.active)
            cadence.evaluated(clock() - t0 if timed else None, live=False)
        frame = self.recorder.frame
        start = int(np.searchsorted(frame.steps, self._written_step, side="right"))
        if start < len(frame) or final or self._unsent or self._unsent_updates:
            update = SinkUpdate(
                frame=frame,
                new_from=start,
                findings=self._unsent,
                layers_by_depth=self._order.layers_by_depth(),
                final=final,
                updated=list(self._unsent_updates.values()),
            )
            self._unsent = []
            self._unsent_updates = {}
            if len(frame):
                self._written_step = int(frame.steps[-1])
            for sink in self.sinks:
                try:
                    sink.write(update)
                except Exception as exc:
                    name = type(sink).__name__
                    self._problem(f"sink-{name}", f"{name}.write failed: {type(exc).__name__}: {exc}")
        return new

    # -- acting on findings ----------------------------------------------------------------------------
    def _quiet_screen(self, f: Finding) -> None:
        """What the screen need no longer flag once ``f`` is reported (a rule reports each of these once)."""
        screen = self.screen
        if f.kind == "vanishing_gradients":
            screen.mute_down = True
        elif f.kind == "exploding_gradients":
            screen.mute_up = True
        elif f.kind in ("dead_units", "saturated_activations"):
            modules = self.recorder.schema.act_modules
            if f.layer in modules:
                screen.reported("dead" if f.kind == "dead_units" else "saturated", modules.index(f.layer))
        elif f.kind == "no_gradient" and f.layer is not None:
            schema = self.recorder.schema
            if f.layer in schema.layers:
                screen.reported_params(schema.layer_members[schema.layers.index(f.layer)])

    def _announce(self, new: list[Finding], step_count: int) -> None:
        on_finding, stop_on = self._options.on_finding, self._options.stop_on
        for f in new:
            self._quiet_screen(f)
            log_finding(f, step_count)
            if on_finding is not None:
                try:
                    on_finding(f)
                except Exception as exc:  # the user's callback must not stop training
                    self._problem(
                        f"on-finding-{f.kind}-{f.layer}",
                        f"on_finding raised {type(exc).__name__}: {exc} for the {f.kind} finding at step {f.step}",
                    )
            if selects(stop_on, f):  # type: ignore[arg-type]  # WatchOptions normalised stop_on to a frozenset
                self._stop.append(f)
            if f.kind == "nonfinite_gradients" and not self._first_nonfinite_done and self.first_nonfinite is not None:
                self._first_nonfinite_done = True
                try:
                    self.first_nonfinite(f)
                except Exception as exc:  # monitoring must never stop training
                    self._problem(
                        "nonfinite-origin", f"arming the NaN origin checks failed: {type(exc).__name__}: {exc}"
                    )

    def amend(self, old: Finding, new: Finding) -> None:
        """Replace the kept finding ``old`` by ``new`` (more evidence): in the report, and for the sinks.

        The sinks get ``new`` with the next write, as the finding itself when ``old`` was not written
        yet, else as an update (a new record: what was written stays as it was).
        """
        findings = self.engine.findings
        for i, f in enumerate(findings):
            if f is old:
                findings[i] = new
        pending = [i for i, f in enumerate(self._unsent) if f is old]
        for i in pending:
            self._unsent[i] = new
        if not pending:
            self._unsent_updates[(new.kind, new.layer)] = new

    def pending_finite(self) -> bool:
        """On a CPU buffer, in the optimizer's pre-hook: the gradients just captured are all finite.

        False only when the row of the step in progress holds a non-finite count (the update about
        to run would write NaN/Inf into the weights). True when it cannot be known here (no row, an
        accelerator: reading it would be a device sync).
        """
        pending = self.recorder.pending
        if pending is None or not pending.grads_done or self._host is None:
            return True
        known = self.recorder.finite_known
        if known[0] == pending.step:
            return known[1]
        finite = self._row_finite(pending.slot, len(pending.present) == len(self._zeros) // 8)
        # live() reads the same counts at the end of the step: on a large model, a cold strided read of
        # one count per parameter tensor (tens of microseconds), done once.
        self.recorder.finite_known = (pending.step, finite)
        return finite

    def take_stop(self) -> list[Finding]:
        """The confirmed findings ``stop_on`` selected since the last call (``scope.step()`` raises on them)."""
        out, self._stop = self._stop, []
        return out

    # -- report() --------------------------------------------------------------------------------------
    def provisional(self, step_count: int) -> tuple[list[Finding], StatsFrame, dict[str, Any]]:
        """What ``close()`` would add if the run ended now, judged without touching the real engine.

        Non-distributed, the caller has flushed: the frame holds every finished row. In an active
        distributed run nothing collective happens: the frame (what the last flush reduced) is
        extended, on a copy, with this rank's rows not yet reduced (``StepRecorder.local_rows``).

        Returns:
            ``(findings, frame, live)``: the extra findings with ``provisional=True``, the frame they
            were judged on, and the facts for ``report.meta["live"]``.
        """
        recorder = self.recorder
        frame = recorder.frame
        reduced_to = int(frame.steps[-1]) if len(frame) else None
        start = len(frame)
        local = recorder.local_rows() if self._dist.active else None
        if local is not None:
            frame = frame.copy()
            frame.append(local, recorder.scalar_names, thin=False)
        live: dict[str, Any] = {
            "judged_to_step": int(frame.steps[-1]) if len(frame) else None,
            "pending_rows": recorder.waiting - (0 if local is None else len(local["steps"])),
            "evaluate_every": self.cadence.every,
            "live_evaluations": self.cadence.evaluations,
            "screen_every": self.cadence.screen_every,
            "screen_triggers": self.cadence.triggered,
        }
        if self._dist.active:
            live["reduced_to_step"] = reduced_to
            live["rank_local_steps"] = None if local is None else [int(local["steps"][0]), int(local["steps"][-1])]
        found: list[Finding] = []
        if len(frame):
            try:
                shadow = copy.deepcopy(self.engine)
            except Exception as exc:
                self._problem("provisional", f"report() could not copy the rules to judge the partial window: {exc}")
                shadow = None
            if shadow is not None:
                with warnings.catch_warnings():
                    # A rule that fails here fails again, and is reported, at close().
                    warnings.simplefilter("ignore")
                    new = shadow.run(self.context(frame, new_from=start, final=True, step_count=step_count))
                found = [dataclasses.replace(f, provisional=True) for f in new]
        live["provisional"] = len(found)
        return found, frame, live


def log_finding(finding: Finding, visible_at: int) -> None:
    """Announce a new confirmed finding on ``logging.getLogger("gradscope")``, one line, when it becomes visible.

    Called from the same place as ``on_finding`` (so once per finding, at the step ``visible_at`` it
    became visible), e.g. ``gradscope: step 120: vanishing_gradients in 'fc0' (since step 111): ...``.

    ``error`` findings at ERROR level, ``warning`` ones at WARNING. With logging not configured,
    Python's last-resort handler prints them to stderr; silence them with
    ``logging.getLogger("gradscope").setLevel(logging.CRITICAL)`` (or route them with handlers).
    """
    level = logging.ERROR if finding.severity == "error" else logging.WARNING
    if not logger.isEnabledFor(level):
        return
    where = repr(finding.layer) if finding.layer is not None else "the model"
    message = finding.message
    short = message if len(message) <= 160 else message[:157].rstrip() + "..."
    since = f" (since step {finding.step})" if finding.step != visible_at else ""
    logger.log(level, "step %d: %s in %s%s: %s", visible_at, finding.kind, where, since, short)


def stop_message(found: Sequence[Finding], stop_on: Any, step: int, written: str | None) -> str:
    """The message of the ``GradientHealthError`` that ``stop_on`` raises from ``scope.step()``."""
    names = ", ".join(sorted(stop_on)) if stop_on else ""
    where = (
        f"The report so far is written to {written!r}; leaving the `with` block (or scope.close()) completes it."
        if written
        else "Leave the `with` block or call scope.close() to write the outputs; scope.report() has the details."
    )
    lines = "\n".join(f"  {f}" for f in found)
    return f"gradscope stopped the run at step {step}: stop_on={{{names}}} selected\n{lines}\n{where}"
