"""Gradient-profile baselines: record each layer's gradient norm at initialisation, fail when it moves.

A *profile* is, for every layer, the L2 norm (and RMS) of its gradient on the first backward pass of a
freshly built model, measured over a few seeds (each seed builds the model and its batch anew). A code
change that breaks initialisation, cuts a branch off the graph or rescales a residual path moves some
layer's norm by a large factor; seed noise moves it by a little. :func:`compare` judges the distance
in log space::

    |log10(norm_now) - mean_seeds(log10(norm_baseline))|  <=  tolerance + noise_sigmas * spread

where ``spread`` is the standard deviation of the baseline's log10 norms over its seeds. The JSON file
(:meth:`GradientProfile.to_json`) is versioned (``schema: "gradscope.profile"``, ``version: 1``).
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
import torch

from gradscope._factory import FactoryError, LoadedFactory, call_factory, load_callable
from gradscope._io import atomic_write_text
from gradscope._version import __version__
from gradscope.errors import ConfigurationError, GradientHealthError
from gradscope.health import _checked_loss, _cuda_indices, seeded
from gradscope.scope import watch

if TYPE_CHECKING:
    import os

__all__ = [
    "DEFAULT_NOISE_SIGMAS",
    "DEFAULT_SEEDS",
    "DEFAULT_TOLERANCE",
    "PROFILE_SCHEMA",
    "PROFILE_VERSION",
    "GradientProfile",
    "LayerComparison",
    "LayerProfile",
    "ProfileComparison",
    "assert_matches_baseline",
    "compare",
    "load_profile",
    "snapshot",
]

PROFILE_SCHEMA = "gradscope.profile"
PROFILE_VERSION = 1
#: Seeds a snapshot measures by default.
DEFAULT_SEEDS = (0, 1, 2)
#: Allowed distance in log10 units on top of the seed-noise allowance: 0.3 is a factor of 10**0.3 = 2.
#: Measured on the examples in examples/ci over ten new seeds: a healthy layer moves by at most 0.21 (a
#: transformer LayerNorm) against allowances of 0.34 and more; a broken initialisation moves the early
#: layers by 1.5 to 5.
DEFAULT_TOLERANCE = 0.3
#: How many baseline standard deviations of seed noise are allowed on top of the tolerance.
DEFAULT_NOISE_SIGMAS = 3.0
# Norms below this count as zero; log10 needs a floor, and float32 gradients cannot go lower anyway.
_ZERO = 1e-30

Source = Union[str, Callable[[], Any]]


def _log10(v: float) -> float:
    return math.log10(max(v, _ZERO))


def _num(v: Any) -> float | None:
    """A norm as stored: None for 'no gradient' (NaN), ``inf`` for a non-finite gradient (JSON: "inf")."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)  # also reads the strings "inf" and "-inf"


def _stored(v: Any) -> float | None:
    """A norm read from a file: a non-negative number, "inf", or null; anything else is a damaged file."""
    if isinstance(v, bool) or not (v is None or isinstance(v, (int, float)) or v in ("inf", "Infinity")):
        raise ValueError(f"a norm is {v!r}, not a number, 'inf' or null")
    out = _num(v)
    if out is not None and not out >= 0:
        raise ValueError(f"a norm is {v!r}; norms are non-negative")
    return out


def _json_num(v: float | None) -> float | str | None:
    if v is None or math.isnan(v):
        return None
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else v


