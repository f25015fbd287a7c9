"""Load a user's ``FILE.py:factory`` for the command line (check, snapshot, verify)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from gradscope.errors import ConfigurationError

__all__ = ["FactoryError", "LoadedFactory", "call_factory", "load_callable", "load_factory"]

_EXPECTED = (
    "Expected the factory to return (model, batch, loss_fn) or (model, batch, loss_fn, optimizer), "
    "where batch is (inputs, targets) and loss_fn(model(inputs), targets) returns a scalar loss."
)


def _exit_text(code: object) -> str:
    return "sys.exit()" if code is None else f"sys.exit({code!r})"


class FactoryError(ConfigurationError):
    """Raised when ``FILE.py:factory`` cannot be loaded or returns the wrong shape (CLI exit code 2)."""


@dataclass
class LoadedFactory:
    """What a factory returned, checked."""

    model: nn.Module
    batch: tuple[Any, Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    optimizer: torch.optim.Optimizer | None
    spec: str


def load_callable(spec: str) -> Callable[[], Any]:
    """Import ``FILE.py`` from ``"FILE.py:factory"`` and return the factory, not called yet.

    Raises:
        FactoryError: for a malformed spec, a missing file or attribute, an import that raises or calls
            ``sys.exit``, or a non-callable attribute. ``KeyboardInterrupt`` propagates.
    """
    path_text, sep, attr = spec.rpartition(":")
    if not sep or not path_text or not attr:
        raise FactoryError(f"Expected FILE.py:factory (for example model_health.py:make), but got {spec!r}.")
    path = Path(path_text)
    if not path.is_file():
        raise FactoryError(
            f"Cannot find the file {str(path)!r} named in {spec!r}. Check the path (relative to {Path.cwd()})."
        )
    module_name = f"_gradscope_factory_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise FactoryError(f"Cannot import {str(path)!r}: is it a Python file?")
    module = importlib.util.module_from_spec(module_spec)
    # Let the file import its neighbours, as `python FILE.py` would.
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as exc:
        # An exit code 0 from here would read as "healthy" to CI: it is a load error like any other.
        raise FactoryError(
            f"Importing {str(path)!r} called {_exit_text(exc.code)}. A factory file must not exit when imported: "
            'put script code under `if __name__ == "__main__":`.'
        ) from None
    except Exception as exc:
        raise FactoryError(f"Importing {str(path)!r} raised {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.resolve().parent))
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise FactoryError(
            f"{str(path)!r} has no attribute {attr!r}. Callables defined there: {', '.join(public) or '(none)'}."
        )
    if not callable(fn):
        raise FactoryError(f"{spec!r} names {type(fn).__name__} {fn!r}, which is not callable. {_EXPECTED}")
    return fn


def load_factory(spec: str) -> LoadedFactory:
    """Import ``FILE.py``, call ``factory()`` and check what it returns.

    Raises:
        FactoryError: for a missing file or attribute, a factory that raises, or a wrong return shape.
    """
    return call_factory(load_callable(spec), spec)


def call_factory(fn: Callable[[], Any], spec: str) -> LoadedFactory:
    """Call a factory (loaded from ``FILE.py:factory`` or passed from Python) and check what it returns.

    Args:
        fn: the factory, called without arguments.
        spec: how to name it in error messages (``"FILE.py:make"`` or the function's name).

    Raises:
        FactoryError: for a factory that raises, calls ``sys.exit`` or returns the wrong shape.
            ``KeyboardInterrupt`` propagates.
    """
    try:
        result = fn()
    except SystemExit as exc:
        raise FactoryError(
            f"The factory {spec!r} called {_exit_text(exc.code)} instead of returning (model, batch, loss_fn). "
            f"{_EXPECTED}"
        ) from None
    except Exception as exc:
        raise FactoryError(f"The factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, (tuple, list)) or len(result) not in (3, 4):
        got = (
            f"a {type(result).__name__} of length {len(result)}"
            if isinstance(result, (tuple, list))
            else repr(type(result).__name__)
        )
        raise FactoryError(f"{spec!r} returned {got}. {_EXPECTED}")
    model, batch, loss_fn = result[:3]
    optimizer = result[3] if len(result) == 4 else None
    if not isinstance(model, nn.Module):
        raise FactoryError(
            f"{spec!r} returned {type(model).__name__} as the model; it must be a torch.nn.Module. {_EXPECTED}"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise FactoryError(
            f"{spec!r} returned a batch of type {type(batch).__name__}; it must be a pair (inputs, targets). {_EXPECTED}"
        )
    if not callable(loss_fn):
        raise FactoryError(f"{spec!r} returned {loss_fn!r} as loss_fn; it must be callable. {_EXPECTED}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise FactoryError(
            f"{spec!r} returned {type(optimizer).__name__} as the optimizer; it must be a torch.optim.Optimizer or be left out."
        )
    return LoadedFactory(model=model, batch=(batch[0], batch[1]), loss_fn=loss_fn, optimizer=optimizer, spec=spec)
