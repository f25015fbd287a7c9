"""The live path's cheap screen (issue 13 cost, issue 12 latency): what it computes, not how fast.

The screen looks at blocks of new rows with a fixed number of NumPy calls; on a CPU it reads them
in place in the buffer's host memory, so an ordinary step moves nothing into the frame. These
tests check its arithmetic against a hand-written reference (the moving average of log10 RMS, one
row at a time), that a block judges like the same rows one at a time, and that short steps get
their findings between flushes. Timing is printed by benchmarks, never asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradscope
from gradscope.capture.live import NOISE_FACTOR, LiveScreen


def _rows(n: int, P: int, seed: int, scale=1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.exp(rng.normal(0.0, 0.3, size=(n, P))) * np.asarray(scale)) ** 2  # sums of squares


def test_the_level_is_the_moving_average_of_log10_rms_in_blocks_as_row_by_row():
    P, numel = 5, np.array([4.0, 9.0, 16.0, 25.0, 100.0])
    sumsq = _rows(40, P, 0, scale=np.sqrt(numel) * 1e-2)
    nonfinite = np.zeros_like(sumsq)
    # the reference: the exponential moving average (weight 0.2) of log10 RMS, one row at a time
    level = 0.5 * np.log10(sumsq[0] / numel)
    for row in sumsq[1:]:
        level = 0.8 * level + 0.2 * 0.5 * np.log10(row / numel)
    for sizes in ([1] * 40, [1, 3, 7, 9, 20], [12, 28]):
        screen = LiveScreen()
        at, step = 0, 0
        for n in sizes:
            step += n
            assert screen.block(step, sumsq[at : at + n], nonfinite[at : at + n], None, None, None) == set()
            at += n
        # the screen keeps log10 of the sum of squares: RMS level = (that - log10 numel) / 2
        got = 0.5 * (screen._level - np.log10(numel))
        if sizes[0] == 1:
            np.testing.assert_allclose(got, level, rtol=0, atol=1e-12)
        else:  # a first block of n rows starts from their weighted mean instead of the first row
            np.testing.assert_allclose(got, level, rtol=0, atol=0.05)


def test_a_block_flags_what_the_same_rows_flag_one_at_a_time():
    P, n = 4, 60
    sumsq = _rows(n, P, 1, scale=1e-2)
    nonfinite = np.zeros((n, P))
    has = np.ones((n, P), dtype=bool)
    trainable = np.ones((n, P), dtype=bool)
    sumsq[30:, 1] *= 1e-6  # parameter 1's RMS falls 3 decades from row 30 on and stays there
    nonfinite[44, 2], sumsq[44, 2] = 3.0, np.nan  # a NaN at row 44
    has[50:, 3], sumsq[50:, 3] = False, np.nan  # parameter 3 gets no gradient from row 50 on

    def run(size: int) -> dict[str, int]:
        screen, first = LiveScreen(), {}
        for at in range(0, n, size):
            sl = slice(at, min(n, at + size))
            for reason in screen.block(sl.stop, sumsq[sl], nonfinite[sl], has[sl], trainable[sl], None):
                first.setdefault(reason, sl.stop)
        return first

    one = run(1)
    # row by row: the shift at its second row (31), the NaN at 45, the 5th row without a gradient at 55
    assert one == {"shift": 32, "nonfinite": 45, "no_gradient": 55}
    for size in (4, 7, 10):
        blocks = run(size)
        assert set(blocks) == set(one)
        for reason, row in one.items():  # seen in the block that holds the row
            assert row <= blocks[reason] < row + size


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


@pytest.mark.parametrize(
    ("activations", "in_place"),
    [(True, True), (False, True), (False, False)],
    ids=["activations", "no-activations", "accelerator-path"],
)
def test_short_steps_get_a_no_gradient_finding_between_flushes_and_move_no_row_before(activations, in_place):
    # Real clock, steps of well under a millisecond: full evaluations mostly at flushes (50 steps). The
    # bias of the output layer stops getting a gradient at step 63: the step it goes missing is screened,
    # and the row where its gap reaches the screen's 5 rows, so the finding comes long before the flush at
    # 100 (no_gradient confirms a stop after 10 steps once the parameter has a window of history, 50
    # steps). Without activation statistics, no sampled row is screened at once: the gap's own schedule
    # finds it (it once waited for the flush there). ``in_place=False``: the path of a buffer on an
    # accelerator (rows streamed into the frame, screened there), forced on this CPU buffer.
    seen: list[tuple[int, str, str | None]] = []
    now = {"step": 0}
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(
        model,
        optimizer=opt,
        activations=activations,
        on_finding=lambda f: seen.append((now["step"], f.kind, f.layer)),
    )
    if not in_place:
        scope._diagnosis._host = None
    cadence = scope._diagnosis.cadence
    g = torch.Generator().manual_seed(1)
    state = []
    for step in range(1, 86):
        now["step"] = step
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        if step >= 63:
            model[4].bias.grad = None
        opt.step()
        scope.step()
        opt.zero_grad()
        state.append((len(scope._recorder.frame), cadence.evaluations))
    report = scope.close()
    assert "no_gradient" in {k for _, k, _ in seen}, seen
    (step, _, layer) = next(s for s in seen if s[1] == "no_gradient")
    assert layer == "4" and 67 <= step <= 75  # 5 rows without it (63-67), then the rule's own 10 steps
    (f,) = [f for f in report.findings if f.kind == "no_gradient"]
    assert (f.step, f.layer) == (63, "4")
    if not in_place:
        return
    # between the flush at step 50 and the stop, the screen read the rows in place: the frame grew only
    # when the cadence ran a full evaluation (it may, to measure one)
    rows50, evals50 = state[49]
    assert rows50 == 50  # the flush
    for rows, evals in state[50:62]:
        if evals == evals50:  # no full evaluation since the flush: nothing moved
            assert rows == 50


class _Block(nn.Module):
    """A pre-norm MLP block with a GELU: no activation module gradscope measures (GELU is not one)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def test_a_blow_up_on_a_fast_model_without_activation_statistics_is_found_between_flushes():
    # Real clock, steps of about 2 ms, no activation statistics, so no sampled row is screened at once:
    # only the screen's cadence finds the blow-up. The first screens of a run cost 0.5-0.6 ms (the
    # warm-up's full path), about ten times a later one; that figure used to pin the screen at the
    # flushes for the whole run (the finding at step 100). At step 60 every weight matrix is multiplied
    # by 8: the gradient norm grows ~100x within 10 steps.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), *[_Block(32) for _ in range(4)], nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen: list[tuple[int, str]] = []
    now = {"step": 0}
    scope = gradscope.watch(model, optimizer=opt, on_finding=lambda f: seen.append((now["step"], f.kind)))
    assert scope._recorder.acts is None or not scope._recorder.acts.entries
    g = torch.Generator().manual_seed(1)
    for step in range(1, 101):
        now["step"] = step
        if step == 60:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.mul_(8.0)
        x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad()
    report = scope.close()
    assert any(f.kind == "exploding_gradients" and f.step == 60 for f in report.findings), report.findings
    step = next(s for s, kind in seen if kind == "exploding_gradients")
    assert 60 < step < 100, seen  # between flushes (the flush at 100 found it before)
    cadence = scope._diagnosis.cadence
    assert cadence.screen_every < 50  # the estimate came down from the warm-up's


