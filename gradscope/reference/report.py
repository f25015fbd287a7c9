"""What ``gradscope.verify`` returns: one comparison per gradient, and a readable verdict."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from gradscope.errors import GradientHealthError
from gradscope.reference.sampled import DirectionalGradient, SampledGradient

__all__ = ["GradientComparison", "JointComparison", "VerificationReport", "compare", "compare_joint"]

#: What :func:`compare` takes as the reference side: a tensor, or a numerical estimate.
GradientOrEstimate = Union[Tensor, SampledGradient, DirectionalGradient]

#: Kinds of comparison. Gradients: ``parameter`` (d loss / d parameter), ``input`` (d loss / d a module
#: call's input), ``output`` (d loss / d model output). Values: ``forward`` (a module call's output)
#: and ``loss``; those are listed only when they disagree.
KINDS = ("parameter", "input", "output", "forward", "loss")
_GRADIENT_KINDS = ("parameter", "input", "output")


@dataclass(frozen=True)
class GradientComparison:
    """Reference against autograd for one tensor.

    Attributes:
        name: the parameter name (``"1.weight"``) or the module path of the call (``"encoder.2"``,
            ``"(model)"`` for the model itself).
        kind: one of ``parameter``, ``input``, ``output``, ``forward``, ``loss`` (see :data:`KINDS`).
        shape: the tensor's shape.
        abs_error: max |reference - autograd| over the compared numbers.
        rel_error: ``abs_error`` / max(|reference|, |autograd|) over the compared numbers (0 when both are 0).
        ok: False only when the two disagree beyond tolerance (see :attr:`status`).
        method: ``"reference"`` (manual backprop, every entry) or ``"finite_difference"`` (checked
            numerically: see :attr:`detail`).
        compared: how many numbers were compared: entries, or directional derivatives.
        layer: the module call that produced it (its path, as in ``name`` for inputs).
        scale: max(|reference|, |autograd|) over the compared numbers. When it is below ``atol`` the
            gradient is zero up to rounding (a bias followed by BatchNorm), and ``rel_error`` means little.
        status: ``"agrees"``, ``"differs"``, ``"not comparable"`` (both sides non-finite: NaN or the same
            infinity, at every entry) or ``"not checked"`` (no numerical counterpart; :attr:`detail` says why).
        detail: for a numerical check, what was checked (``"all 12 entries"``, ``"4 random sign directions"``)
            and what was left out and why; for the other statuses, the reason.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    abs_error: float
    rel_error: float
    ok: bool
    method: str = "reference"
    compared: int = 0
    layer: str = ""
    scale: float = 0.0
    status: str = "agrees"
    detail: str = ""

    def describe(self) -> str:
        """One sentence: what was compared and by how much it differs."""
        what = {
            "parameter": f"gradient of parameter {self.name!r}",
            "input": f"gradient at the input of {self.name!r}",
            "output": "gradient of the loss with respect to the model output",
            "forward": f"forward output of {self.name!r}",
            "loss": "loss value",
        }[self.kind]
        if self.status in ("not comparable", "not checked"):
            return f"The {what} is {self.status}: {self.detail}."
        how = f" (checked numerically: {self.detail})" if self.method == "finite_difference" else ""
        return (
            f"The {what} {self.status}{how}: max abs error {self.abs_error:.3g}, relative error {self.rel_error:.3g}."
        )


