"""``gradscope verify FILE.py:factory``: the reference backprop against autograd, from the shell.

Exit codes: 0 when every gradient agrees, 1 when some differ, 2 for a usage or load error (including
a module without a reference, unless ``--on-unsupported finite_difference``).
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
            "1 when some differ, 2 for usage or load errors."
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
        default="error",
        help="what to do with a module that has no reference. Default: %(default)r",
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
    return EXIT_OK if report.ok else EXIT_MISMATCH