def _shift_rows(screen: LiveScreen, sumsq: np.ndarray, size: int) -> list[int]:
    """The rows (1-based) at the end of each block the screen flagged as a shift, blocks of ``size`` rows."""
    flagged = []
    nonfinite = np.zeros_like(sumsq)
    for at in range(0, len(sumsq), size):
        sl = slice(at, min(len(sumsq), at + size))
        if "shift" in screen.block(sl.stop, sumsq[sl], nonfinite[sl], None, None, None):
            flagged.append(sl.stop)
    return flagged


def test_a_parameter_whose_gradient_rms_is_noisy_gets_a_wider_band_and_a_collapse_is_still_flagged():
    # Parameter 0: steady (log10 RMS moves 0.13 decades per row). Parameter 1: noisy, as the early layers
    # of a deep tanh network (0.8 decades per row: it leaves a band of one decade at about one row in
    # five). Parameter 2 collapses 3 decades from row 401 on, parameter 1 from row 501 on.
    rng = np.random.default_rng(7)
    n = 600
    log_rms = np.column_stack([rng.normal(-2.0, 0.13, n), rng.normal(-3.0, 0.8, n), rng.normal(-2.5, 0.13, n)])
    log_rms[400:, 2] -= 3.0
    log_rms[500:, 1] -= 3.0
    sumsq = 10.0 ** (2 * log_rms)
    for size in (1, 7):
        fixed = _shift_rows(LiveScreen(max_decades=1.0), sumsq, size)  # one decade for every parameter
        own = _shift_rows(LiveScreen(), sumsq, size)
        # the fixed band flags the noisy parameter again and again before anything happens
        assert sum(r < 400 for r in fixed) >= 5, fixed
        # its own band: nothing before the collapse
        assert [r for r in own if r < 400] == [], own
        # the collapse of the steady parameter at its second row, 402 (in the block that holds it)
        assert min(r for r in own if r > 400) == -(-402 // size) * size, own
        # the noisy parameter's own collapse (3 decades, beyond its wider band of up to 2) within a few rows
        assert any(502 <= r <= 505 + size for r in own), own
    # what widened the noisy parameter's band is its mean deviation from its level (in log10 sum of
    # squares: twice the RMS decades); the steady ones keep the one-decade band
    screen = LiveScreen()
    _shift_rows(screen, sumsq[:399], 1)
    assert NOISE_FACTOR * screen._dev[1] > 2.0 * screen.decades
    assert (NOISE_FACTOR * screen._dev[[0, 2]] < 2.0 * screen.decades).all()


def test_a_one_row_spike_does_not_move_the_level():
    # Row 30 of parameter 0 jumps 3 decades for that row alone: not a shift, and the level it is judged
    # against afterwards is the level from before the spike (a spike is left out of the moving average).
    sumsq = _rows(40, 2, 3, scale=1e-2)
    sumsq[30, 0] *= 1e6
    screen = LiveScreen()
    nonfinite = np.zeros((1, 2))
    for r in range(30):
        assert screen.block(r + 1, sumsq[r : r + 1], nonfinite, None, None, None) == set()
    before = screen._level.copy()
    assert screen.block(31, sumsq[30:31], nonfinite, None, None, None) == set()
    assert screen._level[0] == before[0]  # the spike: left out
    assert screen._level[1] != before[1]  # the other parameter's row moved its level as usual
    for r in range(31, 40):
        assert screen.block(r + 1, sumsq[r : r + 1], nonfinite, None, None, None) == set()


def test_once_a_rule_has_reported_the_screen_stops_flagging_what_only_updates_it():
    # vanishing_gradients reports once a run: a later collapse only updates its episode, so collapses no
    # longer flag; a blow-up (exploding_gradients, not reported yet) still does; then neither.
    rows = _rows(80, 2, 5, scale=1e-2)
    rows[30:, 0] *= 1e-6  # parameter 0 collapses 3 decades from row 31
    rows[50:, 1] *= 1e6  # parameter 1 blows up 3 decades from row 51
    screen = LiveScreen()
    screen.mute_down = True
    flagged = _shift_rows(screen, rows, 1)
    assert flagged == [52]  # the blow-up's second row; the collapse at 32 is not flagged
    both = LiveScreen()
    both.mute_down = both.mute_up = True
    assert _shift_rows(both, rows, 1) == []
    np.testing.assert_allclose(both._level, screen._level)  # the levels move all the same
    assert _shift_rows(LiveScreen(), rows, 1) == [32, 52]
