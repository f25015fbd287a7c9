"""Hand-built frames for rule tests: real FrameSchema/StatsFrame objects filled with chosen statistics.

Imported by the tests of this folder as ``rulekit`` (pytest puts the folder on ``sys.path``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from gradscope.rules.base import RuleContext
from gradscope.rules.engine import RuleEngine
from gradscope.stats.frame import ACTIVATION_STATISTICS, FrameSchema, StatsFrame
from gradscope.stats.moments import MOMENT_INDEX as M
from gradscope.stats.moments import MOMENTS

STATS = ("l2_norm", "rms", "mean", "std", "abs_max", "zero_fraction", "nonfinite_count", "param_norm", "update_ratio")
SAMPLED = ("mean", "std", "abs_max", "zero_fraction", "param_norm", "update_ratio")


def build_frame(
    params: list[tuple[str, str, int]],
    *,
    rms: np.ndarray,
    skipped: Optional[np.ndarray] = None,
    has_grad: Optional[np.ndarray] = None,
    trainable: Optional[np.ndarray] = None,
    nonfinite: Optional[np.ndarray] = None,
    param_rms: Optional[np.ndarray] = None,
    update_ratio: Optional[np.ndarray] = None,
    sampled: Optional[np.ndarray] = None,
    act: Optional[dict[str, np.ndarray]] = None,
    act_modules: tuple[str, ...] = (),
    act_kinds: tuple[str, ...] = (),
    scalars: Optional[dict[str, np.ndarray]] = None,
    dtypes: Optional[list[str]] = None,
    steps: Optional[np.ndarray] = None,
    stats: tuple[str, ...] = STATS,
) -> StatsFrame:
    """A frame of ``S`` rows over ``params`` = [(layer, leaf, numel)], with per-parameter gradient RMS ``[S, P]``.

    Other moments follow from ``rms`` (sum 0, min/max = -+rms, no zeros). ``param_rms`` ``[S, P]`` sets the
    weights' RMS (default 1), ``update_ratio`` ``[S, P]`` the update's norm relative to the weights'.
    ``act`` maps an activation statistic name to ``[S, A]`` values.
    """
    rms = np.asarray(rms, dtype=np.float64)
    S, P = rms.shape
    layers: list[str] = []
    for layer, _, _ in params:
        if layer not in layers:
            layers.append(layer)
    numels = np.array([n for _, _, n in params], dtype=np.float64)
    schema = FrameSchema(
        param_names=[f"{layer}.{leaf}" if layer else leaf for layer, leaf, _ in params],
        param_layers=[layer for layer, _, _ in params],
        param_leaves=[leaf for _, leaf, _ in params],
        numels=numels,
        layers=layers,
        layer_members=[[i for i, (layer, _, _) in enumerate(params) if layer == name] for name in layers],
        stats=stats,
        custom={},
        sampled_stats=tuple(s for s in SAMPLED if s in stats),
        act_modules=list(act_modules),
        act_kinds=list(act_kinds),
        dtypes=dtypes or ["float32"] * P,
    )
    mom = np.full((S, P, len(MOMENTS)), np.nan)
    mom[..., M["sumsq"]] = rms**2 * numels
    mom[..., M["sum"]] = 0.0
    mom[..., M["min"]] = -rms
    mom[..., M["max"]] = rms
    mom[..., M["nnz"]] = numels
    mom[..., M["nonfinite"]] = 0.0 if nonfinite is None else nonfinite
    if nonfinite is not None:
        bad = np.asarray(nonfinite) > 0
        mom[..., M["sumsq"]] = np.where(bad, np.nan, mom[..., M["sumsq"]])
    prms = np.ones((S, P)) if param_rms is None else np.asarray(param_rms, dtype=np.float64)
    mom[..., M["psumsq"]] = prms**2 * numels
    if update_ratio is not None:
        mom[..., M["dsumsq"]] = (np.asarray(update_ratio) ** 2) * mom[..., M["psumsq"]]
    A = len(act_modules)
    act_arr = np.full((S, A, len(ACTIVATION_STATISTICS)), np.nan)
    for name, values in (act or {}).items():
        act_arr[:, :, ACTIVATION_STATISTICS.index(name)] = values
    names = list(scalars or {})
    chunk = {
        "steps": np.arange(1, S + 1) if steps is None else np.asarray(steps),
        "skipped": np.zeros(S, bool) if skipped is None else np.asarray(skipped, bool),
        "has_grad": np.ones((S, P), bool) if has_grad is None else np.asarray(has_grad, bool),
        "trainable": np.ones((S, P), bool) if trainable is None else np.asarray(trainable, bool),
        "moments": mom,
        "sampled": np.ones(S, bool) if sampled is None else np.asarray(sampled, bool),
        "act": act_arr,
        "scalars": np.stack([np.asarray(scalars[n], np.float64) for n in names], axis=1) if names else np.zeros((S, 0)),
    }
    frame = StatsFrame(schema)
    frame.append(chunk, names)
    return frame


def context(
    frame: StatsFrame, *, new_from: int = 0, final: bool = True, order: Optional[list[int]] = None, **extra: Any
) -> RuleContext:
    """A RuleContext over ``frame`` (layers in registration order unless ``order`` is given)."""
    info: dict[str, Any] = {"every": 1, "sample_every": 1, "step_count": int(frame.steps[-1]) if len(frame) else 0}
    info.update(extra)
    info["output_activations"] = tuple(info.get("output_activations", ()))
    return RuleContext(
        frame=frame,
        new_from=new_from,
        forward_order=order if order is not None else list(range(len(frame.schema.layers))),
        has_optimizer=True,
        final=final,
        **info,
    )


def chain(n_layers: int, numel: int = 100) -> list[tuple[str, str, int]]:
    """``fc0 ... fc{n-2}, head``, one weight each."""
    return [(f"fc{i}", "weight", numel) for i in range(n_layers - 1)] + [("head", "weight", numel)]


def feed(rule: Any, frame: StatsFrame, chunk_rows: int, *, final: bool = True, **extra: Any) -> list:
    """Run ``rule`` through a RuleEngine, one flush per ``chunk_rows`` rows on a growing frame; all findings.

    The last flush is ``final`` (``close()``) unless ``final=False``. Findings are the engine's: one per
    (kind, layer), with the episode updates (``last_step``, ``resolved_step``) of later flushes applied.
    """
    engine = RuleEngine([rule])
    n = len(frame)
    arrays = frame._arrays()
    grown = StatsFrame(frame.schema)
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        grown.append({k: v[start:end] for k, v in arrays.items()}, frame.scalar_names)
        engine.run(context(grown, new_from=start, final=final and end == n, **extra))
        if engine.errors:
            raise AssertionError(engine.errors[0])
    return list(engine.findings)


def flush_steps(rule: Any, frame: StatsFrame, chunk_rows: int, **extra: Any) -> dict[tuple[str, Any], int]:
    """The last step of the flush (every ``chunk_rows`` rows, none final) at which each (kind, layer) was first reported."""
    engine = RuleEngine([rule])
    n = len(frame)
    arrays = frame._arrays()
    grown = StatsFrame(frame.schema)
    seen: dict[tuple[str, Any], int] = {}
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        grown.append({k: v[start:end] for k, v in arrays.items()}, frame.scalar_names)
        for f in engine.run(context(grown, new_from=start, final=False, **extra)):
            seen[(f.kind, f.layer)] = int(grown.steps[-1])
        if engine.errors:
            raise AssertionError(engine.errors[0])
    return seen