@dataclass
class LayerProfile:
    """One layer's gradient at initialisation, one value per seed.

    Attributes:
        layer: module path (``"encoder.0"``; ``"a+b"`` for tied parameters).
        numel: number of gradient elements in the layer (all its parameters).
        norms: L2 norm of the layer's gradient per seed; None where the layer got no gradient.
        rms: root mean square of the layer's gradient per seed; None where it got no gradient.
    """

    layer: str
    numel: int
    norms: list[float | None]
    rms: list[float | None]

    @property
    def has_gradient(self) -> bool:
        """Whether the layer got a gradient for every seed."""
        return all(v is not None for v in self.norms)

    def log10_norms(self) -> np.ndarray:
        """log10 of the norms (floored at 1e-30), ``[seeds]``; NaN where there is no gradient."""
        return np.array([np.nan if v is None else _log10(v) for v in self.norms], dtype=np.float64)

    @property
    def log10_mean(self) -> float | None:
        """Mean over seeds of log10 of the norm; None without a gradient."""
        return float(self.log10_norms().mean()) if self.has_gradient and self.norms else None

    @property
    def log10_std(self) -> float:
        """Sample standard deviation over seeds of log10 of the norm (0 for one seed, no gradient or inf)."""
        if (
            not self.has_gradient
            or len(self.norms) < 2
            or not all(v is not None and math.isfinite(v) for v in self.norms)
        ):
            return 0.0
        return float(self.log10_norms().std(ddof=1))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, with the derived mean and spread for people reading the file."""
        mean = self.log10_mean
        if mean is not None and not math.isfinite(mean):
            mean = None  # a non-finite gradient: the per-seed values say "inf"
        return {
            "layer": self.layer,
            "numel": self.numel,
            "l2_norm": [_json_num(v) for v in self.norms],
            "rms": [_json_num(v) for v in self.rms],
            "log10_norm_mean": mean,
            "log10_norm_std": self.log10_std if mean is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerProfile:
        """Inverse of :meth:`to_dict` (the derived fields are recomputed, not read).

        Raises:
            TypeError, ValueError, KeyError: for a damaged entry (:meth:`GradientProfile.from_dict` reports
                them as a damaged profile).
        """
        if not isinstance(d, dict):
            raise TypeError(f"a layer entry is a {type(d).__name__}, not an object")
        layer, numel, norms = d["layer"], d["numel"], d["l2_norm"]
        rms = d.get("rms", [None] * len(norms) if isinstance(norms, list) else None)
        if not isinstance(layer, str):
            raise TypeError(f"a layer name is {layer!r}, not a string")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"layer {layer!r} has numel {numel!r}, not a non-negative int")
        if not isinstance(norms, list) or not isinstance(rms, list) or len(rms) != len(norms):
            raise TypeError(f"layer {layer!r} needs lists l2_norm and rms of one value per seed")
        return cls(layer=layer, numel=numel, norms=[_stored(v) for v in norms], rms=[_stored(v) for v in rms])


@dataclass
class GradientProfile:
    """Per-layer gradient norms of a model at initialisation over a few seeds; see :func:`snapshot`.

    Attributes:
        layers: one :class:`LayerProfile` per layer, in forward order (input side first).
        seeds: the seeds measured; each built the model and its batch anew.
        losses: the loss at initialisation per seed.
        model: the model's class name.
        source: what built the model (``"FILE.py:factory"`` or the factory's name).
        meta: versions and creation time.
    """

    layers: list[LayerProfile]
    seeds: list[int]
    losses: list[float | None] = field(default_factory=list)
    model: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> LayerProfile:
        """The profile of layer ``name``.

        Raises:
            KeyError: naming the layers the profile has.
        """
        for lp in self.layers:
            if lp.layer == name:
                return lp
        raise KeyError(f"No layer {name!r} in this profile; it has: {', '.join(lp.layer for lp in self.layers)}.")

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON data (schema ``gradscope.profile``, version 1)."""
        return {
            "schema": PROFILE_SCHEMA,
            "version": PROFILE_VERSION,
            "gradscope_version": __version__,
            "stat": "l2_norm",
            "model": self.model,
            "source": self.source,
            "seeds": list(self.seeds),
            "loss": [_json_num(v) for v in self.losses],
            "meta": dict(self.meta),
            "layers": [lp.to_dict() for lp in self.layers],
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Serialise (indented, stable key order); when ``path`` is given also write it there atomically."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "the profile") -> GradientProfile:
        """Read the data written by :meth:`to_dict`.

        Raises:
            ConfigurationError: when ``data`` is not a gradscope profile or comes from a newer version.
        """
        if not isinstance(data, dict) or data.get("schema") != PROFILE_SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ConfigurationError(
                f"{origin} is not a gradscope gradient profile (expected schema {PROFILE_SCHEMA!r}, got {got!r}). "
                "Record one with `gradscope snapshot FILE.py:factory -o profile.json`."
            )
        version = data.get("version")
        if not isinstance(version, int) or version > PROFILE_VERSION or version < 1:
            raise ConfigurationError(
                f"{origin} uses profile format version {version!r}; this gradscope ({__version__}) reads versions "
                f"1 to {PROFILE_VERSION}. Upgrade gradscope, or record the profile again with this version."
            )
        try:
            seeds, layers = data["seeds"], data["layers"]
            if not isinstance(layers, list) or not isinstance(seeds, list):
                raise TypeError("'layers' and 'seeds' must be lists")
            if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32 for s in seeds):
                raise ValueError(f"'seeds' must hold ints from 0 to 2**32-1, but holds {seeds!r}"[:200])
            if len(seeds) > 1000:
                raise ValueError(f"'seeds' holds {len(seeds)} seeds; a profile has at most 1000")
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"'seeds' repeats a seed: {seeds!r}"[:200])
            profile_layers = [LayerProfile.from_dict(d) for d in layers]
            for lp in profile_layers:
                if len(lp.norms) != len(seeds):
                    raise ValueError(f"layer {lp.layer!r} has {len(lp.norms)} value(s) for {len(seeds)} seed(s)")
            if len({lp.layer for lp in profile_layers}) != len(profile_layers):
                raise ValueError("a layer appears twice")
            losses = data.get("loss", [])
            meta = data.get("meta", {})
            if not isinstance(losses, list) or not isinstance(meta, dict):
                raise TypeError("'loss' must be a list and 'meta' an object")
            return cls(
                layers=profile_layers,
                seeds=list(seeds),
                losses=[_num(v) for v in losses],
                model=str(data.get("model", "")),
                source=str(data.get("source", "")),
                meta=dict(meta),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise ConfigurationError(
                f"{origin} is a damaged gradient profile ({type(exc).__name__}: {reason}). Record it again with "
                "`gradscope snapshot FILE.py:factory -o PROFILE.json`."
            ) from exc

    @classmethod
    def from_json(cls, source: Union[str, os.PathLike[str]]) -> GradientProfile:
        """Read a profile file (or JSON text) written by :meth:`to_json`.

        Raises:
            ConfigurationError: for a missing file, invalid JSON, another schema or a newer version.
        """
        text = str(source)
        if text.lstrip().startswith("{"):
            origin, raw = "The JSON text", text
        else:
            path = Path(text)
            origin = f"The file {text!r}"
            if not path.is_file():
                raise ConfigurationError(
                    f"Cannot find the baseline profile {text!r}. Record it first with "
                    "`gradscope snapshot FILE.py:factory -o PROFILE.json`, or fix the path."
                )
            try:
                raw = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigurationError(f"Cannot read the baseline profile {text!r}: {exc}.") from exc
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, too-long integers, deep nesting
            reason = " ".join(str(exc).split())[:200]
            raise ConfigurationError(
                f"{origin} is not valid JSON ({type(exc).__name__}: {reason}); is it a gradscope profile?"
            ) from exc
        return cls.from_dict(data, origin=origin)

    def __str__(self) -> str:
        seeds = ", ".join(map(str, self.seeds))
        lines = [f"gradient profile of {self.model or 'the model'} at init, seeds {seeds} ({len(self.layers)} layers)"]
        rows = [["layer", "l2_norm", "log10", "spread"]]
        for lp in self.layers:
            mean = lp.log10_mean
            if mean is None:
                rows.append([lp.layer or "(root)", "no gradient", "-", "-"])
            else:
                rows.append([lp.layer or "(root)", f"{10**mean:.3e}", f"{mean:+.3f}", f"{lp.log10_std:.3f}"])
        lines += _table(rows)
        return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    ]


