"""CI health checks: run a few seeded training steps under :func:`gradscope.watch` and judge them.

``check`` answers "does this model train sanely?" in seconds, before a day of accelerator time is
spent: it copies the model, trains the copy for a few steps on one batch with every statistic taken
at every step, and returns the :class:`~gradscope.Report`. ``assert_healthy`` raises
:class:`~gradscope.GradientHealthError` with the findings and the per-layer table when it does not.
"""

from __future__ import annotations

import copy as _copy
import numbers
import operator
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Union

import numpy as np
import torch
import torch.nn as nn

from gradscope.errors import ConfigurationError, GradientHealthError
from gradscope.findings import SEVERITIES, Finding, at_or_above, count_errors
from gradscope.report import Report
from gradscope.rules.engine import RuleSpec
from gradscope.scope import watch

__all__ = [
    "DEFAULT_STEPS",
    "assert_healthy",
    "check",
    "failing_findings",
    "health_message",
    "seeded",
    "validate_fail_on",
]

#: Training steps :func:`check` runs by default: enough for every rule that judges a single step
#: (non-finite values, vanishing or exploding norms, dead units, missing gradients), few enough to
#: take seconds on a CPU.
DEFAULT_STEPS = 5

LossFn = Callable[[Any, Any], torch.Tensor]


def validate_fail_on(fail_on: Any, *, where: str = "`fail_on`") -> str:
    """Return ``fail_on`` if it is a severity name, else raise ``ConfigurationError`` naming the choices."""
    if fail_on not in SEVERITIES:
        raise ConfigurationError(
            f"Expected {where} to be one of {', '.join(map(repr, SEVERITIES))} (the lowest severity that fails), "
            f"but got {fail_on!r}."
        )
    return str(fail_on)


def failing_findings(report: Report, fail_on: str = "error") -> list[Finding]:
    """The findings of ``report`` at or above ``fail_on`` (``"warning"``: all of them; ``"error"``: errors)."""
    return at_or_above(report.findings, validate_fail_on(fail_on))


def _seconds(report: Report) -> float | None:
    info = report.meta.get("check")
    return float(info["seconds"]) if isinstance(info, Mapping) and "seconds" in info else None


def health_message(report: Report, fail_on: str = "error", *, name: str | None = None) -> str:
    """The text of a failed health check: a headline, then the findings and the per-layer table.

    Args:
        report: what :func:`check` (or a watched run) returned.
        fail_on: the lowest severity that fails.
        name: what was checked (a test id, ``FILE.py:factory``); the model class when None.
    """
    failing = failing_findings(report, fail_on)
    n_err = count_errors(failing)
    what = name or report.meta.get("model", "model")
    info = report.meta.get("check")
    run = f"{report.steps} step(s)"
    if isinstance(info, Mapping):
        run += f", seed {info.get('seed')}, {info.get('seconds', 0.0):.2f} s"
    kinds = ", ".join(dict.fromkeys(f"{f.kind} in {f.layer!r}" if f.layer else f.kind for f in failing))
    head = (
        f"gradscope: {what} is unhealthy: {len(failing)} finding(s) at or above {fail_on!r} "
        f"({n_err} error(s), {len(failing) - n_err} warning(s); {run}): {kinds}"
    )
    return f"{head}\n\n{report}"


