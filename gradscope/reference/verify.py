"""``gradscope.verify``: the reference manual backprop against autograd, gradient by gradient.

Both sides run on their own float64 deep copy of the model, so the user's model is never touched: not
its dtype, not its ``.grad``, not its training mode, not its running statistics. The autograd copy
keeps the model's module hooks and the hooks registered on its parameters (a hook that rescales a
gradient is a bug verify should see); the reference copy is only read. Autograd runs first: its
random states let the reference rebuild each dropout mask, and let the finite-difference fallback
replay the same draws.
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gradscope.errors import ConfigurationError
from gradscope.reference.autograd_run import run_autograd
from gradscope.reference.backprop import CallKey, display_name, run_reference
from gradscope.reference.finite_difference import FiniteDifferenceConfig
from gradscope.reference.losses import resolve_loss
from gradscope.reference.report import GradientComparison, JointComparison, VerificationReport, compare, compare_joint
from gradscope.reference.sampled import DirectionalGradient, rounding_rtol

__all__ = ["ATOL_EPS", "ATOL_FRACTION", "DEFAULT_RTOL", "default_atol", "verify"]

#: Default ``rtol`` by dtype. Reference and autograd differ only by the order of floating-point sums:
#: over the test cases float64 agrees to about 1e-15 relative, and 1e-10 leaves room for deeper models
#: and for gradients that are small differences of large terms.
DEFAULT_RTOL: dict[torch.dtype, float] = {dtype: rounding_rtol(dtype) for dtype in (torch.float64, torch.float32)}

#: The default ``atol`` is this fraction of ``rtol`` times the largest gradient magnitude in the model:
#: a gradient that is zero in exact arithmetic (a bias followed by BatchNorm) is rounding noise on both
#: sides, as large as the terms that cancelled, and an absolute floor that scales with the model's own
#: gradients lets it pass at any loss scale, where a fixed constant would not.
ATOL_FRACTION = 1e-3

#: ... and at least this many machine epsilons of ``dtype`` times that magnitude. An exact zero is a
#: sum whose terms cancel, and the rounding of a sum of n terms grows like √n · ε: 256 = √65536 covers
#: a conv bias summed over tens of thousands of positions in float32, where ``1e-3 * rtol`` (1e-7) is
#: below one ε. In float64 ``1e-3 * rtol`` (1e-13) is the larger and decides.
ATOL_EPS = 256


def default_atol(dtype: torch.dtype, rtol: float, largest: float) -> float:
    """The default ``atol``: ``max(ATOL_FRACTION * rtol, ATOL_EPS * eps(dtype))`` times the largest gradient."""
    return max(ATOL_FRACTION * rtol, ATOL_EPS * torch.finfo(dtype).eps) * largest


ON_UNSUPPORTED = ("error", "finite_difference")


def _check_tolerance(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigurationError(f"Expected `{name}` to be a non-negative float, but got {value!r}.")
    if not value <= sys.float_info.max:
        # inf (or NaN, or an int too large for a float) would let every comparison pass silently
        raise ConfigurationError(
            f"Expected `{name}` to be a finite non-negative float, but got {value!r}: it would let every "
            f"comparison pass. Pass a finite tolerance such as {name}=1e-6, or leave it out for the default."
        )


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors to ``dtype``, detached; anything else (class indices) unchanged."""
    if isinstance(value, Tensor):
        return value.detach().to(dtype) if value.is_floating_point() else value.detach()
    return value


