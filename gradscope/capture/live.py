"""Live diagnosis: the rules judge the rows recorded so far, between flushes, within the overhead budget.

:class:`Diagnosis` runs the scope's :class:`~gradscope.rules.engine.RuleEngine` on the host frame and
hands each new **confirmed** finding on (sinks at the next flush, ``on_finding``, ``stop_on``):

* at every flush (``flush_every`` recorded steps, ``flush()``, ``close()``), as before;
* **live**, between flushes, every ``k`` recorded steps, where :class:`LiveCadence` picks ``k`` so
  that the host time of these evaluations stays about half of :data:`LIVE_BUDGET` of the training's
  own step time. The rows reach the host without a blocking device sync (``StepRecorder.stream``:
  read directly on a CPU, a non-blocking copy into pinned memory consumed once its event has
  completed on an accelerator). Sinks still write at flushes only. An active distributed run has no
  live evaluation: its rows become global only through the collective reduction of a flush, and a
  cadence measured per rank would not line up across ranks;
* **screened**: a full evaluation costs milliseconds, far more than 1% of a short step, so between
  them :class:`LiveScreen` looks at the few numbers of each new row that the rules' conditions start
  from (non-finite moments, a jump of a parameter's gradient RMS, a parameter that stops getting a
  gradient, an activation module crossing its rule's threshold). It costs tens of microseconds and
  runs every ``k_s`` steps, ``k_s`` from the other half of the budget (every step or few for a step
  of 20 ms or more). When it sees something new, the rules run at once and then at every recorded
  step for :data:`HOT_STEPS` steps, so that a rule's ``confirm`` span is judged as it completes. A
  healthy run rarely triggers it; a broken one pays a few milliseconds per step for a while. On a
  CPU, the newest row's non-finite counts are checked at every recorded step whatever ``k_s`` (host
  memory: a few microseconds), so a NaN is confirmed at the step that produced it;
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

from gradscope.findings import Finding, selects
from gradscope.rules.base import RuleContext
from gradscope.sinks.base import Sink, SinkUpdate
from gradscope.stats.moments import MOMENT_INDEX

if TYPE_CHECKING:
    from gradscope.capture.distributed import DistributedContext
    from gradscope.capture.order import ForwardOrder
    from gradscope.capture.step import StepRecorder
    from gradscope.options import WatchOptions
    from gradscope.rules.engine import RuleEngine
    from gradscope.stats.frame import StatsFrame

__all__ = ["HOT_STEPS", "LIVE_BUDGET", "Diagnosis", "LiveCadence", "LiveScreen", "log_finding", "stop_message"]

#: Share of the training's own step time that live evaluations may take on the host, on average: half
#: for the screen, half for the full evaluations at the cadence.
LIVE_BUDGET = 0.01

#: After the screen flags something new, the rules run at every recorded step for this many steps:
#: long enough for the ``confirm`` spans of the rules (10 steps; one sampled step for activations).
HOT_STEPS = 25

# The modules saturated_activations judges (gradscope.rules.activations; not imported: capture/ stays
# below rules/ families).
_SATURATING = ("tanh", "sigmoid", "hardtanh", "hardsigmoid")

_SUMSQ, _NONFINITE = MOMENT_INDEX["sumsq"], MOMENT_INDEX["nonfinite"]

#: The logger that announces each new finding as it becomes visible (``logging.getLogger("gradscope")``).
logger = logging.getLogger("gradscope")


class LiveCadence:
    """How often the rules run live: every ``k`` recorded steps, ``k`` chosen from measured times.

    Policy: ``step_time`` is the wall time the training spends between two ``scope.step()`` calls
    (from the end of one call to the start of the next, so gradscope's own flushes and evaluations are
    not counted in it), and ``eval_time`` the wall time of one live evaluation; both are smoothed
    (exponential moving averages). An evaluation every ``k`` recorded steps costs
    ``eval_time / (k * step_time)`` of the run, so::

        k = clamp(ceil(eval_time / (budget / 2 * step_time)), 1, flush_every)

    A slow step (a real model, seconds per step) gets ``k = 1``: the rules see every step as it
    ends. Tiny steps (a toy model, a millisecond) get ``k = flush_every``, i.e. no evaluation besides
    the flushes. The first evaluation runs as soon as one step time is known, to measure
    ``eval_time``. The screen (:class:`LiveScreen`) gets the other half of the budget the same way:
    every ``k_s = clamp(ceil(screen_time / (budget / 2 * step_time)), 1, flush_every)`` steps.

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

    def step_started(self) -> None:
        """At the start of ``scope.step()``: the training's time since the previous call ended."""
        now = self.clock()
        if self._ended is not None:
            dt = max(0.0, now - self._ended)
            self.step_time = dt if self.step_time is None else 0.8 * self.step_time + 0.2 * dt

    def step_ended(self) -> None:
        """At the end of ``scope.step()``."""
        self._ended = self.clock()

    def _steps_for(self, cost: float | None) -> int:
        if self.step_time is None:
            return self.flush_every
        if cost is None:
            return 1  # measure it once
        k = math.ceil(cost / (self.budget / 2 * max(self.step_time, 1e-9)))
        return min(max(k, 1), self.flush_every)

    @property
    def every(self) -> int:
        """``k``: recorded steps between live evaluations (``flush_every``: none besides flushes)."""
        return self._steps_for(self.eval_time)

    @property
    def screen_every(self) -> int:
        """``k_s``: recorded steps between screens (``flush_every``: none besides flushes)."""
        return self._steps_for(self.screen_time)

    def screen_due(self) -> bool:
        """Whether the screen should look at the new rows now."""
        k = self.screen_every
        return k < self.flush_every and self.screen_waiting >= k

    def screened(self, seconds: float) -> None:
        """A screen ran and took ``seconds``."""
        self.screen_waiting = 0
        self.screens += 1
        self.screen_time = seconds if self.screen_time is None else 0.8 * self.screen_time + 0.2 * seconds

    def due(self) -> bool:
        """Whether a live evaluation should run now (``k`` recorded steps waited, fewer than a flush)."""
        k = self.every
        return k < self.flush_every and self.waiting >= k

    def evaluated(self, seconds: float | None = None) -> None:
        """An evaluation ran (``seconds``: a live one, timed; None: at a flush)."""
        self.waiting = 0
        if seconds is not None:
            self.evaluations += 1
            self.eval_time = seconds if self.eval_time is None else 0.5 * self.eval_time + 0.5 * seconds


