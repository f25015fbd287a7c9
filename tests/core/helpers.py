"""Small models and independent float64 references for the core tests."""

from __future__ import annotations

import numpy as np
import torch.nn as nn


def mlp(d_in: int = 6, hidden: int = 12, d_out: int = 3, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, d_out))


def np_stats(g: np.ndarray) -> dict[str, float]:
    """Every built-in gradient statistic of one array (or a concatenation), in float64 NumPy."""
    g = np.asarray(g, dtype=np.float64).ravel()
    return {
        "l2_norm": float(np.sqrt(np.sum(g * g))),
        "rms": float(np.sqrt(np.mean(g * g))),
        "mean": float(np.mean(g)),
        "std": float(np.std(g)),
        "abs_max": float(np.max(np.abs(g))),
        "zero_fraction": float(np.mean(g == 0)),
        "nonfinite_count": float(np.sum(~np.isfinite(g))),
    }


def value(df, step: int, layer: str, param: str, stat: str) -> float:
    sel = df[(df.step == step) & (df.layer == layer) & (df.param == param) & (df.stat == stat)]
    assert len(sel) == 1, (
        f"expected one row for step={step} layer={layer!r} param={param!r} stat={stat!r}, got {len(sel)}"
    )
    return float(sel.value.iloc[0])


def assert_all_close(pairs: list[tuple], rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Compare (name, got, expected[, atol]) tuples and fail once listing every mismatch."""
    bad = []
    for name, got, exp, *tol in pairs:
        a = tol[0] if tol else atol
        if not (np.isclose(got, exp, rtol=rtol, atol=a) or (np.isnan(got) and np.isnan(exp))):
            bad.append(f"{name}: got {got!r}, expected {exp!r} (atol {a:.1e})")
    assert not bad, f"{len(bad)} of {len(pairs)} values differ:\n" + "\n".join(bad)