def copy_model(model: nn.Module, dtype: torch.dtype, *, keep_parameter_hooks: bool) -> nn.Module:
    """A deep copy of ``model`` in ``dtype``, optionally keeping the hooks registered on its parameters.

    ``copy.deepcopy`` copies module hooks but drops tensor hooks on parameters, so each parameter is
    copied here first, and the hooks are registered again on the copy.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        clone = param.detach().to(dtype if param.is_floating_point() else param.dtype, copy=True)
        new = nn.Parameter(clone, requires_grad=param.requires_grad)
        # Tensor hooks live in a private dict; there is no public way to list them.
        for hook in (getattr(param, "_backward_hooks", None) or {}).values() if keep_parameter_hooks else ():
            new.register_hook(hook)
        memo[id(param)] = new
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as error:
        raise ConfigurationError(
            f"gradscope.verify works on a deep copy of the model, but copy.deepcopy({type(model).__name__}) "
            f"raised {type(error).__name__}: {error}"
        ) from error
    return copied.to(dtype)


def _copy_loss(loss_fn: Callable[..., Tensor], dtype: torch.dtype) -> Callable[..., Tensor]:
    """The loss with its weight tensors in ``dtype`` (a loss module or a partial of a functional loss)."""
    if isinstance(loss_fn, nn.Module):
        return copy.deepcopy(loss_fn).to(dtype)
    if isinstance(loss_fn, functools.partial):
        keywords = {k: _cast(v, dtype) for k, v in loss_fn.keywords.items()}
        return functools.partial(loss_fn.func, *loss_fn.args, **keywords)
    return loss_fn


def verify(
    model: nn.Module,
    inputs: Tensor,
    targets: Any,
    loss_fn: Callable[[Tensor, Any], Tensor],
    *,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
    on_unsupported: str = "finite_difference",
    fd_coordinates: int = 16,
    fd_directions: int = 4,
    fd_rtol: float | None = None,
    fd_atol: float | None = None,
    seed: int = 0,
) -> VerificationReport:
    """Check autograd's gradients against the reference manual backprop, layer by layer.

    Runs ``loss_fn(model(inputs), targets)`` forward and backward twice, once by autograd and once by
    the references in :mod:`gradscope.reference`, each on a deep copy of ``model`` in ``dtype``, and
    compares every trainable parameter's gradient, the gradient at every module call's input, the
    gradient of the model output and every module's forward output. A bug in a custom
    ``autograd.Function``, a hook that rescales gradients, or an in-place write into a tensor autograd
    saved shows up as a mismatch at the layer where it happens and upstream of it.

    Args:
        model: built from ``nn.Sequential``, :class:`~gradscope.reference.Residual`,
            ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` and module types with a registered
            reference (``@gradscope.register_reference``). Its mode (train / eval) is used as is.
        inputs: ``[N, ...]`` the batch's inputs (a tensor; floating point ones are cast to ``dtype``).
        targets: the batch's targets (floating point ones are cast to ``dtype``; class indices kept).
        loss_fn: ``loss_fn(model(inputs), targets)`` returns the scalar loss. ``nn.MSELoss``,
            ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss``, ``nn.NLLLoss`` (reduction ``mean`` or
            ``sum``), their ``torch.nn.functional`` forms and ``functools.partial`` of those have
            references; for any other callable, d loss / d output comes from autograd applied to the
            loss alone (the model's backward is still checked), and the report says so.
        dtype: the dtype both sides run in; ``torch.float64`` (default) or ``torch.float32``.
        rtol: relative tolerance against the larger magnitude of the two gradients; default 1e-10 in
            float64, 1e-4 in float32.
        atol: absolute tolerance; by default ``max(1e-3 * rtol, 256 * eps(dtype))`` times the largest
            gradient magnitude in the model (see :data:`ATOL_FRACTION`, :data:`ATOL_EPS`), so gradients
            that are zero in exact arithmetic pass: 1e-13 in float64, 3.1e-5 in float32.
        on_unsupported: ``"finite_difference"`` (default) checks a module without a reference numerically
            (the table and the verdict say which tensors were); ``"error"`` raises
            :class:`~gradscope.UnsupportedLayerError` for it instead, naming it. The numerical check (see
            :mod:`gradscope.reference.finite_difference`): its input and each of its parameters, entry by
            entry when the tensor has at most ``fd_coordinates`` entries, otherwise along
            ``fd_directions`` random sign directions that cover the whole tensor.
        fd_coordinates: tensors with at most this many entries are differenced entry by entry.
        fd_directions: random directions per larger tensor (four forwards of the module each). A single
            wrong entry is seen by every direction; any error is missed with probability at most
            2^-fd_directions.
        fd_rtol: a fixed relative tolerance for numerical checks. By default (``None``) each estimate
            carries its own error bound (two step sizes and the rounding of the module's working
            precision), and autograd's side is allowed ``rtol``.
        fd_atol: a fixed absolute tolerance for numerical checks (``None``: derived, as ``fd_rtol``).
        seed: seeds the finite-difference directions.

    Returns:
        A :class:`~gradscope.reference.VerificationReport`; ``print(report)`` shows the table,
        ``report.ok`` the verdict and ``report.mismatches`` every disagreement.

    Raises:
        ConfigurationError: for an invalid argument, a loss that is not a scalar, a model that cannot
            be deep-copied, or a model, batch or loss that fails before anything is compared (the
            model does not fit the batch, a target out of range, a model that returns no tensor); the
            message summarises the error and how to fix it.
        UnsupportedLayerError: for a module without a reference when ``on_unsupported="error"``.

    Example:
        >>> import torch, torch.nn as nn, gradscope
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> report = gradscope.verify(model, x, y, nn.CrossEntropyLoss(label_smoothing=0.1))
        >>> report.ok
        True
    """
    if dtype not in DEFAULT_RTOL:
        raise ConfigurationError(f"Expected `dtype` to be torch.float64 or torch.float32, but got {dtype!r}.")
    for name, value in (("rtol", rtol), ("atol", atol), ("fd_rtol", fd_rtol), ("fd_atol", fd_atol)):
        _check_tolerance(name, value)
    if on_unsupported not in ON_UNSUPPORTED:
        raise ConfigurationError(
            f"Expected `on_unsupported` to be one of {', '.join(map(repr, ON_UNSUPPORTED))}, but got {on_unsupported!r}."
        )
    for name, count in (("fd_coordinates", fd_coordinates), ("fd_directions", fd_directions)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"Expected `{name}` to be a positive int, but got {count!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigurationError(f"Expected `seed` to be an int, but got {seed!r}.")
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if not isinstance(inputs, Tensor):
        raise ConfigurationError(
            f"Expected `inputs` to be a tensor (the model is called as model(inputs)), but got {type(inputs).__name__}."
        )
    if not callable(loss_fn):
        raise ConfigurationError(f"Expected `loss_fn` to be callable, but got {loss_fn!r}.")
    rtol = DEFAULT_RTOL[dtype] if rtol is None else float(rtol)

    resolve_loss(loss_fn)  # a loss with reduction="none" fails here, before any work

    x, t = _cast(inputs, dtype), _cast(targets, dtype)
    autograd = run_autograd(copy_model(model, dtype, keep_parameter_hooks=True), x, t, _copy_loss(loss_fn, dtype))
    reference = run_reference(
        copy_model(model, dtype, keep_parameter_hooks=False),
        x,
        t,
        _copy_loss(loss_fn, dtype),
        masks=autograd.masks,
        on_unsupported=on_unsupported,
        finite_difference=FiniteDifferenceConfig(coordinates=fd_coordinates, directions=fd_directions, seed=seed),
        rng_states=autograd.rng_states,
        resume=autograd.input_grads,
    )

    # The tolerance floor follows the reference's gradients (the side under no suspicion), ignoring
    # non-finite entries, which fail their own comparison anyway.
    scale = _largest_magnitude(
        [g for g in (*reference.param_grads.values(), *reference.input_grads.values()) if isinstance(g, Tensor)]
        + [reference.output_grad]
    )
    atol = default_atol(dtype, rtol, scale) if atol is None else float(atol)
    value_scale = _largest_magnitude([*reference.outputs.values(), reference.loss])
    value_atol = default_atol(dtype, rtol, value_scale)

    joint = _joint_checks(reference, autograd, rtol=rtol, atol=atol)

    def check(ref: Any, auto: Tensor, name: str, kind: str, layer: str = "") -> GradientComparison:
        group = joint.get(id(ref.joint)) if isinstance(ref, DirectionalGradient) and ref.joint else None
        if group is not None and group.ok and fd_rtol is None and fd_atol is None:
            # The joint check covered this tensor and agreed: no need to difference it alone.
            return GradientComparison(
                name=name,
                kind=kind,
                shape=tuple(auto.shape),
                abs_error=group.abs_error,
                rel_error=group.abs_error / group.scale if group.scale > 0 else 0.0,
                ok=True,
                method="finite_difference",
                compared=ref.count,
                layer=layer,
                scale=group.scale,
                detail=group.detail + (f"; left out: {ref.excluded}" if ref.excluded else ""),
            )
        return compare(
            ref,
            auto,
            name=name,
            kind=kind,
            rtol=rtol,
            atol=value_atol if kind in ("forward", "loss") else atol,
            layer=layer,
            fd_rtol=fd_rtol,
            fd_atol=fd_atol,
        )

    notes = list(reference.notes)
    comparisons: list[GradientComparison] = []
    owned: dict[CallKey, list[str]] = {}
    for param_name, key in reference.owners.items():
        owned.setdefault(key, []).append(param_name)
    rank = {key: i for i, key in enumerate(reference.backward_order)}
    origin_rank: dict[tuple[str, str], int] = {("output", "(model)"): -1}
    finished = {key: i for i, key in enumerate(reference.forward_order)}

    for key in reference.order:
        name = display_name(key)
        if key in reference.input_grads:
            if key in autograd.input_grads:
                comparisons.append(check(reference.input_grads[key], autograd.input_grads[key], name, "input", name))
                origin_rank[("input", name)] = rank.get(key, len(rank))
            elif key in autograd.watched:  # hooked, yet no gradient arrived: the view was written in place
                notes.append(
                    f"Autograd's gradient at the input of {name!r} could not be observed (a module that writes "
                    "into its input in place hides it); its parameters are still compared."
                )
        for param_name in owned.get(key, []):
            if param_name in autograd.param_grads:
                comparisons.append(
                    check(
                        reference.param_grads[param_name],
                        autograd.param_grads[param_name],
                        param_name,
                        "parameter",
                        name,
                    )
                )
                origin_rank[("parameter", param_name)] = rank.get(key, len(rank))
    reached = {path for path, _ in reference.backward_order}
    for param_name, grad in autograd.param_grads.items():
        if param_name in reference.param_grads:
            continue
        path = param_name.rpartition(".")[0]
        if reference.stopped and path not in reached:
            # The pass stopped below this module (no gradient to continue from): nothing to compare.
            comparisons.append(
                GradientComparison(
                    name=param_name,
                    kind="parameter",
                    shape=tuple(grad.shape),
                    abs_error=0.0,
                    rel_error=0.0,
                    ok=True,
                    layer=path,
                    status="not checked",
                    detail=f"the reference pass did not reach module {path or '(model)'!r} (see the notes)",
                )
            )
            continue
        # Its module ran, yet no reference produced it: compare against zero, which passes only if autograd agrees.
        comparisons.append(check(torch.zeros_like(grad), grad, param_name, "parameter"))
        if grad.abs().max() > 0:
            notes.append(f"No reference computed a gradient for {param_name!r}, but autograd did.")
    if autograd.output_grad is not None:
        comparisons.append(check(reference.output_grad, autograd.output_grad, "(model)", "output", "(model)"))

    for key in reference.order:
        ref_out, auto_out = reference.outputs.get(key), autograd.outputs.get(key)
        if ref_out is not None and auto_out is not None and ref_out.shape == auto_out.shape:
            comparisons.append(check(ref_out, auto_out, display_name(key), "forward", display_name(key)))
            origin_rank[("forward", display_name(key))] = finished.get(key, len(finished))
    comparisons.append(check(reference.loss, autograd.loss, "(loss)", "loss"))
    origin_rank[("loss", "(loss)")] = len(finished)

    return VerificationReport(
        comparisons=comparisons,
        dtype=dtype,
        rtol=rtol,
        atol=atol,
        fd_rtol=fd_rtol,
        fd_atol=fd_atol,
        loss_reference=float(reference.loss),
        loss_autograd=float(autograd.loss),
        loss_method=reference.loss_method,
        loss_name=_loss_name(loss_fn),
        origin_rank=origin_rank,
        notes=notes,
    )


def _joint_checks(reference: Any, autograd: Any, *, rtol: float, atol: float) -> dict[int, JointComparison]:
    """The joint check of each module differenced numerically, by ``id`` of its joint estimate.

    A module whose tensors do not all have autograd's gradient (an input autograd could not observe)
    is left out: its tensors are then differenced one by one.
    """
    groups: dict[int, list[tuple[DirectionalGradient, Tensor | None]]] = {}
    for key, grad in reference.input_grads.items():
        if isinstance(grad, DirectionalGradient) and grad.joint is not None:
            groups.setdefault(id(grad.joint), []).append((grad, autograd.input_grads.get(key)))
    for name, grad in reference.param_grads.items():
        if isinstance(grad, DirectionalGradient) and grad.joint is not None:
            groups.setdefault(id(grad.joint), []).append((grad, autograd.param_grads.get(name)))
    results = {}
    for key, members in groups.items():
        complete = [(estimate, auto) for estimate, auto in members if auto is not None]
        joint = members[0][0].joint
        if joint is not None and len(complete) == len(members) == joint.members:
            results[key] = compare_joint(complete, rtol=rtol, atol=atol)
    return results


def _largest_magnitude(tensors: list[Tensor]) -> float:
    """The largest |entry| over the finite entries of ``tensors`` (0 when there is none)."""
    largest = 0.0
    for tensor in tensors:
        finite = tensor[torch.isfinite(tensor)]
        if finite.numel():
            # sync point: verify is a one-off check; the tolerance floor is needed on the host.
            largest = max(largest, float(finite.abs().max()))
    return largest


def _loss_name(loss_fn: Callable[..., Any]) -> str:
    if isinstance(loss_fn, nn.Module):
        return type(loss_fn).__name__
    if isinstance(loss_fn, functools.partial):
        return f"partial({getattr(loss_fn.func, '__name__', repr(loss_fn.func))})"
    return getattr(loss_fn, "__qualname__", None) or repr(loss_fn)
