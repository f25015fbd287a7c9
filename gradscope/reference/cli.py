"""``gradscope verify FILE.py:factory``: the reference backprop against autograd, from the shell.

Exit codes: 0 when every gradient agrees, 1 when some gradient (or forward value) differs, 2 when the
check cannot be made: a usage error, a factory that cannot be loaded, a model, batch or loss that fails
on its own (the error is summarised with a hint), a loss that is NaN or infinite on both sides, a
module without a reference with ``--on-unsupported error``, ``sys.exit`` called by the model or the
loss, or a ``--json`` file that cannot be written.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

import torch

from gradscope._io import atomic_write_text, echo
from gradscope.errors import ConfigurationError, UnsupportedLayerError

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _tolerance(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(
                f"Expected `{name}` to be a non-negative float, finite (for example 1e-6), but got {text!r}."
            )
        return value

    return parse


def _directions(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"Expected a whole number of directions from 1 to 4096 (4), but got {text!r}.")
    return value


def _json_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("Expected a file path, or '-' for stdout, but got an empty string.")
    return text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand to the ``gradscope`` parser."""
    parser = subparsers.add_parser(
        "verify",
        help="check autograd's gradients against the reference manual backprop, layer by layer",
        description=(
            "Run the model that FILE.py:factory returns forward and backward twice, by autograd and by "
            "gradscope's reference manual backprop, and compare every gradient. Exit 0 when all agree, "
            "1 when some differ, 2 when the check cannot be made (usage or load error; the model, batch or "
            "loss fails; a NaN loss on both sides; a module without a reference with --on-unsupported error)."
        ),
    )
    parser.add_argument(
        "factory", metavar="FILE.py:factory", help="returns (model, (inputs, targets), loss_fn[, optimizer])"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float64", help="Default: %(default)r")
    parser.add_argument(
        "--rtol", type=_tolerance("rtol"), default=None, help="relative tolerance. Default: 1e-10 in float64"
    )
    parser.add_argument(
        "--atol",
        type=_tolerance("atol"),
        default=None,
        help="absolute tolerance. Default: 1e-3 * rtol * the largest gradient magnitude",
    )
    parser.add_argument(
        "--on-unsupported",
        choices=("error", "finite_difference"),
        default="finite_difference",
        help="a module without a reference is checked numerically, or is an error (exit 2). Default: %(default)r",
    )
    parser.add_argument(
        "--fd-directions",
        type=_directions,
        default=4,
        help="random directions per tensor for modules checked numerically. Default: %(default)r",
    )
    parser.add_argument(
        "--json",
        type=_json_path,
        metavar="PATH",
        default=None,
        help="also write the report as JSON to PATH ('-' for stdout)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the factory, verify, print the report; return the exit code."""
    from gradscope._factory import load_factory
    from gradscope.reference.verify import verify

    loaded = load_factory(args.factory)  # FactoryError is a ConfigurationError: cli.main maps it to 2
    inputs, targets = loaded.batch
    try:
        report = verify(
            loaded.model,
            inputs,
            targets,
            loaded.loss_fn,
            dtype=_DTYPES[args.dtype],
            rtol=args.rtol,
            atol=args.atol,
            on_unsupported=args.on_unsupported,
            fd_directions=args.fd_directions,
        )
    except (UnsupportedLayerError, ConfigurationError) as error:
        echo(f"gradscope verify: error: {error}", err=True)
        return EXIT_USAGE
    except SystemExit as exc:
        # An exit 0 from the user's model or loss must not read as "every gradient agrees".
        code = "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"
        echo(
            f"gradscope verify: error: the model or loss_fn of {args.factory!r} called {code}; nothing was "
            "compared. The model, batch and loss_fn must run as loss_fn(model(inputs), targets) without exiting.",
            err=True,
        )
        return EXIT_USAGE
    except Exception as exc:
        reason = " ".join(str(exc).split()).rstrip(".")
        echo(
            f"gradscope verify: error: verifying {args.factory!r} raised {type(exc).__name__}: {reason}. Check that "
            "loss_fn(model(inputs), targets) runs on the batch the factory returns.",
            err=True,
        )
        return EXIT_USAGE
    text = json.dumps(report.to_dict(), indent=2) + "\n"
    if args.json == "-":
        echo(text.rstrip("\n"))
    else:
        echo(str(report))
        if args.json:
            try:
                atomic_write_text(args.json, text)
            except OSError as exc:
                echo(f"gradscope verify: error: cannot write --json {args.json!r}: {exc}", err=True)
                return EXIT_USAGE
    if not report.ok:
        return EXIT_MISMATCH
    if not report.comparable:
        echo(f"gradscope verify: error: {report.summary()}", err=True)
        return EXIT_USAGE
    return EXIT_OK