# -- measuring -------------------------------------------------------------------------------------------


def _measure(loaded: LoadedFactory) -> tuple[list[str], list[int], np.ndarray, np.ndarray, np.ndarray, float]:
    """One backward pass of a fresh model.

    Returns:
        Layers (forward order), their element counts, whether each got a gradient ``[L]``, norms ``[L]``,
        RMS ``[L]`` and the loss.
    """
    model = loaded.model
    inputs, targets = loaded.batch
    for p in model.parameters():
        p.grad = None
    model.train()
    with watch(
        model, rules="none", stats=("l2_norm", "rms"), activations=False, sample_every=1, flush_every=1
    ) as scope:
        loss = _checked_loss(loaded.loss_fn(model(inputs), targets), 1)
        loss.backward()
        scope.step(loss=loss.detach())
    frame = scope.frame
    order = scope.layers_by_depth()
    index = {name: i for i, name in enumerate(frame.schema.layers)}
    cols = [index[name] for name in order]
    norms = frame.layer_values("l2_norm")[0, cols]
    rms = frame.layer_values("rms")[0, cols]
    members = frame.schema.layer_members
    numels = [int(frame.schema.numels[members[i]].sum()) for i in cols]
    present = np.array([bool(frame.has_grad[0, members[i]].any()) for i in cols])
    loss_value = float(frame.scalar("loss")[0])
    for p in model.parameters():
        p.grad = None
    return order, numels, present, norms, rms, loss_value


