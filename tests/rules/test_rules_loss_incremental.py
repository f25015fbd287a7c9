"""The loss rules judged live, step by step, give what one judgement of the run so far gives, field by field.

Live, the engine runs the rules on the rows added since its last run (``new_from``), and ``report()``
judges a deep copy of the rules as if the run ended there (``final=True``). The loss rules keep
incremental state (the spike trend's history, the run's start, the stall being judged, the validation
curve), so these tests check that state against a fresh rule that sees the whole run at once, at every
step, on seeded runs where each rule fires: a spike, a flat loss, a stall after progress, overfitting.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from rulekit import build_frame, chain, context

from gradscope.rules import LossNotDecreasing, Overfitting
from gradscope.rules.engine import RuleEngine
from gradscope.rules.spike import LossSpike
from gradscope.stats.frame import StatsFrame


def _fields(findings: list) -> list[tuple]:
    return [
        (f.kind, f.severity, f.step, f.layer, f.message, f.suggestion, repr(f.evidence), f.last_step, f.resolved_step)
        for f in findings
    ]


def _fresh(make, frame: StatsFrame, rows: int, **extra) -> list:
    """One judgement of the first ``rows`` rows by a new rule, as ``close()`` would give at that step."""
    part = StatsFrame(frame.schema)
    part.append({k: v[:rows] for k, v in frame._arrays().items()}, frame.scalar_names)
    engine = RuleEngine([make()])
    engine.run(context(part, new_from=0, final=True, **extra))
    assert not engine.errors, engine.errors
    return engine.findings


def _live_equals_fresh(make, frame: StatsFrame, *, every_step_from: int = 1, **extra) -> list:
    """Feed ``frame`` one row at a time; at each step ``report()``'s view (a deep copy judged with
    ``final=True``) must equal a fresh judgement of the rows so far. Returns the live findings at the end."""
    engine = RuleEngine([make()])
    arrays = frame._arrays()
    grown = StatsFrame(frame.schema)
    for row in range(len(frame)):
        grown.append({k: v[row : row + 1] for k, v in arrays.items()}, frame.scalar_names)
        engine.run(context(grown, new_from=row, final=False, **extra))
        if row + 1 >= every_step_from:
            before = _fields(engine.findings)
            shadow = copy.deepcopy(engine)
            shadow.run(context(grown, new_from=len(grown), final=True, **extra))
            assert _fields(engine.findings) == before  # the copy leaves the live rule alone
            assert _fields(shadow.findings) == _fields(_fresh(make, frame, row + 1, **extra)), f"at step {row + 1}"
    engine.run(context(grown, new_from=len(grown), final=True, **extra))  # close()
    assert not engine.errors, engine.errors
    return engine.findings


def _spike_run(n: int = 160, at: int = 120, restart: int = 60) -> StatsFrame:
    """A decaying noisy loss, a declared restart (phase 1 from ``restart``), a bad batch at ``at``."""
    rng = np.random.default_rng(3)
    t = np.arange(1, n + 1)
    loss = 0.3 + 2.0 * np.exp(-t / 40) + rng.normal(0, 0.02, n)
    loss[t >= restart] += 0.8 * np.exp(-(t[t >= restart] - restart) / 10)  # the restart's own bump
    loss[at - 1] = 4.0
    rms = np.exp(rng.normal(0, 0.05, (n, 3))) * 1e-2
    rms[at - 2 : at, 2] *= 12  # the head's gradient rose in the steps before
    phase = np.where(t >= restart, 1.0, 0.0)
    phase[1::3] = np.nan  # declared on some steps only: a phase holds until the next one
    return build_frame(chain(3), rms=rms, scalars={"loss": loss, "phase": phase})


def test_a_spike_judged_live_is_the_spike_judged_at_the_end() -> None:
    (f,) = _live_equals_fresh(LossSpike, _spike_run())
    assert (f.kind, f.step, f.layer, f.resolved_step) == ("loss_spike", 120, "head", 121)


def test_a_flat_loss_judged_live_is_the_flat_loss_judged_at_the_end() -> None:
    rng = np.random.default_rng(4)
    frame = build_frame(chain(2), rms=np.full((130, 2), 1e-2), scalars={"loss": 2.3 + rng.normal(0, 0.02, 130)})
    (f,) = _live_equals_fresh(LossNotDecreasing, frame)
    assert (f.step, f.evidence["window"]) == (1, [1, 100])


def _stalled(n: int = 260, stop: int = 160, fall: int = 0, noise: float = 0.12) -> StatsFrame:
    """Loss falling from 2.3, noisy; the optimizer stops at step ``stop`` (update ratio 0), sampled every 10.

    With ``fall``, the loss goes on falling (0.01 per step) for ``fall`` steps after the stop.
    """
    rng = np.random.default_rng(0)
    t = np.arange(1, n + 1)
    loss = 0.75 + 1.55 * np.exp(-t / 20) - 0.0002 * np.minimum(t, stop) + rng.normal(0, noise, n)
    loss -= 0.01 * np.clip(t - stop, 0, fall)
    ratio = np.where(t >= stop, 0.0, 1e-2)
    return build_frame(
        chain(2),
        rms=np.full((n, 2), 1e-2),
        scalars={"loss": loss},
        update_ratio=np.tile(ratio[:, None], (1, 2)),
        sampled=(t - 1) % 10 == 0,
    )


@pytest.mark.parametrize(("fall", "noise", "established"), [(0, 0.12, 189), (20, 0.03, 260)])
def test_a_stall_after_progress_is_described_as_established_whenever_it_is_judged(
    fall: int, noise: float, established: int
) -> None:
    # The ratio collapses at step 160, first sampled at 161. The stall is established once `min_steps`
    # (20) losses since show no established decrease and 9 more keep it so (10 prefixes in a row): 189
    # for a loss that stops at once (20 losses at 180, + 9); 252 for one that goes on falling for 20
    # steps on its momentum (a quieter loss, so the fall is established for longer: a first flat prefix at
    # 243 is followed by established ones; the 10 in a row complete at 260, the end of the data).
    # Compared at every step from 150 on.
    make = lambda: _stalled(fall=fall, noise=noise)  # noqa: E731 - a fresh frame per use
    (f,) = _live_equals_fresh(LossNotDecreasing, make(), every_step_from=150, sample_every=10)
    last = max(251, established)  # the episode reaches the step it is established at
    assert (f.step, f.evidence["window"], f.last_step, f.resolved_step) == (161, [161, established], last, None)
    # flush by flush, at any cadence: the same finding
    for chunk in (7, 50):
        engine = RuleEngine([LossNotDecreasing()])
        frame = make()
        grown = StatsFrame(frame.schema)
        for start in range(0, len(frame), chunk):
            grown.append({k: v[start : start + chunk] for k, v in frame._arrays().items()}, frame.scalar_names)
            engine.run(context(grown, new_from=start, final=start + chunk >= len(frame), sample_every=10))
        assert _fields(engine.findings) == _fields([f])


def test_overfitting_judged_live_is_overfitting_judged_at_the_end() -> None:
    n = 150
    train = 2.0 - 0.01 * np.arange(n)
    val = np.full(n, np.nan)
    val[9::10] = [2.0, 1.8, 1.6, 1.5, 1.45, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3]
    frame = build_frame(chain(2), rms=np.full((n, 2), 1e-2), scalars={"loss": train, "val_loss": val})
    (f,) = _live_equals_fresh(Overfitting, frame)
    assert (f.step, f.evidence["best_step"]) == (70, 60)


# -- a loss leaving its plateau is not a stall --------------------------------------------------------------


def _plateau(drop_from: int | None, n: int = 40, e: float = 0.01) -> StatsFrame:
    """``4 + e (-1)^t`` for t = 0..n-1, and ``3.6 + e (-1)^t`` from ``t = drop_from`` on."""
    t = np.arange(n)
    level = np.where(t >= (drop_from if drop_from is not None else n), 3.6, 4.0)
    return build_frame(chain(2), rms=np.full((n, 2), 1e-2), scalars={"loss": level + e * (-1.0) ** t})


def test_a_loss_leaving_its_plateau_is_not_called_stalled_worked_by_hand() -> None:
    # A run of 40 steps judged at its end (close(), or report()): one window of 40, halves of 20, the
    # decrease tested pro rata: 2% x 40/100 = 0.8% of 4.0 = 0.032.
    # Flat: a = b = 4.0 (ten values 4 + e and ten 4 - e in each half); the second differences are
    # +-4e, so their MAD is 4e and sigma = 1.4826 x 0.04 / sqrt(6) = 0.024213; se = 1.2533 sigma
    # sqrt(2/20) = 0.0095963. (a - b) + 2 se = 0.019193 < 0.032: a 0.8% drop is excluded, a stall.
    sigma = 1.4826 * 0.04 / math.sqrt(6)
    se = 1.2533 * sigma * math.sqrt(2 / 20)
    assert 0 + 2 * se < 0.032
    (f,) = LossNotDecreasing().check(context(_plateau(None), final=True))
    assert f.step == 1
    assert (f.evidence["median_first_half"], f.evidence["median_second_half"]) == pytest.approx((4.0, 4.0), abs=1e-12)
    assert f.evidence["noise"] == pytest.approx(sigma, rel=1e-9)
    assert f.evidence["threshold_decrease"] == pytest.approx(0.008)
    # The loss drops by 10% at t = 35 (the last 5 steps). Halves: a = 4.0; the second half holds 15
    # values at 4 +- e and 5 at 3.6 +- e, so its median is 4 - e = 3.99; the two second differences
    # at the drop are -0.4 - 4e and 0.4 + 4e, which leave the median (0) and the MAD (4e) as they
    # were: (a - b) + 2 se = 0.01 + 0.019193 = 0.029193 < 0.032, the halves alone call it a stall.
    assert 0.01 + 2 * se < 0.032
    # The last quarter (10 losses: 4 +- e five times, 3.6 +- e five times) has median 3.8, and its
    # standard error against the first half is 1.2533 sigma sqrt(1/20 + 1/10) = 0.011753: the drop
    # is established, 0.2 - 2 x 0.011753 = 0.1765 > 0.032: the loss is leaving its plateau, no finding.
    se_q = 1.2533 * sigma * math.sqrt(1 / 20 + 1 / 10)
    assert 0.2 - 2 * se_q > 0.032
    assert LossNotDecreasing().check(context(_plateau(35), final=True)) == []
    # a drop of the same size in the last 2 steps only: the last quarter's median is still 4 - e, a stall
    assert len(LossNotDecreasing().check(context(_plateau(38), final=True))) == 1
