"""Trainer integrations, each an optional extra imported only when used.

- :class:`GradscopeCallback` (``gradscope.integrations.lightning``): PyTorch Lightning,
  ``pip install 'gradscope[lightning]'``.
- :class:`GradscopeTrainerCallback` (``gradscope.integrations.huggingface``): the Hugging Face
  ``Trainer``, ``pip install 'gradscope[hf]'``.

Importing this package imports neither framework; the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradscope.integrations.huggingface import GradscopeTrainerCallback
    from gradscope.integrations.lightning import GradscopeCallback

__all__ = ["GradscopeCallback", "GradscopeTrainerCallback"]

_WHERE = {
    "GradscopeCallback": "gradscope.integrations.lightning",
    "GradscopeTrainerCallback": "gradscope.integrations.huggingface",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'gradscope.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
