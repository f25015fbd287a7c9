"""Forward order: which layers run first, learned from the first forward pass by pre-hooks.

Parameter order in ``model.parameters()`` is registration order, not the order data flows through
the model. Rules that compare the input side with the output side, and the first layer named for a
non-finite gradient (in backward order), need the real one. Forward pre-hooks on the modules that own
parameters note when each layer first starts; they are removed after the first step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch.nn as nn

from gradscope.capture.activations import ActivationInfo
from gradscope.capture.hooks import HookManager
from gradscope.capture.layout import ParamLayout

__all__ = ["ForwardOrder"]


class ForwardOrder:
    """The depth order of a model's layers and where its activation modules run among them.

    Args:
        layout: the watched parameters and their layers.
        hooks: the scope's hook manager (owns the handles, under :attr:`GROUP`).
    """

    GROUP = "order"

    def __init__(self, layout: ParamLayout, hooks: HookManager) -> None:
        self._layout = layout
        self._hooks = hooks
        self._seen: list[int] = []  # layer indices in the order their modules first started forward
        # activation index -> how many layers had started forward when it first ran
        self._act_position: dict[int, int] = {}

    def attach(self, module: nn.Module, activations: Iterable[tuple[ActivationInfo, nn.Module]] = ()) -> None:
        """Register the pre-hooks on ``module``'s layers and on the watched activation modules.

        Args:
            module: the unwrapped model whose named modules own the layout's layers.
            activations: the watched activation modules: where each runs among the layers tells which
                are output activations (a confident sigmoid classifier saturates by design).
        """
        owners: dict[str, list[int]] = {}
        for li, layer in enumerate(self._layout.layers):
            for owner in self._layout.owners(layer):
                owners.setdefault(owner, []).append(li)
        for path, sub in module.named_modules():
            if path in owners:
                self._hooks.add(self.GROUP, sub.register_forward_pre_hook(self._layer_hook(owners[path])))
        for info, sub in activations:
            self._hooks.add(self.GROUP, sub.register_forward_pre_hook(self._activation_hook(info.index)))

    def detach(self) -> None:
        """Remove the pre-hooks (idempotent; the order is known after the first step)."""
        if self._hooks.count(self.GROUP):
            self._hooks.remove(self.GROUP)

    def depth_order(self) -> list[int]:
        """Layer indices, input side first; layers never seen running forward come last, in layout order."""
        seen = list(self._seen)
        return seen + [i for i in range(len(self._layout.layers)) if i not in seen]

    def layers_by_depth(self) -> list[str]:
        """Layer keys in the order their modules first ran forward (input side first)."""
        return [self._layout.layers[i] for i in self.depth_order()]

    def output_activations(self) -> list[int]:
        """Activation modules that ran after every parameter layer had started (nothing learnable follows)."""
        n_layers = len(self._seen)
        return sorted(a for a, pos in self._act_position.items() if n_layers and pos >= n_layers)

    def _layer_hook(self, layer_indices: list[int]) -> Callable[[nn.Module, object], None]:
        def hook(module: nn.Module, args: object) -> None:
            for li in layer_indices:
                if li not in self._seen:
                    self._seen.append(li)

        return hook

    def _activation_hook(self, act_index: int) -> Callable[[nn.Module, object], None]:
        def hook(module: nn.Module, args: object) -> None:
            self._act_position.setdefault(act_index, len(self._seen))

        return hook