def _resolve(source: Source) -> tuple[Callable[[], Any], str]:
    if isinstance(source, str):
        return load_callable(source), source
    if isinstance(source, torch.nn.Module) or not callable(source):
        raise ConfigurationError(
            f"Expected a factory: a function returning (model, batch, loss_fn[, optimizer]) that builds a fresh "
            f"model each call, or 'FILE.py:factory'; but got {type(source).__name__}. A profile measures the model "
            "at initialisation over several seeds, so it needs to build the model, not receive one."
        )
    return source, getattr(source, "__qualname__", getattr(source, "__name__", repr(source)))


def _seed_list(seeds: Union[int, Sequence[int]]) -> list[int]:
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        if seeds <= 0:
            raise ConfigurationError(f"Expected `seeds` to be a positive int or a list of ints, but got {seeds!r}.")
        return list(range(int(seeds)))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise ConfigurationError(f"Expected `seeds` to be a positive int or a list of ints, but got {seeds!r}.")
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ConfigurationError(f"Expected every seed in `seeds` to be an int, but got {s!r}.")
        out.append(int(s))
    if not out:
        raise ConfigurationError("Expected `seeds` to hold at least one seed, but got an empty list.")
    if len(set(out)) != len(out):
        raise ConfigurationError(f"Expected distinct seeds, but got {out}.")
    return out