def compare(
    reference: GradientOrEstimate,
    autograd: Tensor,
    *,
    name: str,
    kind: str,
    rtol: float,
    atol: float,
    layer: str = "",
    fd_rtol: float | None = None,
    fd_atol: float | None = None,
) -> GradientComparison:
    """Compare a reference tensor (or a numerical estimate) with autograd's.

    A tensor is compared entry by entry: ``|reference - autograd| <= atol + rtol * max(|reference|,
    |autograd|)`` over the whole tensor. Entries where both sides are non-finite alike (NaN and NaN, or
    the same infinity) are left out; when that leaves nothing, the status is ``"not comparable"``.

    A numerical estimate (:class:`SampledGradient`, :class:`DirectionalGradient`) is compared number by
    number: estimate e_j of ⟨∇, v_j⟩ with error bound E_j against a_j = ⟨autograd, v_j⟩, passing when
    ``|e_j - a_j| <= E_j + (atol + rtol' * max|autograd|) * ‖v_j‖₂``, where ``rtol'`` is the larger of
    ``rtol`` and the rounding of the module's own working precision: the entry-by-entry allowance for
    autograd's rounding, summed over the direction's entries as independent errors add. ``fd_rtol`` / ``fd_atol``, when
    given, replace that bound with ``fd_atol * ‖v_j‖₂ + fd_rtol * max(|e_j|, |a_j|)``.

    Args:
        reference: the reference value, or a numerical estimate.
        autograd: autograd's value, the full tensor.
        name: see :class:`GradientComparison`.
        kind: see :class:`GradientComparison`.
        rtol: relative tolerance, against the larger magnitude of the two tensors.
        atol: absolute tolerance.
        layer: see :class:`GradientComparison`.
        fd_rtol: a fixed relative tolerance for numerical estimates, instead of their error bounds.
        fd_atol: a fixed absolute tolerance for numerical estimates, instead of their error bounds.
    """
    shape = tuple(autograd.shape)
    if isinstance(reference, DirectionalGradient) and reference.joint is not None and reference.joint.refine:
        reference = reference.joint.refine(reference.label)  # compared alone: difference it alone
    if isinstance(reference, (SampledGradient, DirectionalGradient)):
        return _compare_numerical(reference, autograd, name, kind, rtol, atol, layer, fd_rtol, fd_atol)
    ref, auto = reference.detach().to(torch.float64), autograd.detach().to(torch.float64)
    alike = ~torch.isfinite(ref) & ~torch.isfinite(auto) & ((ref == auto) | (ref.isnan() & auto.isnan()))
    # sync point: verify is a one-off check, not a training step; its numbers go to the host.
    skipped = int(alike.sum())
    if skipped and skipped == ref.numel():
        return GradientComparison(
            name=name,
            kind=kind,
            shape=shape,
            abs_error=math.nan,
            rel_error=math.nan,
            ok=True,
            compared=0,
            layer=layer,
            scale=math.nan,
            status="not comparable",
            detail="both sides are NaN or infinite at every entry",
        )
    ref, auto = ref[~alike], auto[~alike]
    if ref.numel() == 0:
        abs_error, scale = 0.0, 0.0
    else:
        # sync point: verify is a one-off check, not a training step; its numbers go to the host.
        abs_error = float((ref - auto).abs().max())
        scale = max(float(ref.abs().max()), float(auto.abs().max()))
    rel_error = abs_error / scale if scale > 0 else (0.0 if abs_error == 0 else math.inf)
    ok = math.isfinite(abs_error) and math.isfinite(scale) and abs_error <= atol + rtol * scale
    detail = f"{skipped} entries non-finite on both sides left out" if skipped else ""
    return GradientComparison(
        name=name,
        kind=kind,
        shape=shape,
        abs_error=abs_error,
        rel_error=rel_error,
        ok=ok,
        compared=int(ref.numel()),
        layer=layer,
        scale=scale,
        status="agrees" if ok else "differs",
        detail=detail,
    )


@dataclass(frozen=True)
class JointComparison:
    """The joint check of one module's tensors (see :class:`~gradscope.reference.sampled.JointEstimate`).

    Attributes:
        ok: every joint directional derivative agrees with autograd's within its tolerance.
        abs_error: max over directions of |estimate - autograd|.
        scale: max over directions of max(|estimate|, |autograd|).
        detail: what was checked, in words.
    """

    ok: bool
    abs_error: float
    scale: float
    detail: str


