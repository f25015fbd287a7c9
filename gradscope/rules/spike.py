"""A jump of the training loss far above its recent trend, traced to the layers whose gradients rose with it.

The trend and the noise are measured from the curve itself (a median, and the median absolute deviation of
its step-to-step changes), so a noisy mini-batch loss does not fire and a spike is judged against what this
run's loss normally does, not against a fixed factor. A declared change of phase (``scope.step(...,
phase=k)``: a curriculum stage, a restart, a new dataset) starts a new trend.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from gradscope.errors import ConfigurationError
from gradscope.findings import Finding
from gradscope.rules._common import fmt, layer_label, nanmedian
from gradscope.rules.base import Rule, RuleContext
from gradscope.rules.registry import register_rule

__all__ = ["PHASE_SCALAR", "LossSpike"]

#: The scalar that declares a phase: ``scope.step(loss=loss, phase=2)``. A change of its value restarts
#: the loss trend, so a curriculum stage or a warm restart is never a spike.
PHASE_SCALAR = "phase"

# MAD of a normal sample x 1.4826 estimates its standard deviation; a first difference of white noise has
# standard deviation sigma * sqrt(2).
_MAD_TO_SIGMA = 1.4826


def _held(values: np.ndarray, carry: float = np.nan) -> np.ndarray:
    """``values`` with each NaN replaced by the last value before it (``carry`` before the first): a phase holds."""
    ext = np.concatenate(([carry], values))
    idx = np.where(np.isfinite(ext), np.arange(len(ext)), 0)
    np.maximum.accumulate(idx, out=idx)
    return ext[idx][1:]  # leading NaNs (no phase declared yet) stay NaN: ext[0] is NaN then


def _medians(sorted_rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of each row's first ``counts`` entries, the rows sorted ascending (NaN after them).

    The mean of the two middle entries, as ``np.median`` computes it (the same float, so a window judged
    in one call or another gives the same trend and noise); NaN for an empty row.
    """
    if sorted_rows.shape[1] and (counts == sorted_rows.shape[1]).all():  # full rows (the common case)
        w = sorted_rows.shape[1]
        return (sorted_rows[:, (w - 1) // 2] + sorted_rows[:, w // 2]) / 2
    rows = np.arange(len(counts))
    lo = np.maximum(counts - 1, 0) // 2
    hi = np.maximum(counts, 1) // 2
    hi = np.minimum(hi, max(sorted_rows.shape[1] - 1, 0))
    if sorted_rows.shape[1] == 0:
        return np.full(len(counts), np.nan)
    out = (sorted_rows[rows, lo] + sorted_rows[rows, hi]) / 2
    return np.where(counts > 0, out, np.nan)


def _window_stats(windows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trend (median) and per-step noise (``_MAD_TO_SIGMA`` x MAD of first differences / sqrt(2)) per row.

    Args:
        windows: ``[R, W]`` losses, each row's ``counts[r]`` values first, in step order, NaN after them.
        counts: ``[R]`` values per row.

    Returns:
        ``(trend [R], noise [R])``; the noise is 0 for a row with fewer than 3 values (fewer than two
        differences), as for a single curve.
    """
    return _medians(np.sort(windows, axis=1), counts), _noise_rows(windows, counts)


def _noise_rows(windows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The per-step noise of each row of ``windows`` (as :func:`_window_stats`), ``[R]``."""
    d = windows[:, 1:] - windows[:, :-1]  # NaN past each row's values: the sort puts them last
    nd = np.maximum(counts - 1, 0)
    md = _medians(np.sort(d, axis=1), nd)
    mad = _medians(np.sort(np.abs(d - md[:, None]), axis=1), nd)
    return np.where(nd >= 2, _MAD_TO_SIGMA * mad / np.sqrt(2.0), 0.0)


@register_rule("loss_spike")
class LossSpike(Rule):
    """The training loss jumps far above its recent robust trend; the finding names the layers behind it.

    Definition: for each recorded, finite training loss ``L[t]``, the trend ``m`` is the median of the
    previous ``window`` losses of the same phase (spikes already found left out) and ``s`` their per-step
    noise (1.4826 x the median absolute deviation of their first differences / sqrt(2)). ``L[t]`` is a
    spike when ``L[t] > m + z * s``, ``L[t] > m + rise * |m|`` and ``L[t] - m > undo * (L0 - m)`` (``L0``:
    the median magnitude of the run's first ``min_history`` losses): far outside the noise, a real change of
    the loss, and material on the scale of the run: it undoes at least ``undo`` of the progress made since
    the start (a converged loss of 0.009 that reads 0.15 on one batch, out of 1.3 at the start, undoes 11 %:
    not a finding, however many of its own tiny noise units that is). It needs ``min_history`` losses of history in the phase.

    The layers: each layer's gradient RMS in the ``lookback`` steps up to the spike is divided by its
    median over the trend window. The finding's layer is the one whose RMS first rose ``grad_rise``-fold
    (ties: the largest rise), and the evidence lists the layers with the largest rises (the embedding, the
    last layer, one attention block...). A spike whose gradients did not rise anywhere (the loss jumped
    but the gradients did not, e.g. a batch of shuffled labels seen late) is reported at the model
    (layer None) with the rises measured.

    Recovery: the spike's episode ends at the first step whose loss is back within ``z`` noise units or
    ``rise / 2`` of the trend (``resolved_step``); until then the message says it has not recovered.

    Incremental: the state holds the trend's history (the last ``window`` judged losses), so a call
    reads only the rows recorded since the last one and costs what they hold, not the run; judged
    live at every step or once at the end, the findings are the same.

    Thresholds:
        window: 50 steps of trend; min_history: 20; z: 10 noise units; rise: 0.1 (10 % above the
            trend); undo: 0.2 (a fifth of the progress since the start); grad_rise: 3 (a layer's gradient RMS 3x its
            median); lookback: 5 steps. Chosen so that the healthy runs of benchmarks/detection.py and
            benchmarks/lr_detection.py (mini-batch noise, learning-rate warm-up and decay, restarts
            declared with ``phase=``, losses that converge to 1e-3) stay silent while a batch of shuffled
            labels, inputs scaled 100x and a 100x learning-rate pulse injected mid-run are found at their
            step (our measurements). A fixed factor (e.g. "2x the previous loss") cannot tell a noisy early
            run from a spike in a converged one.
    """

    severity = "warning"
    defaults: ClassVar[dict[str, Any]] = {
        "window": 50,
        "min_history": 20,
        "z": 10.0,
        "rise": 0.1,
        "grad_rise": 3.0,
        "lookback": 5,
        "undo": 0.2,
    }

    def validate(self) -> None:
        """Check threshold ranges."""
        th = self.thresholds
        for name in ("window", "min_history", "z", "rise", "grad_rise", "lookback"):
            if not th[name] > 0:
                raise ConfigurationError(
                    f"Expected threshold {name!r} of rule 'loss_spike' to be > 0, but got {th[name]!r}."
                )
        if th["min_history"] > th["window"]:
            raise ConfigurationError(
                f"Threshold 'min_history' ({th['min_history']}) of rule 'loss_spike' must not exceed "
                f"'window' ({th['window']}): the trend is the median of at most `window` losses."
            )

    def reset(self) -> None:
        """Forget what was seen and reported (a new run)."""
        self._seen_step = 0  # the last step of the frame already read (every row, judged or not)
        self._phase = np.nan  # the phase held at that step (NaN: none declared yet)
        # The trend's history: the last `window` judged losses (finite, optimizer stepped, spikes left
        # out), with their steps and phases; kept here, so that each call reads only the new rows.
        self._hist = np.zeros((3, 0))  # rows: loss, step, phase
        self._first: list[float] = []  # the run's first `min_history` losses (its scale)
        self._open: list[tuple[Finding, float, float]] = []  # spikes not recovered yet: (finding, trend, noise)
        self._run_scale: float | None = None  # median |loss| of the run's first losses
        self._phased = False  # a phase was declared (then windows are filtered by phase)

    def check(self, ctx: RuleContext) -> list[Finding]:
        """Spikes among the losses recorded since the last judgement, and the recovery of open ones.

        Incremental: only the rows after the last step read are new; the trend's history is kept in the
        rule's state. The new losses are judged together (their trends and noises from one sorted
        array of windows), and again from the row after each spike found, which leaves the later
        trends (rare). Episode updates of open spikes are returned at the steps where something
        happens (a recovery, a new spike) and at the last new step: the engine keeps the last of each.
        """
        frame = ctx.frame
        names = frame.scalar_names
        if "loss" not in names:
            return []
        steps = frame.steps
        start = int(np.searchsorted(steps, self._seen_step, side="right"))
        if start >= len(steps):
            return []
        loss = frame.scalar("loss")[start:]
        ok = ~frame.skipped[start:] & np.isfinite(loss)
        phases = _held(frame.scalar(PHASE_SCALAR)[start:], self._phase) if PHASE_SCALAR in names else None
        self._seen_step = int(steps[-1])
        rows = start + np.flatnonzero(ok)
        new = np.empty((3, len(rows)))
        new[0], new[1] = loss[ok], steps[rows]
        if phases is None:
            new[2] = np.nan
        else:
            self._phase = float(phases[-1])
            new[2] = phases[ok]
            self._phased = self._phased or not np.isnan(new[2]).all()
        if not len(rows):
            return []
        need = int(self.thresholds["min_history"])
        if len(self._first) < need:
            self._first.extend(new[0, : need - len(self._first)].tolist())
        out: list[Finding] = []
        pos = 0
        while pos < new.shape[1]:
            spike = self._judge(new[:, pos:])
            end = new.shape[1] if spike is None else pos + spike  # rows pos..end-1 are not spikes
            upto = end + (spike is not None)  # the spike's own row: open spikes recover (or not) before it is judged
            out.extend(self._recoveries(new[:, pos:upto], last=upto == new.shape[1]))
            self._remember(new[:, pos:end])
            if spike is None:
                break
            r = pos + spike
            finding = self._spike(ctx, int(rows[r]), new[:, r])
            out.append(finding)
            pos = r + 1
        return out

    def _judge(self, new: np.ndarray) -> int | None:
        """Index of the first spike among ``new`` (``[3, K]``: loss, step, phase), judged against the history.

        Each loss's history is the last ``window`` losses before it (the kept history, then the new
        ones before it: no spike among them, or this is the first) of its phase.
        """
        th = self.thresholds
        window, need = int(th["window"]), int(th["min_history"])
        k = new.shape[1]
        hist = self._hist
        # every value that can be in a window, left-padded to `window` entries before the first new one:
        # row j of the windows is the `window` entries before new loss j
        pad = window - hist.shape[1]
        parts = [hist, new[:, :-1]] if pad == 0 else [np.full((3, pad), np.nan), hist, new[:, :-1]]
        series = np.concatenate(parts, axis=1)
        take = np.arange(k)[:, None] + np.arange(window)[None, :]
        values = series[0][take]  # [K, window]
        phased = self._phased
        if pad == 0 and not phased:
            # the common case: a full history, no phases declared: every loss is judged on `window` losses
            judged, counts, value = None, np.full(k, window), new[0]
        else:
            keep = take >= pad
            if phased:
                wp, ph = series[2][take], new[2][:, None]
                keep &= (wp == ph) | (np.isnan(wp) & np.isnan(ph))
            counts = keep.sum(axis=1)
            if not keep[counts >= need].all():
                # compact each row's kept values to its front, in step order, NaN after them
                order = np.argsort(~keep, axis=1, kind="stable")
                values = np.take_along_axis(values, order, axis=1)
                values = np.where(np.arange(window)[None, :] < counts[:, None], values, np.nan)
            judged = np.flatnonzero(counts >= need)
            if not len(judged):
                return None
            values, counts, value = values[judged], counts[judged], new[0][judged]
        # the trend first: the conditions that need only it rule out almost every loss, and the noise
        # (two more sorts) is measured for the few left. A spike is far outside the noise, a real change
        # of the loss, and material on the scale of the run: it undoes a part of the progress made since
        # the start (a converged loss of 0.009 that reads 0.15 on one batch, out of 1.3 at the start, is
        # not a spike worth a finding, however many of its own tiny noise units that is)
        trend = _medians(np.sort(values, axis=1), counts)
        scale = self._scale()
        maybe = np.flatnonzero(
            (value > trend + th["rise"] * np.abs(trend)) & (value - trend > th["undo"] * np.maximum(scale - trend, 0.0))
        )
        if not len(maybe):
            return None
        noise = _noise_rows(values[maybe], counts[maybe])
        spike = value[maybe] > trend[maybe] + th["z"] * noise
        if not spike.any():
            return None
        first = int(maybe[int(np.argmax(spike))])
        return first if judged is None else int(judged[first])

    def _remember(self, new: np.ndarray) -> None:
        """Add judged losses that were not spikes to the history (the last ``window`` kept)."""
        if new.shape[1]:
            window = int(self.thresholds["window"])
            self._hist = np.concatenate([self._hist, new], axis=1)[:, -window:]

    def _history(self, phase: float) -> np.ndarray:
        """The history of a loss of ``phase`` (``[3, n]``): the kept losses of that phase."""
        hp = self._hist[2]
        same = (hp == phase) | (np.isnan(hp) & np.isnan(phase))
        return self._hist[:, same]

    def _spike(self, ctx: RuleContext, row: int, value: np.ndarray) -> Finding:
        """The finding for the spike at frame row ``row`` (``value``: loss, step, phase), opened for recovery."""
        hist = self._history(float(value[2]))
        trend, noise = _window_stats(hist[0][None, :], np.array([hist.shape[1]]))
        history = np.searchsorted(ctx.frame.steps, hist[1].astype(ctx.frame.steps.dtype))
        finding = self._finding(ctx, row, history, float(value[0]), float(trend[0]), float(noise[0]))
        self._open.append((finding, float(trend[0]), float(noise[0])))
        return finding

    def _scale(self) -> float:
        """The loss's scale: the median magnitude of the run's first ``min_history`` losses (measured once)."""
        if self._run_scale is None:
            self._run_scale = float(np.median(np.abs(self._first)))
        return self._run_scale

    def _recoveries(self, new: np.ndarray, *, last: bool) -> list[Finding]:
        """Episode updates of the open spikes over the losses ``new`` (``[3, K]``), in step order.

        A spike recovers at the first later step whose loss is back near its trend. The updates are
        those at the steps where one recovers, and (``last``) at the last step read, where the others
        still stand: the engine keeps the last update of each finding, and these are the same as one
        update per step would leave.
        """
        if not self._open or not new.shape[1]:
            return []
        th = self.thresholds
        value, steps = new[0], new[1]
        k = new.shape[1]
        # each open spike with the index of the first of these losses back near its trend (k: none is)
        entries = []
        for finding, trend, noise in self._open:
            back = (value <= trend + max(th["z"] * noise, 0.5 * th["rise"] * abs(trend))) & (steps > finding.step)
            entries.append((finding, trend, noise, int(np.argmax(back)) if back.any() else k))
        events = sorted({at for *_, at in entries if at < k} | ({k - 1} if last else set()))
        updates: list[Finding] = []
        for i in events:
            step = int(steps[i])
            still = []
            for finding, trend, noise, at in entries:
                if step <= finding.step:
                    still.append((finding, trend, noise, at))
                elif at == i:
                    updates.append(_with_episode(finding, last=step - 1, resolved=step))
                else:
                    still.append((finding, trend, noise, at))
                    updates.append(_with_episode(finding, last=step, resolved=None))
            entries = still
        self._open = [(finding, trend, noise) for finding, trend, noise, _ in entries]
        return updates

    def _finding(
        self, ctx: RuleContext, row: int, history: np.ndarray, value: float, trend: float, noise: float
    ) -> Finding:
        th = self.thresholds
        frame = ctx.frame
        step = int(frame.steps[row])
        names = frame.schema.layers
        lookback = int(th["lookback"])
        order = np.asarray(ctx.forward_order, dtype=int)
        rises: dict[str, float] = {}
        origin: str | None = None
        first_rise_step: int | None = None
        if len(order) and "rms" in frame.schema.stats:
            recent = np.arange(max(0, row - lookback), row + 1)
            recent = recent[~frame.skipped[recent]]
            base = frame.layer_values("rms", history)[:, order]
            now = frame.layer_values("rms", recent)[:, order]
            with np.errstate(divide="ignore", invalid="ignore"):
                median = nanmedian(np.where(np.isfinite(base), base, np.nan), axis=0)
                ratio = now / median
            ratio = np.where(np.isfinite(ratio), ratio, np.nan)
            peak = np.nanmax(np.where(np.isnan(ratio), -np.inf, ratio), axis=0) if len(recent) else np.array([])
            for i in np.argsort(-np.nan_to_num(peak, nan=-np.inf, neginf=-np.inf))[:3]:
                if np.isfinite(peak[i]):
                    rises[names[order[i]]] = float(peak[i])
            risen = ratio >= th["grad_rise"]
            if risen.any():
                first_row = int(np.flatnonzero(risen.any(axis=1))[0])
                candidates = np.flatnonzero(risen[first_row])
                best = candidates[int(np.nanargmax(ratio[first_row, candidates]))]
                origin = names[order[best]]
                first_rise_step = int(frame.steps[recent[first_row]])
        rel = value / trend - 1 if trend else np.inf
        where = (
            f"The gradient RMS of layer {layer_label(origin)} rose first ({fmt(rises.get(origin, np.nan))}x its "
            f"median, at step {first_rise_step})"
            if origin is not None
            else "No layer's gradient RMS rose with it"
        )
        largest = ", ".join(f"{layer_label(k)} {fmt(v)}x" for k, v in rises.items())
        return self.finding(
            step=step,
            layer=origin,
            message=(
                f"Loss spike at step {step}: the training loss jumped to {fmt(value)}, {fmt(100 * rel)}% above its "
                f"trend of {fmt(trend)} ({fmt((value - trend) / noise) if noise > 0 else 'inf'} noise units; noise "
                f"{fmt(noise)} per step). {where}; largest gradient rises in the {lookback} steps before: "
                f"{largest or 'none measured'}."
            ),
            suggestion=(
                "Look at the batch of that step (bad labels, extreme inputs), clip gradients "
                "(torch.nn.utils.clip_grad_norm_), lower the learning rate or lengthen its warm-up; for transformers "
                "check the embedding and the last layers' scale (QK-norm, z-loss). A planned jump (curriculum stage, "
                "restart) is declared with scope.step(..., phase=k)."
            ),
            evidence={
                "stat": "loss",
                "loss": value,
                "trend": trend,
                "noise": noise,
                "threshold_z": float(th["z"]),
                "threshold_rise": float(th["rise"]),
                "gradient_rises": rises,
                "first_rise_step": first_rise_step,
                "window": [int(frame.steps[history[0]]), int(frame.steps[history[-1]])],
            },
        )


def _with_episode(finding: Finding, *, last: int, resolved: int | None) -> Finding:
    return replace(finding, last_step=last, resolved_step=resolved)
