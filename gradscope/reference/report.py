"""What ``gradscope.verify`` returns: one comparison per gradient, and a readable verdict."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradscope.errors import GradientHealthError
from gradscope.reference.sampled import SampledGradient

__all__ = ["GradientComparison", "VerificationReport", "compare"]

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
        abs_error: max |reference - autograd| over the compared entries.
        rel_error: ``abs_error`` / max(|reference|, |autograd|) over the compared entries (0 when both are 0).
        ok: ``abs_error <= atol + rtol * max(|reference|, |autograd|)``, both finite.
        method: ``"reference"`` (manual backprop) or ``"finite_difference"`` (a sample of coordinates).
        compared: how many entries were compared (all of them, or the finite-difference sample).
        layer: the module call that produced it (its path, as in ``name`` for inputs).
        scale: max(|reference|, |autograd|) over the compared entries. When it is below ``atol`` the
            gradient is zero up to rounding (a bias followed by BatchNorm), and ``rel_error`` means little.
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

    def describe(self) -> str:
        """One sentence: what was compared and by how much it differs."""
        what = {
            "parameter": f"gradient of parameter {self.name!r}",
            "input": f"gradient at the input of {self.name!r}",
            "output": "gradient of the loss with respect to the model output",
            "forward": f"forward output of {self.name!r}",
            "loss": "loss value",
        }[self.kind]
        verdict = "agrees" if self.ok else "differs"
        return f"The {what} {verdict}: max abs error {self.abs_error:.3g}, relative error {self.rel_error:.3g}."


def compare(
    reference: Tensor | SampledGradient,
    autograd: Tensor,
    *,
    name: str,
    kind: str,
    rtol: float,
    atol: float,
    layer: str = "",
) -> GradientComparison:
    """Compare a reference tensor (or a finite-difference sample) with autograd's, entry by entry.

    Args:
        reference: the reference value; for a :class:`SampledGradient`, only its coordinates are compared.
        autograd: autograd's value, the full tensor.
        name: see :class:`GradientComparison`.
        kind: see :class:`GradientComparison`.
        rtol: relative tolerance, against the larger magnitude of the two tensors.
        atol: absolute tolerance.
        layer: see :class:`GradientComparison`.
    """
    method = "reference"
    if isinstance(reference, SampledGradient):
        method = "finite_difference"
        ref = reference.values
        auto = autograd.reshape(-1)[reference.indices.to(autograd.device)]
    else:
        ref, auto = reference, autograd
    ref, auto = ref.detach().to(torch.float64), auto.detach().to(torch.float64)
    if ref.numel() == 0:
        abs_error, scale = 0.0, 0.0
    else:
        # sync point: verify is a one-off check, not a training step; its numbers go to the host.
        abs_error = float((ref - auto).abs().max())
        scale = max(float(ref.abs().max()), float(auto.abs().max()))
    rel_error = abs_error / scale if scale > 0 else (0.0 if abs_error == 0 else math.inf)
    ok = math.isfinite(abs_error) and math.isfinite(scale) and abs_error <= atol + rtol * scale
    return GradientComparison(
        name=name,
        kind=kind,
        shape=tuple(autograd.shape),
        abs_error=abs_error,
        rel_error=rel_error,
        ok=ok,
        method=method,
        compared=int(ref.numel()),
        layer=layer,
        scale=scale,
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
        fd_rtol: relative tolerance for finite-difference samples.
        fd_atol: absolute tolerance for finite-difference samples.
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
    fd_rtol: float
    fd_atol: float
    loss_reference: float
    loss_autograd: float
    loss_method: str
    loss_name: str
    origin_rank: dict[tuple[str, str], int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every gradient, layer output and the loss agree within tolerance."""
        return all(c.ok for c in self.comparisons)

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
            "dtype": str(self.dtype).replace("torch.", ""),
            "rtol": self.rtol,
            "atol": self.atol,
            "loss": {"reference": self.loss_reference, "autograd": self.loss_autograd, "method": self.loss_method},
            "first_mismatch": self.first_mismatch.name if self.first_mismatch else None,
            "comparisons": [{**asdict(c), "shape": list(c.shape)} for c in self.comparisons],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """The verdict in one or two sentences."""
        gradients = self.gradients
        bad = self.mismatches
        if not bad:
            return f"All {len(gradients)} gradients agree."
        first = self.first_mismatch
        assert first is not None
        bad_gradients = [c for c in bad if c.kind in _GRADIENT_KINDS]
        head = f"{len(bad_gradients)} of {len(gradients)} gradients differ"
        if len(bad) > len(bad_gradients):
            head += f", and {len(bad) - len(bad_gradients)} forward values"
        return f"{head}. The disagreement starts at {_where(first)}: {first.describe()}"

    def __str__(self) -> str:
        shown = [c for c in self.comparisons if c.kind in _GRADIENT_KINDS or not c.ok]
        header = ("tensor", "kind", "shape", "max abs err", "rel err", "result")
        rows = [
            (
                c.name,
                c.kind,
                "[" + ", ".join(map(str, c.shape)) + "]",
                f"{c.abs_error:.2e}",
                f"{c.rel_error:.2e}" if c.scale > self._atol_for(c) or not c.ok else "~0 (*)",
                ("ok" if c.ok else "MISMATCH")
                + (f" (finite differences, {c.compared} entries)" if c.method == "finite_difference" else ""),
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
        lines += ["", ("PASS: " if self.ok else "FAIL: ") + self.summary()]
        return "\n".join(lines)

    def _atol_for(self, c: GradientComparison) -> float:
        return self.fd_atol if c.method == "finite_difference" else self.atol


def _where(c: GradientComparison) -> str:
    if c.kind == "parameter":
        return f"parameter {c.name!r} (layer {c.layer!r})"
    if c.kind in ("input", "forward"):
        return f"layer {c.name!r}"
    return "the loss"
