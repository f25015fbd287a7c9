"""Forward order: which layers run first, learned from the first forward pass by a pre-hook.

Parameter order in ``model.parameters()`` is registration order, not the order data flows through
the model. Rules that compare the input side with the output side, and the first layer named for a
non-finite gradient (in backward order), need the real one. One global forward pre-hook
(``torch.nn.modules.module.register_module_forward_pre_hook``) notes when each of the model's
modules first starts, picked by identity; it is removed after the first step. Being global, it
leaves nothing on the user's modules (``torch.save(model)`` and ``copy.deepcopy(model)`` work before
step 1 too), and a deep copy's forward passes are not counted.

A module whose ``forward`` never runs (``nn.MultiheadAttention`` uses its ``out_proj`` weights
functionally) is placed by its nearest ancestor that ran: right after the last layer seen inside
that ancestor, or at the ancestor's own start when none was. Flow plots and heat maps then show it
in place instead of after the model's head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from gradscope.capture.activations import ActivationInfo
from gradscope.capture.hooks import HookManager
from gradscope.capture.layout import ParamLayout
from gradscope.capture.weakcall import WeakCall

__all__ = ["ForwardOrder"]


class ForwardOrder:
    """The depth order of a model's layers and where its activation modules run among them.

    Args:
        layout: the watched parameters and their layers.
        hooks: the scope's hook manager (owns the handle, under :attr:`GROUP`).
    """

    GROUP = "order"

    def __init__(self, layout: ParamLayout, hooks: HookManager) -> None:
        self._layout = layout
        self._hooks = hooks
        self._seen: list[int] = []  # layer indices in the order their modules first started forward
        # activation index -> how many layers had started forward when it first ran
        self._act_position: dict[int, int] = {}
        # module identity -> (module, path, layer indices it owns, activation index or None)
        self._watch: dict[int, tuple[nn.Module, str, list[int], int | None]] = {}
        self._started: dict[str, int] = {}  # module path -> rank of its first start
        self._layer_start: dict[int, int] = {}  # layer index -> rank of its first start
        self._paths: list[str] = []  # the model's module paths (for placing layers that never ran)
        self._order_cache: list[int] | None = None
        self._may_be_attached = False  # attach() registered the pre-hook and detach() has not run since

    def attach(self, module: nn.Module, activations: Iterable[tuple[ActivationInfo, nn.Module]] = ()) -> None:
        """Register the pre-hook for ``module``'s modules and the watched activation modules.

        Args:
            module: the unwrapped model whose named modules own the layout's layers.
            activations: the watched activation modules: where each runs among the layers tells which
                are output activations (a confident sigmoid classifier saturates by design).
        """
        owners: dict[str, list[int]] = {}
        for li, layer in enumerate(self._layout.layers):
            for owner in self._layout.owners(layer):
                owners.setdefault(owner, []).append(li)
        act_of = {id(sub): info.index for info, sub in activations}
        self._watch = {}
        self._paths = []
        for path, sub in module.named_modules():
            self._paths.append(path)
            if id(sub) not in self._watch:
                self._watch[id(sub)] = (sub, path, owners.get(path, []), act_of.get(id(sub)))
        self.detach()
        # Weakly bound: the global registry never keeps the order (and its scope) alive.
        hook = WeakCall(self, "_on_pre_forward")
        self._hooks.add(self.GROUP, torch.nn.modules.module.register_module_forward_pre_hook(hook))
        self._may_be_attached = True

    def detach(self) -> None:
        """Remove the pre-hook (idempotent; the order is known after the first step)."""
        if not self._may_be_attached:  # (called at every step: nothing to look up once detached)
            return
        self._may_be_attached = False
        if self._hooks.count(self.GROUP):
            self._hooks.remove(self.GROUP)

    @property
    def attached(self) -> bool:
        """Whether the pre-hook is registered (before the end of the first step)."""
        return self._hooks.count(self.GROUP) > 0

    @property
    def seen_any(self) -> bool:
        """Whether a watched module has started forward (the order is known once a step saw one)."""
        return bool(self._started)

    def depth_order(self) -> list[int]:
        """Layer indices, input side first.

        Layers whose module never started forward are placed by their nearest ancestor that did (see
        the module docstring); those with no such ancestor come last, in layout order.
        """
        if self._order_cache is not None:
            return list(self._order_cache)
        n = len(self._layout.layers)
        seen = set(self._seen)
        keyed: list[tuple[float, int]] = [(float(self._layer_start[li]), li) for li in self._seen]
        tail: list[int] = []
        for li in range(n):
            if li in seen:
                continue
            key = self._placement(li)
            if key is None:
                tail.append(li)
            else:
                keyed.append((key, li))
        keyed.sort()
        self._order_cache = [li for _, li in keyed] + tail
        return list(self._order_cache)

    def layers_by_depth(self) -> list[str]:
        """Layer keys in the order their modules first ran forward (input side first)."""
        return [self._layout.layers[i] for i in self.depth_order()]

    def output_activations(self) -> list[int]:
        """Activation modules that ran after every parameter layer had started (nothing learnable follows)."""
        n_layers = len(self._seen)
        return sorted(a for a, pos in self._act_position.items() if n_layers and pos >= n_layers)

    # -- internals -----------------------------------------------------------------------------------
    def _placement(self, li: int) -> float | None:
        """Sort key of a layer that never ran: just after the last module started inside its nearest started ancestor."""
        best: float | None = None
        for owner in self._layout.owners(self._layout.layers[li]):
            anc = next((a for a in _ancestors(owner) if a in self._started), None)
            if anc is None:
                continue
            prefix = f"{anc}." if anc else ""
            inside = [self._started[p] for p in self._paths if p.startswith(prefix) and p in self._started]
            key = max([*inside, self._started[anc]]) + 0.5
            best = key if best is None else min(best, key)
        return best

    def _on_pre_forward(self, module: nn.Module, args: object) -> None:
        entry = self._watch.get(id(module))
        if entry is None or entry[0] is not module:
            return  # another model, or a deep copy of this one
        _, path, layers, act = entry
        if path not in self._started:
            self._started[path] = len(self._started)
            self._order_cache = None
        for li in layers:
            if li not in self._layer_start:
                self._layer_start[li] = self._started[path]
                self._seen.append(li)
        if act is not None:
            self._act_position.setdefault(act, len(self._seen))


def _ancestors(path: str) -> Iterable[str]:
    """``"a.b.c"`` -> ``"a.b"``, ``"a"``, ``""`` (the root)."""
    while path:
        path = path.rpartition(".")[0]
        yield path
