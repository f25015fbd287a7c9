"""Live diagnosis: the rules judge the rows recorded so far, between flushes, within the overhead budget.

:class:`Diagnosis` runs the scope's :class:`~gradscope.rules.engine.RuleEngine` on the host frame and
hands each new **confirmed** finding on (sinks at the next flush, ``on_finding``, ``stop_on``):

* at every flush (``flush_every`` recorded steps, ``flush()``, ``close()``), as before;
* **live**, between flushes, every ``k`` recorded steps, where :class:`LiveCadence` picks ``k`` so
  that the host time of these evaluations stays about :data:`LIVE_BUDGET` of the training's own step
  time. The rows reach the host without a blocking device sync (``StepRecorder.stream``: read
  directly on a CPU, a non-blocking copy into pinned memory consumed once its event has completed on
  an accelerator). Sinks still write at flushes only. An active distributed run has no live
  evaluation: its rows become global only through the collective reduction of a flush, and a
  cadence measured per rank would not line up across ranks;
* for ``report()``, once more on a throw-away copy of the engine in final mode
  (:meth:`Diagnosis.provisional`): what ``close()`` would add if the run ended now, shown as
  **provisional** findings and never written anywhere. The real engine's state is untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradscope.findings import Finding, selects
from gradscope.rules.base import RuleContext
from gradscope.sinks.base import Sink, SinkUpdate

if TYPE_CHECKING:
    from gradscope.capture.distributed import DistributedContext
    from gradscope.capture.order import ForwardOrder
    from gradscope.capture.step import StepRecorder
    from gradscope.options import WatchOptions
    from gradscope.rules.engine import RuleEngine
    from gradscope.stats.frame import StatsFrame

__all__ = ["LIVE_BUDGET", "Diagnosis", "LiveCadence", "stop_message"]

#: Share of the training's own step time that live evaluations may take on the host, on average.
LIVE_BUDGET = 0.01


class LiveCadence:
    """How often the rules run live: every ``k`` recorded steps, ``k`` chosen from measured times.

    Policy: ``step_time`` is the wall time the training spends between two ``scope.step()`` calls
    (from the end of one call to the start of the next, so gradscope's own flushes and evaluations are
    not counted in it), and ``eval_time`` the wall time of one live evaluation; both are smoothed
    (exponential moving averages). An evaluation every ``k`` recorded steps costs
    ``eval_time / (k * step_time)`` of the run, so::

        k = clamp(ceil(eval_time / (budget * step_time)), 1, flush_every)

    A slow step (a real model, seconds per step) gets ``k = 1``: the rules see every step as it
    ends. Tiny steps (a toy model, a millisecond) get ``k = flush_every``, i.e. no evaluation besides
    the flushes. The first evaluation runs as soon as one step time is known, to measure
    ``eval_time``.

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

    @property
    def every(self) -> int:
        """``k``: recorded steps between live evaluations (``flush_every``: none besides flushes)."""
        if self.step_time is None:
            return self.flush_every
        if self.eval_time is None:
            return 1  # measure one evaluation
        k = math.ceil(self.eval_time / (self.budget * max(self.step_time, 1e-9)))
        return min(max(k, 1), self.flush_every)

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
        self._stop: list[Finding] = []  # confirmed findings that stop_on selects, not raised yet
        #: Recorded steps not yet written by the sinks (a flush is due at ``flush_every``).
        self.unflushed = 0

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
        self._announce(new)
        return new

    def recorded(self) -> None:
        """A recorded step ended."""
        self.cadence.waiting += 1
        self.unflushed += 1

    def live(self, step_count: int) -> None:
        """After ``scope.step()``: a live evaluation when the cadence says one is due.

        Never in an active distributed run, nor without rules (nothing to judge: rows stay in the
        buffer until the flush).
        """
        if self._dist.active or not self.engine.rules or not self.cadence.due():
            return
        t0 = self.cadence.clock()
        try:
            self.recorder.stream()
            self._judge(final=False, step_count=step_count)
        except Exception as exc:  # monitoring must never stop training
            self._problem("live", f"live evaluation at step {step_count} failed: {type(exc).__name__}: {exc}")
        self.cadence.evaluated(self.cadence.clock() - t0)

    def flush(self, *, final: bool, collective: bool, step_count: int) -> list[Finding]:
        """Commit the rows waiting, run the rules, write the sinks; the findings confirmed by this flush."""
        self.recorder.commit(collective=collective)
        self.unflushed = 0
        self.cadence.evaluated()
        new = self._judge(final=final, step_count=step_count)
        frame = self.recorder.frame
        start = int(np.searchsorted(frame.steps, self._written_step, side="right"))
        if start < len(frame) or final or self._unsent:
            update = SinkUpdate(
                frame=frame,
                new_from=start,
                findings=self._unsent,
                layers_by_depth=self._order.layers_by_depth(),
                final=final,
            )
            self._unsent = []
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
    def _announce(self, new: list[Finding]) -> None:
        on_finding, stop_on = self._options.on_finding, self._options.stop_on
        for f in new:
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