def compare_joint(members: list[tuple[DirectionalGradient, Tensor]], *, rtol: float, atol: float) -> JointComparison:
    """Compare a joint estimate with autograd's gradients of the same tensors, projected the same way.

    Autograd's side is Σ_T ⟨autograd_T, w_T v_{T,j}⟩, and the tolerance is the estimate's error bound
    plus, for each tensor, the allowance of :func:`compare` for its rounding.

    Args:
        members: each tensor's :class:`DirectionalGradient` (all sharing one ``joint``) and autograd's gradient.
        rtol: relative tolerance of autograd's rounding (the larger of this and the module's own applies).
        atol: absolute tolerance per entry.
    """
    joint = members[0][0].joint
    assert joint is not None
    projected = torch.zeros_like(joint.values)
    allowance = torch.zeros_like(joint.values)
    covered = 0
    for estimate, autograd in members:
        values, reach = estimate.project(autograd)
        projected = projected + values.to(projected.device)
        # sync point: verify is a one-off check; autograd's largest entry scales its rounding allowance.
        largest = float(autograd.detach().abs().max()) if autograd.numel() else 0.0
        allowance = allowance + (atol + max(rtol, estimate.rtol) * largest) * reach.to(projected.device)
        covered += estimate.shape.numel() if estimate.mask is None else int(estimate.mask.sum())
    diff = (joint.values - projected).abs()
    # sync point: verify is a one-off check, not a training step; its numbers go to the host.
    abs_error = float(diff.max()) if diff.numel() else 0.0
    scale = float(torch.maximum(joint.values.abs(), projected.abs()).max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(joint.values).all() and torch.isfinite(projected).all())  # sync point: as above
    ok = finite and bool((diff <= joint.errors + allowance).all())  # sync point: as above
    others = joint.members - 1
    detail = (
        f"{joint.values.numel()} random sign directions over {covered} entries, "
        + (f"jointly with {others} other tensor{'s' if others != 1 else ''} of {joint.layer!r}" if others else "")
    ).rstrip(", ")
    return JointComparison(ok=ok, abs_error=abs_error, scale=scale, detail=detail)


def _compare_numerical(
    reference: SampledGradient | DirectionalGradient,
    autograd: Tensor,
    name: str,
    kind: str,
    rtol: float,
    atol: float,
    layer: str,
    fd_rtol: float | None,
    fd_atol: float | None,
) -> GradientComparison:
    shape = tuple(autograd.shape)
    left_out = f"; left out: {reference.excluded}" if reference.excluded else ""
    if reference.count == 0:
        return GradientComparison(
            name=name,
            kind=kind,
            shape=shape,
            abs_error=0.0,
            rel_error=0.0,
            ok=True,
            method="finite_difference",
            layer=layer,
            status="not checked",
            detail=reference.excluded or "nothing to difference",
        )
    projected, reach = reference.project(autograd)
    # sync point: verify is a one-off check; autograd's largest entry scales its rounding allowance.
    largest = float(autograd.detach().abs().max()) if autograd.numel() else 0.0
    estimate = reference.values.to(device=projected.device, dtype=torch.float64)
    bound = (
        reference.errors.to(device=projected.device, dtype=torch.float64)
        if reference.errors is not None
        else torch.zeros_like(estimate)
    )
    if isinstance(reference, SampledGradient):
        detail = f"all {reference.count} entries" if reference.complete else f"{reference.count} entries"
    else:
        covered = reference.shape.numel() if reference.mask is None else int(reference.mask.sum())
        detail = f"{reference.count} random sign directions over {covered} entries"
    detail += left_out
    diff = (estimate - projected).abs()
    magnitude = torch.maximum(estimate.abs(), projected.abs())
    if fd_rtol is not None or fd_atol is not None:
        tolerance = (fd_atol or 0.0) * reach + (fd_rtol or 0.0) * magnitude
    else:
        # Autograd's side may be off by atol + rtol' * max|autograd| per entry, as in an entry-by-entry
        # comparison; along a sign direction those errors add up like a random walk, to ‖v_j‖₂ times that.
        tolerance = bound + (atol + max(rtol, reference.rtol) * largest) * reach
    if not bool(torch.isfinite(estimate).all()):  # sync point: verify is a one-off check on the host
        return GradientComparison(
            name=name,
            kind=kind,
            shape=shape,
            abs_error=math.nan,
            rel_error=math.nan,
            ok=True,
            method="finite_difference",
            compared=reference.count,
            layer=layer,
            scale=math.nan,
            status="not comparable",
            detail="the module's output is not finite around this point, so finite differences are undefined",
        )
    # sync point: verify is a one-off check, not a training step; its numbers go to the host.
    abs_error = float(diff.max())
    scale = float(magnitude.max())
    ok = math.isfinite(abs_error) and bool((diff <= tolerance).all())  # sync point: as above
    rel_error = abs_error / scale if scale > 0 else (0.0 if abs_error == 0 else math.inf)
    return GradientComparison(
        name=name,
        kind=kind,
        shape=shape,
        abs_error=abs_error,
        rel_error=rel_error,
        ok=ok,
        method="finite_difference",
        compared=reference.count,
        layer=layer,
        scale=scale,
        status="agrees" if ok else "differs",
        detail=detail,
    )