def snapshot(
    source: Source,
    *,
    seeds: Union[int, Sequence[int]] = DEFAULT_SEEDS,
    name: str | None = None,
    strict: bool = True,
) -> GradientProfile:
    """Record the per-layer gradient-norm profile of a freshly built model over a few seeds.

    For each seed, torch, ``random`` and NumPy are seeded, the factory builds the model and its batch,
    and one forward and backward pass is measured (no optimizer step). The caller's random state is
    restored afterwards.

    Args:
        source: a factory returning ``(model, batch, loss_fn)`` or ``(model, batch, loss_fn, optimizer)``
            (called once per seed; the optimizer is not used), or ``"FILE.py:factory"``.
        seeds: how many seeds (``3`` means 0, 1, 2) or the seeds themselves.
        name: how the profile and its messages name the source (default: the spec, or the factory's
            qualified name).
        strict: refuse a model whose gradient is not finite at initialisation (a baseline must come from
            a healthy model). False records such layers with an infinite norm instead, so that
            :func:`compare` reports them: that is how a current profile is measured.

    Returns:
        The :class:`GradientProfile`; save it with ``profile.to_json("profile.json")``.

    Raises:
        ConfigurationError: for a bad factory (``FactoryError``) or arguments, or seeds that build models
            with different layers.
        GradientHealthError: with ``strict=True``, when a gradient is not finite at initialisation.
    """
    fn, resolved = _resolve(source)
    name = name or resolved
    seed_list = _seed_list(seeds)
    started = time.perf_counter()
    layers: list[str] | None = None
    numels: list[int] = []
    norms: list[np.ndarray] = []
    rms: list[np.ndarray] = []
    losses: list[float | None] = []
    model_name = ""
    for seed in seed_list:
        # CUDA generators are seeded when CUDA is already up; starting it just to seed it would cost
        # seconds for CPU models on a GPU machine.
        with seeded(seed, list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else None):
            loaded = call_factory(fn, name)
            # Seed again for the pass itself, so dropout does not depend on how much randomness the
            # factory drew.
            with seeded(seed, _cuda_indices(loaded.model)):
                order, nums, present, n, r, loss = _measure(loaded)
        model_name = type(loaded.model).__name__
        if layers is None:
            layers, numels = order, nums
        elif order != layers or nums != numels:
            raise FactoryError(
                f"The factory {name!r} built models with different layers for seed {seed_list[0]} and seed {seed}; a "
                "profile needs the same architecture for every seed (only the initial values may differ)."
            )
        bad = [layers[i] for i in range(len(layers)) if present[i] and not np.isfinite(n[i])]
        if strict and (bad or not math.isfinite(loss)):
            raise GradientHealthError(
                f"The gradient of {name!r} is not finite at initialisation for seed {seed} "
                f"(layers: {', '.join(map(repr, bad)) or '(loss)'}); a baseline must be recorded from a healthy model. "
                "Run `gradscope check` on it to find where the non-finite values start."
            )
        # NaN stands for "no gradient" (stored as null): the layer is not connected to the loss; a
        # gradient that is there but not finite becomes inf.
        norms.append(np.where(present, np.where(np.isfinite(n), n, np.inf), np.nan))
        rms.append(np.where(present, np.where(np.isfinite(r), r, np.inf), np.nan))
        losses.append(loss)
    assert layers is not None
    stacked_n, stacked_r = np.stack(norms, axis=1), np.stack(rms, axis=1)  # [L, seeds]
    profile_layers = [
        LayerProfile(
            layer=layer,
            numel=numels[i],
            norms=[_num(float(v)) for v in stacked_n[i]],
            rms=[_num(float(v)) for v in stacked_r[i]],
        )
        for i, layer in enumerate(layers)
    ]
    return GradientProfile(
        layers=profile_layers,
        seeds=seed_list,
        losses=losses,
        model=model_name,
        source=name,
        meta={
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )


def load_profile(baseline: Union[GradientProfile, str, os.PathLike[str]]) -> GradientProfile:
    """A :class:`GradientProfile` from itself or from a JSON file path."""
    if isinstance(baseline, GradientProfile):
        return baseline
    return GradientProfile.from_json(baseline)


# -- comparing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerComparison:
    """One layer of a profile comparison.

    Attributes:
        layer: module path.
        status: ``"ok"``, ``"moved"`` (beyond tolerance), ``"nonfinite"``, ``"lost_gradient"``,
            ``"gained_gradient"``, ``"resized"`` (element count changed), ``"missing"`` (in the baseline
            only) or ``"new"`` (not in the baseline).
        baseline: the baseline's norm (10 to the mean log10 over its seeds), or None.
        current: the current norm (same average over the current seeds), or None.
        delta: ``log10(current) - log10(baseline)``, or None.
        allowed: the largest ``|delta|`` that passes for this layer, or None.
        message: a sentence explaining a failing status ("" when ok).
    """

    layer: str
    status: str
    baseline: float | None
    current: float | None
    delta: float | None
    allowed: float | None
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether this layer passes."""
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""

        def finite(v: float | None) -> float | None:
            return v if v is not None and math.isfinite(v) else None

        return {
            "layer": self.layer,
            "status": self.status,
            "baseline": finite(self.baseline),
            "current": finite(self.current),
            "delta_log10": self.delta,
            "allowed_log10": self.allowed,
            "message": self.message,
        }


@dataclass
class ProfileComparison:
    """The result of :func:`compare`: one :class:`LayerComparison` per layer of either profile.

    Attributes:
        layers: per-layer results, baseline order first, then new layers.
        tolerance: the tolerance used (log10 units).
        noise_sigmas: the multiple of the baseline spread allowed on top.
        baseline_seeds: seeds of the baseline.
        current_seeds: seeds of the current profile.
        baseline_source: where the baseline came from (a path, when read from a file).
    """

    layers: list[LayerComparison]
    tolerance: float
    noise_sigmas: float
    baseline_seeds: list[int]
    current_seeds: list[int]
    baseline_source: str = ""

    @property
    def ok(self) -> bool:
        """True when every layer is within tolerance and no layer appeared or disappeared."""
        return all(lc.ok for lc in self.layers)

    @property
    def mismatches(self) -> list[LayerComparison]:
        """The failing layers."""
        return [lc for lc in self.layers if not lc.ok]

    def worst(self) -> LayerComparison | None:
        """The compared layer with the largest ``|delta|`` relative to its allowance."""
        scored = [(abs(lc.delta) / lc.allowed, lc) for lc in self.layers if lc.delta is not None and lc.allowed]
        return max(scored, key=lambda pair: pair[0])[1] if scored else None

    def summary(self) -> str:
        """One line: the verdict and the layers that failed."""
        where = f" vs {self.baseline_source}" if self.baseline_source else ""
        if self.ok:
            w = self.worst()
            extra = f"; largest move {w.delta:+.2f} in {w.layer!r} (allowed {w.allowed:.2f})" if w else ""
            return f"gradient profile{where}: OK, {len(self.layers)} layers within tolerance{extra}"
        names = ", ".join(repr(lc.layer) for lc in self.mismatches)
        return f"gradient profile{where}: FAILED, {len(self.mismatches)} of {len(self.layers)} layers changed: {names}"

    def __str__(self) -> str:
        lines = [
            self.summary(),
            f"  tolerance {self.tolerance:g} in log10 units + {self.noise_sigmas:g} x seed spread; baseline seeds "
            f"{', '.join(map(str, self.baseline_seeds))}, current seeds {', '.join(map(str, self.current_seeds))}",
        ]
        if not self.ok:
            rows = [["layer", "baseline", "now", "log10 change", "allowed", "status"]]
            for lc in self.mismatches:
                rows.append(
                    [
                        lc.layer or "(root)",
                        "-" if lc.baseline is None else f"{lc.baseline:.3e}",
                        "-" if lc.current is None else f"{lc.current:.3e}",
                        "-" if lc.delta is None else f"{lc.delta:+.2f}",
                        "-" if lc.allowed is None else f"{lc.allowed:.2f}",
                        lc.status,
                    ]
                )
            lines += _table(rows)
            lines += [f"  {lc.layer or '(root)'}: {lc.message}" for lc in self.mismatches]
            lines.append(
                "  If the change is intended, record a new baseline: gradscope snapshot FILE.py:factory -o PROFILE.json"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "noise_sigmas": self.noise_sigmas,
            "baseline": self.baseline_source,
            "baseline_seeds": list(self.baseline_seeds),
            "current_seeds": list(self.current_seeds),
            "layers": [lc.to_dict() for lc in self.layers],
        }


def _positive_number(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or float(value) < 0 or (float(value) == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigurationError(f"Expected `{name}` to be {kind} number (log10 units), but got {value!r}.")
    return float(value)


def compare(
    baseline: Union[GradientProfile, str, os.PathLike[str]],
    current: GradientProfile,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
) -> ProfileComparison:
    """Compare a current profile with a baseline, layer by layer, in log space.

    A layer passes when ``|mean log10 norm now - mean log10 norm in the baseline| <= tolerance +
    noise_sigmas * spread``, ``spread`` being the baseline's standard deviation of log10 norms over its
    seeds. Layers whose gradient appears, disappears or becomes non-finite fail, and so do layers that
    exist in only one of the two profiles, or whose element count changed (the architecture changed:
    record a new baseline).

    Args:
        baseline: the recorded profile, or the path of its JSON file.
        current: the profile now (from :func:`snapshot`).
        tolerance: allowed distance in log10 units (0.3 = a factor of 2) on top of seed noise.
        noise_sigmas: multiple of the baseline's seed spread allowed on top of ``tolerance``.

    Returns:
        A :class:`ProfileComparison`; ``.ok``, ``.mismatches``, and a readable ``str()``.
    """
    tol = _positive_number("tolerance", tolerance, allow_zero=True)
    sig = _positive_number("noise_sigmas", noise_sigmas, allow_zero=True)
    origin = "" if isinstance(baseline, GradientProfile) else str(baseline)
    return _compare(load_profile(baseline), current, tol, sig, origin)


def _compare(base: GradientProfile, current: GradientProfile, tol: float, sig: float, origin: str) -> ProfileComparison:
    cur = {lp.layer: lp for lp in current.layers}
    out: list[LayerComparison] = []
    for b in base.layers:
        c = cur.pop(b.layer, None)
        out.append(_compare_layer(b, c, tol, sig))
    for c in cur.values():
        out.append(
            LayerComparison(
                c.layer,
                "new",
                None,
                None if c.log10_mean is None else 10**c.log10_mean,
                None,
                None,
                "the layer is not in the baseline (new or renamed); record a new baseline if this is intended.",
            )
        )
    return ProfileComparison(
        layers=out,
        tolerance=tol,
        noise_sigmas=sig,
        baseline_seeds=list(base.seeds),
        current_seeds=list(current.seeds),
        baseline_source=origin,
    )


def _compare_layer(b: LayerProfile, c: LayerProfile | None, tol: float, sig: float) -> LayerComparison:
    bm = b.log10_mean
    base_norm = None if bm is None else 10**bm
    if c is None:
        return LayerComparison(
            b.layer,
            "missing",
            base_norm,
            None,
            None,
            None,
            "the layer is in the baseline but not in the model now (removed or renamed).",
        )
    if any(v is not None and not math.isfinite(v) for v in c.norms):
        return LayerComparison(
            b.layer, "nonfinite", base_norm, None, None, None, "its gradient is not finite (NaN or Inf) now."
        )
    cm = c.log10_mean
    cur_norm = None if cm is None else 10**cm
    if bm is None and cm is None:
        return LayerComparison(b.layer, "ok", None, None, None, None)
    if cm is None:
        return LayerComparison(
            b.layer,
            "lost_gradient",
            base_norm,
            None,
            None,
            None,
            "it had a gradient in the baseline and gets none now: is it still connected to the loss?",
        )
    if bm is None:
        return LayerComparison(
            b.layer,
            "gained_gradient",
            None,
            cur_norm,
            None,
            None,
            "it had no gradient in the baseline and gets one now.",
        )
    if c.numel != b.numel:
        return LayerComparison(
            b.layer,
            "resized",
            base_norm,
            cur_norm,
            cm - bm,
            None,
            f"it has {c.numel} gradient elements now and {b.numel} in the baseline: the architecture changed.",
        )
    delta = cm - bm
    allowed = tol + sig * b.log10_std
    if abs(delta) <= allowed:
        return LayerComparison(b.layer, "ok", base_norm, cur_norm, delta, allowed)
    factor = 10**delta
    how = f"{factor:.3g}x" if factor >= 1 else f"1/{1 / factor:.3g}"
    return LayerComparison(
        b.layer,
        "moved",
        base_norm,
        cur_norm,
        delta,
        allowed,
        f"its gradient norm at init is {how} the baseline ({cur_norm:.3e} vs {base_norm:.3e}; log10 change "
        f"{delta:+.2f}, allowed {allowed:.2f}).",
    )


def assert_matches_baseline(
    source: Source,
    baseline: Union[GradientProfile, str, os.PathLike[str]],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    seeds: Union[int, Sequence[int], None] = None,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
) -> ProfileComparison:
    """Measure the profile now and raise if any layer moved beyond tolerance from the baseline.

    Args:
        source: the factory (or ``"FILE.py:factory"``) the baseline was recorded from.
        baseline: the recorded :class:`GradientProfile` or its JSON path.
        tolerance: allowed distance in log10 units on top of seed noise (see :func:`compare`).
        seeds: seeds to measure now; default the baseline's own seeds, which reproduces it exactly when
            nothing changed.
        noise_sigmas: multiple of the baseline's seed spread allowed on top of ``tolerance``.

    Returns:
        The :class:`ProfileComparison`, when it passes.

    Raises:
        GradientHealthError: naming every layer that moved, appeared, disappeared or lost its gradient;
            ``.report`` holds the comparison.
        ConfigurationError: for a missing or invalid baseline file, or a bad factory.
    """
    tol = _positive_number("tolerance", tolerance, allow_zero=True)
    sig = _positive_number("noise_sigmas", noise_sigmas, allow_zero=True)
    base = load_profile(baseline)
    current = snapshot(source, seeds=base.seeds if seeds is None else seeds, strict=False)
    result = _compare(base, current, tol, sig, "" if isinstance(baseline, GradientProfile) else str(baseline))
    if not result.ok:
        raise GradientHealthError(str(result), report=result)
    return result
