"""``gradscope verify FILE.py:factory``: the reference backprop against autograd, from the shell.

Exit codes: 0 when every gradient agrees, 1 when some gradient (or forward value) differs, 2 when the
check cannot be made: a usage error, a factory that cannot be loaded, a model, batch or loss that fails
on its own (the error is summarised with a hint), a loss that is NaN or infinite on both sides, or a
module without a reference with ``--on-unsupported error``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from gradscope.errors import UnsupportedLayerError

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


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
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance. Default: 1e-10 in float64")
    parser.add_argument(
        "--atol",
        type=float,
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
        type=int,
        default=4,
        help="random directions per tensor for modules checked numerically. Default: %(default)r",
    )
    parser.add_argument(
        "--json", metavar="PATH", default=None, help="also write the report as JSON to PATH ('-' for stdout)"
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
    except UnsupportedLayerError as error:
        print(f"gradscope verify: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(report.to_dict(), handle, indent=2)
    if not report.ok:
        return EXIT_MISMATCH
    if not report.comparable:
        print(f"gradscope verify: error: {report.summary()}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
