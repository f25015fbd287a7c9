"""Pieces shared by the built-in rules: layer gradient scales by depth, and message formatting."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gradscope.rules.base import RuleContext

__all__ = ["fmt", "later_max", "layer_label", "layer_rms_by_depth", "nanmedian", "steps_label"]


def layer_rms_by_depth(ctx: RuleContext, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Gradient RMS of every layer at ``rows``, in forward order.

    Returns:
        ``(rms [R, L], nonfinite [R, L], names [L])``: RMS over all the layer's entries that had a
        gradient (NaN where none had), the number of non-finite gradient entries, and layer keys.
        Without ``nonfinite_count`` collected, a layer whose RMS is not finite (or that had no
        gradient) counts one non-finite entry.
    """
    frame = ctx.frame
    order = list(ctx.forward_order)
    if "nonfinite_count" in frame.schema.stats:
        values = frame.layer_values_many(["rms", "nonfinite_count"], rows)
        rms, nonfinite = values["rms"][:, order], values["nonfinite_count"][:, order]
    else:
        rms = frame.layer_values("rms", rows)[:, order]
        nonfinite = np.where(np.isfinite(rms), 0.0, 1.0)
    names = [frame.schema.layers[i] for i in order]
    return rms, np.nan_to_num(nonfinite, nan=0.0), names


def nanmedian(values: Any, axis: int | None = None) -> Any:
    """``np.nanmedian`` without the RuntimeWarning for all-NaN slices (they give NaN, which we handle)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(values, axis=axis)


def later_max(values: np.ndarray) -> np.ndarray:
    """``out[:, i] = nanmax(values[:, i+1:])`` (NaN for the last column or when all later are NaN)."""
    r, n = values.shape
    out = np.full((r, n), np.nan)
    if n < 2:
        return out
    filled = np.where(np.isnan(values), -np.inf, values)
    rev = np.maximum.accumulate(filled[:, ::-1], axis=1)[:, ::-1]  # rev[:, i] = max(values[:, i:])
    out[:, :-1] = rev[:, 1:]
    out[out == -np.inf] = np.nan
    return out


def fmt(x: Any) -> str:
    """A number for a message: 3 significant digits, scientific when small or large."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.2e}"
    return f"{v:.3g}"


def layer_label(name: str) -> str:
    """A layer key quoted for a message (the root module's own parameters are ``(root)``)."""
    return repr(name) if name else "(root)"


def steps_label(first: int, last: int) -> str:
    """``"step 5"`` or ``"steps 5-24"``."""
    return f"step {first}" if first == last else f"steps {first}-{last}"