class LiveScreen:
    """A cheap look at the newest rows: has a condition that a rule judges just started?

    The rules' conditions start from a few numbers per row, which the screen compares with what it saw
    before (NumPy over ``[P]`` or ``[A]`` arrays, tens of microseconds per row). It flags:

    * ``nonfinite``: a gradient with a NaN/Inf entry (the ``nonfinite`` moment, or a non-finite sum of
      squares);
    * ``no_gradient``: no trainable parameter had a gradient (the whole step), or a parameter that
      had gradients has gone without one for :attr:`gap_rows` rows;
    * ``shift``: a parameter's gradient RMS moved more than :attr:`decades` decades away from its own
      running level (an exponential moving average of log10 RMS, after :attr:`warm_rows` rows), at two
      rows in a row: the start of a collapse or a blow-up (a one-row spike of a noisy bias is not);
    * ``activation``: a ReLU-family module with at least ``dead_threshold`` of its units dead, or a
      tanh/sigmoid module with ``saturated_threshold`` of its outputs saturated, on a sampled row.

    Only what is *new* counts (a parameter or module flagged that was not at the previous row), so a
    condition that persists does not keep the rules running. The screen decides nothing: it only
    makes the rules run now; a false alarm of the screen costs time, never a finding.

    Args:
        decades: the RMS jump that counts as a shift.
        warm_rows: rows before shifts are looked for (the first steps of training move fast).
        gap_rows: rows without a gradient that count as a parameter having stopped getting one.
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
    ) -> None:
        self.decades = float(decades)
        self.warm_rows = int(warm_rows)
        self.gap_rows = int(gap_rows)
        self.dead_threshold = float(dead_threshold)
        self.saturated_threshold = float(saturated_threshold)
        #: Last step screened.
        self.screened_step = 0
        self._rows = 0
        self._level: np.ndarray | None = None  # [P] running log10 RMS
        self._shifted: np.ndarray | None = None  # [P] flagged at the previous row
        self._gap: np.ndarray | None = None  # [P] rows without a gradient, since the last one
        self._ever: np.ndarray | None = None  # [P] had a gradient once
        self._act: np.ndarray | None = None  # [A] flagged at the previous sampled row
        self._none = False  # the previous row had no gradient at all
        self._numels = np.ones(0)
        self._bad = np.zeros(0, dtype=bool)  # [P] non-finite at the previous row
        self._held = np.zeros(0, dtype=bool)  # [P] shifted at the previous two rows

    def __call__(self, frame: StatsFrame, skip_activations: Sequence[int] = ()) -> list[str]:
        """Look at the frame's rows after :attr:`screened_step`; the reasons to run the rules now (often none).

        Args:
            frame: the host frame.
            skip_activations: activation modules not judged (output activations, saturated by design).
        """
        arrays = {name: getattr(frame, name) for name in ("steps", "skipped", "has_grad", "trainable", "moments")}
        steps = arrays["steps"]
        n = len(steps)
        if not n or steps[-1] <= self.screened_step:
            return []
        start = (
            n - 1
            if n < 2 or steps[-2] <= self.screened_step
            else int(np.searchsorted(steps, self.screened_step, "right"))
        )
        self.screened_step = int(steps[-1])
        has = arrays["has_grad"][start:]
        trainable = arrays["trainable"][start:]
        moments = arrays["moments"][start:]
        P = has.shape[1]
        if self._level is None or len(self._level) != P:
            self._level = np.full(P, np.nan)
            self._shifted = np.zeros(P, dtype=bool)
            self._gap = np.zeros(P, dtype=np.int64)
            self._ever = np.zeros(P, dtype=bool)
            self._bad = np.zeros(P, dtype=bool)
            self._held = np.zeros(P, dtype=bool)
            self._numels = np.asarray(frame.schema.numels, dtype=np.float64)
        reasons: set[str] = set()
        # Comparisons with NaN are False, so parameters without a gradient (NaN moments) drop out
        # without masks: the fewer NumPy calls, the cheaper the screen (its cost is their count).
        sumsq = moments[:, :, _SUMSQ]
        skipped = arrays["skipped"][start:]
        bad = (moments[:, :, _NONFINITE] > 0) | np.isinf(sumsq) | (np.isnan(sumsq) & has)
        bad[skipped] = False  # a step GradScaler skipped for its inf is not judged (nor is its NaN news)
        if bad.any():
            # new only: once NaN is in the weights every later row holds it (the rule reports once)
            if (bad > self._bad).any():
                reasons.add("nonfinite")
            self._bad = bad[-1]
        elif self._bad.any():
            self._bad = np.zeros(P, dtype=bool)
        log_ms = np.full(sumsq.shape, np.nan)
        np.log10(sumsq / self._numels, out=log_ms, where=sumsq > 0)
        for r in range(len(skipped)):
            self._gaps(has[r], trainable[r], reasons)
            if skipped[r]:
                continue
            x = 0.5 * log_ms[r]  # log10 RMS; NaN without a gradient, or a zero one
            level = self._level
            shifted = np.abs(x - level) > self.decades
            # two rows in a row: a one-step spike of a noisy parameter (a bias, an embedding row) is
            # not the start of a collapse or a blow-up, which last
            held = shifted & self._shifted
            if self._rows >= self.warm_rows and (held > self._held).any():
                reasons.add("shift")
            self._shifted, self._held = shifted, held
            self._level = np.where(np.isnan(x), level, np.where(np.isnan(level), x, 0.8 * level + 0.2 * x))
            self._rows += 1
        if len(frame.schema.act_kinds):
            sampled = frame.sampled[start:]
            if sampled.any():
                reasons |= self._activations(frame, start, sampled, skip_activations)
        return sorted(reasons)

    def _gaps(self, has: np.ndarray, trainable: np.ndarray, reasons: set[str]) -> None:
        """Per parameter, the rows since its last gradient: a stop, or a step with no gradient at all."""
        missing = trainable > has
        if not missing.any():  # the common case: every trainable parameter has its gradient
            self._none = False
            if self._gap is not None and self._gap.any():
                self._gap[:] = 0
            if self._ever is not None and not self._ever.all():
                self._ever |= has
            return
        assert self._gap is not None and self._ever is not None
        got = has & trainable
        none = not got.any()
        if none and not self._none:
            reasons.add("no_gradient")
        self._none = none
        self._gap = np.where(got, 0, self._gap + missing)
        if (self._ever & (self._gap == self.gap_rows)).any():
            reasons.add("no_gradient")
        self._ever |= got

    def _activations(self, frame: StatsFrame, start: int, sampled: np.ndarray, skip: Sequence[int]) -> set[str]:
        kinds = frame.schema.act_kinds
        relu = np.array([k == "relu" for k in kinds])
        saturating = np.array([k in _SATURATING for k in kinds])
        saturating[list(skip)] = False
        dead = frame.act_values("act_dead_fraction")[start:][sampled]
        sat = frame.act_values("act_saturated_fraction")[start:][sampled]
        flags = (relu & (np.nan_to_num(dead, nan=0.0) >= self.dead_threshold)) | (
            saturating & (np.nan_to_num(sat, nan=0.0) >= self.saturated_threshold)
        )
        prev = self._act if self._act is not None and len(self._act) == len(kinds) else np.zeros(len(kinds), bool)
        new = False
        for row in flags:
            new = new or bool((row & ~prev).any())
            prev = row
        self._act = prev
        return {"activation"} if new else set()


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
        self.screen = LiveScreen(
            dead_threshold=float(th.get("dead_units", {}).get("threshold", 0.5)),
            saturated_threshold=float(th.get("saturated_activations", {}).get("threshold", 0.5)),
        )
        self._hot_until = 0  # the rules run at every recorded step up to this step (after a screen flag)
        self._nan_seen = False  # the screen saw a non-finite gradient (the per-step check has done its job)
        self._host: tuple[Any, np.ndarray] | None = None  # (the CPU buffer's storage, its NumPy view)
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
        """
        if self._dist.active or not self.engine.rules:
            return
        cadence = self.cadence
        hot = step_count <= self._hot_until and cadence.waiting > 0
        screen = cadence.screen_due() or hot or self._nonfinite_now()
        evaluate = hot or cadence.due()
        if not (screen or evaluate):
            return
        clock = cadence.clock
        t0 = clock()
        try:
            self.recorder.stream()
            if screen:
                reasons = self.screen(self.recorder.frame, self._order.output_activations())
                t1 = clock()
                cadence.screened(t1 - t0)
                t0 = t1
                self._nan_seen = self._nan_seen or "nonfinite" in reasons
                if reasons:
                    self._hot_until = step_count + HOT_STEPS
                    self.last_trigger = (step_count, reasons)
                    cadence.triggered += 1
                    evaluate = True
            if evaluate:
                self._judge(final=False, step_count=step_count)
        except Exception as exc:  # monitoring must never stop training
            self._problem("live", f"live evaluation at step {step_count} failed: {type(exc).__name__}: {exc}")
        if evaluate:
            cadence.evaluated(clock() - t0)

    def _nonfinite_now(self) -> bool:
        """On a CPU buffer, whether the newest finished row holds a non-finite gradient.

        The row is host memory there, so this is one comparison of its ``nonfinite`` moments (a
        strided NumPy view, a few microseconds), at every recorded step: a NaN or Inf entry is judged
        (and announced) at the step that produced it. A norm that overflows with finite entries is
        left to the screen. On an accelerator the row would have to
        be copied, so the screen sees it when the streamed copy is consumed (the next due screen).
        """
        recorder = self.recorder
        buffer = recorder.buffer
        used = buffer.used
        if self._nan_seen or not used or not recorder.rows or buffer.device.type != "cpu":
            return False
        if recorder.rows[-1].skipped:
            return False  # GradScaler skipped it for its inf: not judged  # after the first NaN the weights usually hold it: nonfinite_gradients reports once
        storage = buffer.storage
        if self._host is None or self._host[0] is not storage:
            # sync point: CPU tensors only; a view of the buffer's host memory, made once, nothing to wait for.
            self._host = (storage, storage.numpy())
        n_params, n_cols = buffer.shape_moments
        # the newest row's `nonfinite` moment of every parameter (NaN, so False, where none had a gradient)
        counts = self._host[1][used - 1, _NONFINITE : n_params * n_cols : n_cols]
        return bool((counts > 0).any())

    def flush(self, *, final: bool, collective: bool, step_count: int) -> list[Finding]:
        """Commit the rows waiting, run the rules, write the sinks; the findings confirmed by this flush."""
        self.recorder.commit(collective=collective)
        self.unflushed = 0
        self.cadence.evaluated()
        new = self._judge(final=final, step_count=step_count)
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
    def _announce(self, new: list[Finding], step_count: int) -> None:
        on_finding, stop_on = self._options.on_finding, self._options.stop_on
        for f in new:
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