def _validate(model: Any, batch: Any, loss_fn: Any, steps: Any, optimizer: Any, seed: Any, copy: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch)
        raise ConfigurationError(
            f"Expected `batch` to be a pair (inputs, targets) such that loss_fn(model(inputs), targets) is the loss, "
            f"but got {got}. Wrap a single tensor as (inputs, targets) with the targets your loss_fn expects."
        )
    if not callable(loss_fn):
        raise ConfigurationError(
            f"Expected `loss_fn` to be callable as loss_fn(model(inputs), targets), but got {loss_fn!r}."
        )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps <= 0:
        raise ConfigurationError(f"Expected `steps` to be a positive int, but got {steps!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigurationError(f"Expected `seed` to be an int, but got {seed!r}.")
    seed_value: int = operator.index(seed)
    if not -(2**63) <= seed_value < 2**64:
        raise ConfigurationError(
            f"Expected `seed` to be an int from -2**63 to 2**64-1 (what torch can seed with), but got {seed!r}."
        )
    if not isinstance(copy, bool):
        raise ConfigurationError(f"Expected `copy` to be True or False, but got {copy!r}.")
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationError(
                f"Expected `optimizer` to be a torch.optim.Optimizer or None, but got {type(optimizer).__name__}."
            )
        own = {id(p) for p in model.parameters()}
        foreign = sum(id(p) not in own for g in optimizer.param_groups for p in g["params"])
        if foreign:
            raise ConfigurationError(
                f"The optimizer passed to check() holds {foreign} parameter(s) that are not the model's. Build it "
                "from this model's parameters (torch.optim.Adam(model.parameters())), or leave it out."
            )


def _cuda_indices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextmanager
def seeded(seed: int, cuda_devices: list[int] | None = None) -> Iterator[None]:
    """Seed torch (CPU and the given CUDA devices), ``random`` and NumPy; restore all of them on exit.

    Nothing outside the block sees the seed: a test that runs a check leaves the global random state
    exactly as it found it.

    Args:
        seed: the seed.
        cuda_devices: CUDA device indices whose generators are seeded and restored as well.
    """
    cuda = list(cuda_devices or [])
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        # Not torch.manual_seed: it queues a lazy seed for every CUDA device, which would leak out of
        # the block when CUDA is initialised later.
        torch.random.default_generator.manual_seed(seed)
        for idx in cuda:
            torch.cuda.default_generators[idx].manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _checked_loss(loss: Any, step: int) -> torch.Tensor:
    # Shape and type only: reading the value would be a host sync.
    if not isinstance(loss, torch.Tensor):
        raise ConfigurationError(
            f"Expected loss_fn(model(inputs), targets) to return a scalar tensor, but got {type(loss).__name__} "
            f"at step {step}."
        )
    if loss.numel() != 1:
        raise ConfigurationError(
            f"Expected loss_fn(model(inputs), targets) to return a scalar tensor, but got shape {list(loss.shape)}. "
            "Reduce it to one number (loss.mean(), or reduction='mean' in the loss)."
        )
    if not loss.requires_grad:
        raise ConfigurationError(
            "The loss returned by loss_fn does not require a gradient: it does not depend on any trainable "
            "parameter. Check that loss_fn uses the model's output, and that the model is not frozen or run "
            "under torch.no_grad()."
        )
    return loss.reshape(())


def check(
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: LossFn,
    *,
    steps: int = DEFAULT_STEPS,
    optimizer: torch.optim.Optimizer | None = None,
    rules: RuleSpec = "all",
    thresholds: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    copy: bool = True,
    stats: Union[str, list[str], None] = None,
    activations: bool = True,
) -> Report:
    """Train a copy of ``model`` for a few seeded steps on one batch and return the gradient report.

    Each step is ``zero_grad``, ``loss_fn(model(inputs), targets)``, ``backward``, ``optimizer.step``,
    with every statistic taken at every step (``sample_every=1``) and the rules run once at the end.
    The same ``batch`` is used at every step, so a healthy model's loss falls. The model is put in
    training mode for the run; its own mode is restored afterwards.

    Deterministic: torch's CPU generator (and the CUDA generators of the model's devices), ``random``
    and NumPy are seeded with ``seed`` inside the check and restored afterwards, so the caller's random
    state is untouched and the same call gives the same report.

    Args:
        model: the ``nn.Module`` to check.
        batch: ``(inputs, targets)``; ``inputs`` go to ``model(inputs)`` as they are (put them on the
            model's device).
        loss_fn: ``loss_fn(model(inputs), targets)`` returns the scalar loss.
        steps: optimizer steps to run.
        optimizer: an optimizer over ``model``'s parameters; with ``copy=True`` it is copied along with
            the model (state included), so yours does not move. Default: ``torch.optim.Adam(lr=1e-3)``.
        rules: the rules to run, as in :func:`gradscope.watch` (``"all"``, ``"none"``, names, instances).
        thresholds: per-rule threshold overrides, as in :func:`gradscope.watch`.
        seed: the seed of the run.
        copy: True (default) trains a deep copy, leaving ``model`` and ``optimizer`` untouched so a test
            can reuse them; False trains ``model`` itself (its weights move), for models that cannot be
            copied or do not fit twice in memory.
        stats: statistic names to collect, as in :func:`gradscope.watch` (default: all).
        activations: measure activations (dead and saturated units).

    Returns:
        The :class:`~gradscope.Report`; ``report.meta["check"]`` holds ``seconds`` (wall time of the
        whole check), ``steps``, ``seed``, ``optimizer`` and ``copied``.

    Raises:
        ConfigurationError: for invalid arguments, a model that cannot be copied, or a loss that is not
            a scalar tensor depending on the parameters. Exceptions raised by the model or the loss
            itself propagate unchanged.

    Example:
        >>> import torch, gradscope
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> batch = (torch.randn(16, 4), torch.randn(16, 1))
        >>> report = gradscope.check(model, batch, torch.nn.functional.mse_loss, rules="none")
        >>> report.steps
        5
    """
    started = time.perf_counter()
    _validate(model, batch, loss_fn, steps, optimizer, seed, copy)
    inputs, targets = batch
    modes = {m: m.training for m in model.modules()}
    with seeded(int(seed), _cuda_indices(model)):
        if copy:
            try:
                net, opt = _copy.deepcopy((model, optimizer))
            except Exception as exc:
                raise ConfigurationError(
                    f"check() trains a deep copy of the model so that yours is left untouched, but copying the "
                    f"{type(model).__name__} failed ({type(exc).__name__}: {exc}). Pass copy=False to train the "
                    "model itself, or make it deep-copyable."
                ) from exc
        else:
            net, opt = model, optimizer
        if opt is None:
            trainable = [p for p in net.parameters() if p.requires_grad]
            if not trainable:
                raise ConfigurationError(
                    f"The {type(model).__name__} passed to check() has no trainable parameters "
                    "(all have requires_grad=False), so there is nothing to check."
                )
            opt = torch.optim.Adam(trainable, lr=1e-3)
        try:
            net.train()
            with watch(
                net,
                optimizer=opt,
                rules=rules,
                thresholds=thresholds,
                stats=stats,
                activations=activations,
                sample_every=1,
                flush_every=int(steps),
            ) as scope:
                for step in range(1, int(steps) + 1):
                    opt.zero_grad(set_to_none=True)
                    loss = _checked_loss(loss_fn(net(inputs), targets), step)
                    loss.backward()
                    opt.step()
                    scope.step(loss=loss.detach())
            report = scope.report()
        finally:
            if not copy:
                for m, training in modes.items():
                    m.train(training)
    report.meta["check"] = {
        "seconds": time.perf_counter() - started,
        "steps": int(steps),
        "seed": int(seed),
        "optimizer": type(opt).__name__,
        "copied": copy,
    }
    return report


def assert_healthy(
    model: nn.Module,
    batch: tuple[Any, Any],
    loss_fn: LossFn,
    *,
    fail_on: str = "error",
    **kwargs: Any,
) -> Report:
    """Run :func:`check` and raise if it finds anything at or above ``fail_on``.

    Args:
        model: the ``nn.Module`` to check.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns the scalar loss.
        fail_on: ``"error"`` (default) fails on error findings only; ``"warning"`` on any finding.
        **kwargs: passed to :func:`check` (``steps``, ``optimizer``, ``rules``, ``thresholds``, ``seed``...).

    Returns:
        The report, when healthy.

    Raises:
        GradientHealthError: listing the failing findings and the per-layer table; ``.report`` holds the
            report.
    """
    validate_fail_on(fail_on)
    report = check(model, batch, loss_fn, **kwargs)
    if failing_findings(report, fail_on):
        raise GradientHealthError(health_message(report, fail_on), report=report)
    return report