@dataclass
class VerificationReport:
    """Reference manual backprop against autograd for one batch: every gradient, and the verdict.

    ``print(report)`` shows a table of every gradient compared. ``report.ok`` is True when all agree;
    ``report.mismatches`` lists every disagreement at once; ``report.first_mismatch`` is where the
    disagreement starts (the first in backward order), which is the layer to look at.

    Attributes:
        comparisons: every comparison, gradients in forward order of their layers, then the output.
        dtype: the dtype both sides ran in.
        rtol: relative tolerance for reference gradients.
        atol: absolute tolerance for reference gradients (the floor computed from the model's gradients,
            unless one was given).
        fd_rtol: the fixed relative tolerance for numerical checks, if one was given (``None``: each
            estimate's own error bound, see :func:`compare`).
        fd_atol: the fixed absolute tolerance for numerical checks, if one was given.
        loss_reference: the loss the reference computed.
        loss_autograd: the loss autograd computed.
        loss_method: ``"reference"`` or ``"autograd"`` (an unrecognised loss_fn: d loss / d output came
            from autograd on the loss alone, so the output gradient is not an independent check).
        loss_name: the loss, in words (``"CrossEntropyLoss"``).
        origin_rank: for each ``(kind, name)``, the position of its module call in the order that locates
            where a disagreement starts: forward values by when their forward finished, gradients by
            when their backward finished.
        notes: what could not be compared, and why.
    """

    comparisons: list[GradientComparison]
    dtype: torch.dtype
    rtol: float
    atol: float
    fd_rtol: float | None
    fd_atol: float | None
    loss_reference: float
    loss_autograd: float
    loss_method: str
    loss_name: str
    origin_rank: dict[tuple[str, str], int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing differs: every gradient, layer output and the loss agree, or cannot be compared."""
        return all(c.ok for c in self.comparisons)

    @property
    def comparable(self) -> bool:
        """False when the loss is NaN or infinite on both sides: then no gradient means anything."""
        return not any(c.kind == "loss" and c.status == "not comparable" for c in self.comparisons)

    @property
    def verdict(self) -> str:
        """``"agree"``, ``"differ"`` (some gradient or value differs) or ``"not comparable"`` (a non-finite loss)."""
        if not self.ok:
            return "differ"
        return "agree" if self.comparable else "not comparable"

    @property
    def numerical(self) -> list[GradientComparison]:
        """The gradients checked numerically (finite differences) rather than entry by entry by a reference."""
        return [c for c in self.gradients if c.method == "finite_difference"]

    @property
    def mismatches(self) -> list[GradientComparison]:
        """Every comparison that failed, in the order of :attr:`comparisons`."""
        return [c for c in self.comparisons if not c.ok]

    @property
    def gradients(self) -> list[GradientComparison]:
        """The gradient comparisons only (parameters, layer inputs, model output)."""
        return [c for c in self.comparisons if c.kind in _GRADIENT_KINDS]

    @property
    def first_mismatch(self) -> GradientComparison | None:
        """Where the disagreement starts.

        A forward disagreement (a layer whose reference output differs from the module's) comes first:
        the first layer, in the order forwards finished, whose output is wrong. Otherwise the first
        gradient disagreement in backward order: a wrong backward, or a hook that rescales a gradient,
        corrupts everything upstream of it, so the earliest wrong gradient on the way back is the one to
        look at.
        """
        bad = self.mismatches
        if not bad:
            return None
        forward = [c for c in bad if c.kind in ("forward", "loss")]
        kind_order = {"forward": 0, "loss": 1, "output": 0, "parameter": 1, "input": 2}
        return min(forward or bad, key=lambda c: (self.origin_rank.get((c.kind, c.name), 1 << 30), kind_order[c.kind]))

    def raise_for_status(self) -> None:
        """Raise :class:`gradscope.GradientHealthError` listing every mismatch, if there is one."""
        if not self.ok:
            raise GradientHealthError(str(self), report=self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: settings, verdict and every comparison."""
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "dtype": str(self.dtype).replace("torch.", ""),
            "rtol": self.rtol,
            "atol": self.atol,
            "loss": {"reference": self.loss_reference, "autograd": self.loss_autograd, "method": self.loss_method},
            "first_mismatch": self.first_mismatch.name if self.first_mismatch else None,
            "comparisons": [{**asdict(c), "shape": list(c.shape)} for c in self.comparisons],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """The verdict in one or two sentences, saying what was checked only numerically."""
        gradients = self.gradients
        bad = self.mismatches
        if not self.comparable:
            return (
                "Not comparable: the loss is NaN or infinite on both sides, so no gradient can be checked. "
                "Fix the model, batch or loss so that the loss is finite (see the rows marked 'not comparable')."
            )
        if not bad:
            return f"All {len(gradients)} gradients agree.{self._coverage()}"
        first = self.first_mismatch
        assert first is not None
        bad_gradients = [c for c in bad if c.kind in _GRADIENT_KINDS]
        head = f"{len(bad_gradients)} of {len(gradients)} gradients differ"
        if len(bad) > len(bad_gradients):
            head += f", and {len(bad) - len(bad_gradients)} forward values"
        return f"{head}. The disagreement starts at {_where(first)}: {first.describe()}{self._coverage()}"

    def _coverage(self) -> str:
        """What was checked only numerically, and what not at all, in words ("" when every entry was)."""
        parts = []
        numerical = [c for c in self.numerical if c.status in ("agrees", "differs")]
        if numerical:
            layers = sorted({c.layer or c.name for c in numerical})
            shown = ", ".join(repr(n) for n in layers[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
            directional = sum("directions" in c.detail for c in numerical)
            how = [
                f"{n} {what}"
                for n, what in (
                    (directional, "along random directions"),
                    (len(numerical) - directional, "entry by entry"),
                )
                if n
            ]
            parts.append(
                f" {len(numerical)} of them were checked only numerically, by finite differences "
                f"({', '.join(how)}), in the layers without a reference: {shown}."
            )
        unchecked = [c for c in self.gradients if c.status in ("not checked", "not comparable")]
        if unchecked:
            parts.append(
                f" {len(unchecked)} could not be checked: "
                + "; ".join(f"{c.name!r}: {c.detail}" for c in unchecked)
                + "."
            )
        return "".join(parts)

    def __str__(self) -> str:
        shown = [c for c in self.comparisons if c.kind in _GRADIENT_KINDS or not c.ok]
        header = ("tensor", "kind", "shape", "max abs err", "rel err", "result")
        rows = [
            (
                c.name,
                c.kind,
                "[" + ", ".join(map(str, c.shape)) + "]",
                "-" if c.status in ("not checked", "not comparable") else f"{c.abs_error:.2e}",
                "-" if c.status in ("not checked", "not comparable") else _relative(c, self._atol_for(c)),
                _result(c),
            )
            for c in shown
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        loss_how = (
            f"by reference ({self.loss_name})"
            if self.loss_method == "reference"
            else f"by autograd on the loss alone ({self.loss_name} has no reference)"
        )
        lines = [
            f"gradscope.verify: reference backprop vs autograd in {str(self.dtype).replace('torch.', '')} "
            f"(rtol={self.rtol:.3g}, atol={self.atol:.3g})",
            f"loss {self.loss_reference:.12g} (reference) vs {self.loss_autograd:.12g} (autograd); "
            f"d loss / d output {loss_how}",
            "",
            "  " + line.format(*header).rstrip(),
            *("  " + line.format(*r).rstrip() for r in rows),
        ]
        if any(r[4] == "~0 (*)" for r in rows):
            lines.append(
                "  (*) both gradients are below atol: zero in exact arithmetic, rounding noise in floating point "
                "(for example a bias followed by normalization), so their relative error means nothing."
            )
        lines.extend(f"note: {note}" for note in self.notes)
        head = {"agree": "PASS: ", "differ": "FAIL: ", "not comparable": "NOT COMPARABLE: "}[self.verdict]
        lines += ["", head + self.summary()]
        return "\n".join(lines)

    def _atol_for(self, c: GradientComparison) -> float:
        return self.fd_atol if c.method == "finite_difference" and self.fd_atol is not None else self.atol


def _relative(c: GradientComparison, atol: float) -> str:
    return f"{c.rel_error:.2e}" if c.scale > atol or not c.ok else "~0 (*)"


def _result(c: GradientComparison) -> str:
    """The table's result cell: the verdict, and how a numerical row was checked."""
    if c.status in ("not comparable", "not checked"):
        return c.status
    verdict = "ok" if c.ok else "MISMATCH"
    return f"{verdict} (numerically: {c.detail})" if c.method == "finite_difference" else verdict


def _where(c: GradientComparison) -> str:
    if c.kind == "parameter":
        return f"parameter {c.name!r} (layer {c.layer!r})"
    if c.kind in ("input", "forward"):
        return f"layer {c.name!r}"
    return "the loss"
