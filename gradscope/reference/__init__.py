"""Reference manual backprop: every supported layer's forward and backward, written out by hand.

Importing this package registers the built-in references. The pieces, in the order data flows:

- :mod:`~gradscope.reference.base`: what a reference is (:class:`ReferenceLayer`, :class:`LossReference`),
  with what it needs below it: :mod:`~gradscope.reference.calls` (what a composite reference sees of the
  pass) and :mod:`~gradscope.reference.sampled` (a gradient known on a sample of coordinates).
- one file per layer family: ``linear``, ``conv``, ``embedding``, ``activations``, ``dropout``,
  ``norm``, ``pooling``, ``rnn``, ``shape``, ``attention``, ``containers``, ``transformer``, and ``losses``.
- :mod:`~gradscope.reference.backprop`: the pass that walks the model (:func:`manual_backward`).
- :mod:`~gradscope.reference.finite_difference`: the numerical check for modules without a reference.
- :mod:`~gradscope.reference.verify`: :func:`verify`, reference against autograd, and its report.
"""

from __future__ import annotations

from gradscope.reference import (  # noqa: F401  (importing a layer module registers its references)
    activations,
    attention,
    containers,
    conv,
    dropout,
    embedding,
    linear,
    losses,
    norm,
    pooling,
    rnn,
    shape,
    transformer,
    upsample,
)
from gradscope.reference.attention import SelfAttention
from gradscope.reference.backprop import BackpropResult, manual_backward
from gradscope.reference.base import LossReference, ReferenceLayer
from gradscope.reference.containers import Residual
from gradscope.reference.report import GradientComparison, VerificationReport
from gradscope.reference.rnn import Recurrent
from gradscope.reference.verify import verify

__all__ = [
    "BackpropResult",
    "GradientComparison",
    "LossReference",
    "Recurrent",
    "ReferenceLayer",
    "Residual",
    "SelfAttention",
    "VerificationReport",
    "manual_backward",
    "verify",
]
