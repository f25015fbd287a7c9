"""Which parameters a scope watches, the layer each belongs to, and the order layers run in.

A *layer* is the path of the module that owns a parameter (``encoder.layers.3.mlp.fc1``; ``""`` for
parameters registered directly on the root). A parameter shared by several modules (tied embeddings)
is watched once; its layer names every owner, joined by ``+`` (``transformer.wte+lm_head``).

Layer keys cannot collide with the separators and reserved names around them: in each path component
``%``, ``+`` and ``/`` are written ``%25``, ``%2B`` and ``%2F``, and a component that is exactly ``*``
(the whole-model and whole-layer aggregates) is written ``%2A`` (:func:`escape_name`, reversed by
:func:`unescape_name`). Ordinary names are unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn
from torch import Tensor

__all__ = ["TIED_SEPARATOR", "ParamInfo", "ParamLayout", "escape_name", "unescape_name", "unwrap_model"]

TIED_SEPARATOR = "+"
_ESCAPES = (("%", "%25"), ("+", "%2B"), ("/", "%2F"))
_UNESCAPE = {esc: raw for raw, esc in _ESCAPES}
_ESCAPED = re.compile("%25|%2B|%2F")


def escape_name(path: str) -> str:
    """A module path (or parameter name) as it appears in a layer key: reserved characters escaped.

    Example:
        >>> escape_name("blocks.a+b.*")
        'blocks.a%2Bb.%2A'
    """
    parts = []
    for part in path.split("."):
        for raw, esc in _ESCAPES:
            part = part.replace(raw, esc)
        parts.append("%2A" if part == "*" else part)
    return ".".join(parts)


def unescape_name(key: str) -> str:
    """Inverse of :func:`escape_name`."""
    if "%" not in key:
        return key
    parts = []
    for part in key.split("."):
        parts.append("*" if part == "%2A" else _ESCAPED.sub(lambda m: _UNESCAPE[m.group(0)], part))
    return ".".join(parts)


# Wrappers whose own name adds nothing: their parameters are the wrapped module's.
_WRAPPER_ATTRS = (
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside DDP / DataParallel / ``torch.compile`` wrappers.

    Names are reported without the wrapper's prefix (``fc1.weight``, not ``module._orig_mod.fc1.weight``);
    the parameters are the very same tensors, so statistics are unchanged.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for module_name, class_name, attr in _WRAPPER_ATTRS:
            cls = type(model)
            if cls.__name__ == class_name and cls.__module__ == module_name:
                model = getattr(model, attr)
                break
        else:
            break
    return model


@dataclass(frozen=True)
class ParamInfo:
    """One watched parameter.

    Attributes:
        index: position in the layout (and in the statistics buffer).
        name: full name as ``named_parameters()`` gives it first (``fc1.weight``).
        layer: owning module path (escaped, :func:`escape_name`); owners of a tied parameter joined by ``+``.
        param: the parameter's own attribute name (``weight``; escaped the same way).
        aliases: every full name the tensor is reachable under (more than one when tied).
        shape: the parameter's shape.
        numel: number of elements.
        dtype: dtype name (``float32``).
        device: device string (``cpu``, ``cuda:0``).
    """

    index: int
    name: str
    layer: str
    param: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    numel: int
    dtype: str
    device: str

    @property
    def tied(self) -> bool:
        """True when the tensor is shared by more than one module path."""
        return len(self.aliases) > 1


def _split(full_name: str) -> tuple[str, str]:
    layer, _, leaf = full_name.rpartition(".")
    return layer, leaf


@dataclass
class ParamLayout:
    """Every parameter of a model, deduplicated, with its layer; built once per scope.

    Attributes:
        params: every distinct parameter, in registration order. Whether one is trainable is read at
            each step (``requires_grad``), so gradual unfreezing is followed; frozen ones are never flagged.
        layers: distinct layer keys of ``params``, in registration order.
        layer_of_param: for each entry of ``params``, the index of its layer in ``layers``.
        tensors: the parameter tensors, aligned with ``params``.
    """

    params: list[ParamInfo]
    layers: list[str]
    layer_of_param: list[int]
    tensors: list[Tensor] = field(repr=False)

    @property
    def frozen(self) -> list[str]:
        """Names of the parameters that are frozen (``requires_grad=False``) right now."""
        return [info.name for info, t in zip(self.params, self.tensors) if not t.requires_grad]

    @property
    def trainable(self) -> list[str]:
        """Names of the parameters that require a gradient right now."""
        return [info.name for info, t in zip(self.params, self.tensors) if t.requires_grad]

    @classmethod
    def from_model(cls, model: nn.Module) -> ParamLayout:
        """Enumerate ``model``'s parameters once each (tied parameters included once)."""
        aliases: dict[int, list[str]] = {}
        tensors: dict[int, Tensor] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) not in aliases:
                aliases[id(param)] = []
                tensors[id(param)] = param
            aliases[id(param)].append(name)
        params: list[ParamInfo] = []
        watched: list[Tensor] = []
        for key, names in aliases.items():
            p = tensors[key]
            owners: list[str] = []
            for n in names:
                owner = escape_name(_split(n)[0])
                if owner not in owners:
                    owners.append(owner)
            layer, leaf = _split(names[0])
            layer, leaf = escape_name(layer), escape_name(leaf)
            params.append(
                ParamInfo(
                    index=len(params),
                    name=names[0],
                    layer=TIED_SEPARATOR.join(owners) if len(owners) > 1 else layer,
                    param=leaf,
                    aliases=tuple(names),
                    shape=tuple(p.shape),
                    numel=p.numel(),
                    dtype=str(p.dtype).removeprefix("torch."),
                    device=str(p.device),
                )
            )
            watched.append(p)
        layers: list[str] = []
        layer_index: dict[str, int] = {}
        layer_of_param: list[int] = []
        for info in params:
            if info.layer not in layer_index:
                layer_index[info.layer] = len(layers)
                layers.append(info.layer)
            layer_of_param.append(layer_index[info.layer])
        return cls(
            params=params,
            layers=layers,
            layer_of_param=layer_of_param,
            tensors=watched,
        )

    def __len__(self) -> int:
        return len(self.params)

    def layer_members(self) -> list[list[int]]:
        """For each layer, the indices of its parameters."""
        members: list[list[int]] = [[] for _ in self.layers]
        for i, li in enumerate(self.layer_of_param):
            members[li].append(i)
        return members

    def owners(self, layer: str) -> list[str]:
        """Module paths (as ``named_modules()`` gives them) behind a layer key (several for a tied parameter)."""
        return [unescape_name(owner) for owner in layer.split(TIED_SEPARATOR)]
