"""The ``gradscope check`` and ``gradscope snapshot`` commands.

``gradscope check FILE.py:factory [FILE.py:factory ...]`` builds each model with its factory, runs
:func:`gradscope.check` on it (and, with ``--baseline``, compares its gradient profile at init), prints
the report and the time it took, and writes ``--json``, ``--junit`` and ``--markdown`` files for CI.
Exit status: 0 healthy, 1 unhealthy at or above ``--fail-on`` (or the profile moved), 2 usage or load
error (the check could not run); with several targets the highest wins.

``gradscope snapshot FILE.py:factory -o profile.json`` records the gradient profile baseline.
"""

from __future__ import annotations

import argparse
import ast
import math
import time
from typing import Any, Callable

from gradscope._factory import call_factory, load_callable
from gradscope._io import echo
from gradscope.baseline import DEFAULT_SEEDS, DEFAULT_TOLERANCE, compare, load_profile, snapshot
from gradscope.ci_report import CheckRecord, junit_xml, markdown, write_json
from gradscope.errors import ConfigurationError, GradientHealthError
from gradscope.findings import EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE, SEVERITIES
from gradscope.health import DEFAULT_STEPS, check, seeded

__all__ = ["add_parser", "parse_rules", "parse_seeds", "parse_thresholds", "run_check", "run_snapshot"]


def parse_rules(text: str) -> list[str]:
    """``"all,-overfitting"`` -> ``["all", "-overfitting"]`` (the ``rules=`` of :func:`gradscope.watch`)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"Expected a comma-separated list of rule names, but got {text!r}.")
    return names


def parse_thresholds(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["vanishing_gradients.ratio=1e-4"]`` -> ``{"vanishing_gradients": {"ratio": 1e-4}}``.

    Raises:
        ConfigurationError: for an item not of the form ``RULE.NAME=VALUE``.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        rule, dot, name = key.strip().partition(".")
        if not sep or not dot or not rule or not name or not raw.strip():
            raise ConfigurationError(
                f"Expected --threshold RULE.NAME=VALUE (for example vanishing_gradients.ratio=1e-4), but got {item!r}."
            )
        try:
            value: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            # not a Python literal (or one nested too deep to parse): the rule validates the text itself
            value = raw.strip()
        out.setdefault(rule, {})[name] = value
    return out


#: Seeds the command accepts: what torch, ``random`` and NumPy can all be seeded with.
MAX_SEED = 2**32 - 1
#: Largest ``--steps``: check keeps every step in memory, and a health check is meant to take seconds.
MAX_STEPS = 100_000


def _int_or_none(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def parse_seeds(text: str) -> Any:
    """``"3"`` -> 3 (seeds 0, 1, 2); ``"0,5,7"`` -> ``[0, 5, 7]``.

    Raises:
        argparse.ArgumentTypeError: not a count from 1 to 1000 nor a list of distinct seeds from 0 to 2**32-1.
    """
    bad = argparse.ArgumentTypeError(
        "Expected a number of seeds (3) or a list (0,5,7): a count from 1 to 1000 (3 means seeds 0, 1, 2) or "
        f"distinct seeds from 0 to {MAX_SEED}, but got {text!r}."
    )
    if "," not in text:
        count = _int_or_none(text)
        if count is None or not 1 <= count <= 1000:
            raise bad
        return count
    seeds = [_int_or_none(t) for t in text.split(",") if t.strip()]
    if not seeds or any(s is None or not 0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise bad
    return seeds


def _positive_int(text: str) -> int:
    value = _int_or_none(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"Expected a positive int, but got {text!r}.")
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(
            f"Expected at most {MAX_STEPS} steps (a health check keeps every step in memory), but got {text!r}."
        )
    return value


def _seed(text: str) -> int:
    value = _int_or_none(text)
    if value is None or not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"Expected a whole number from 0 to {MAX_SEED} (2**32-1), but got {text!r}.")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"Expected a finite non-negative number of log10 units (0.3 = a factor 2), but got {text!r}."
        )
    return value


def _output_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("Expected a file path, but got an empty string.")
    return text


def add_parser(subparsers: Any) -> None:
    """Add the ``check`` and ``snapshot`` subcommands."""
    p = subparsers.add_parser(
        "check",
        help="train a model a few steps and fail when its gradients are unhealthy",
        description=(
            "Build each model with FILE.py:factory (returning model, batch, loss_fn[, optimizer]), train it for a "
            "few seeded steps on the batch, and report unhealthy gradients. Exit 0 healthy, 1 unhealthy at or "
            "above --fail-on (or the gradient profile moved beyond --tolerance), 2 usage or load error."
        ),
    )
    p.add_argument("targets", nargs="+", metavar="FILE.py:factory", help="factories to check")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS, help="training steps. Default: %(default)r")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the factory call and the run. Default: %(default)r")
    p.add_argument(
        "--fail-on",
        choices=SEVERITIES,
        default="error",
        help="lowest finding severity that fails (exit 1). Default: %(default)r",
    )
    p.add_argument(
        "--rules",
        type=parse_rules,
        default=["all"],
        metavar="NAMES",
        help="comma-separated rules to run; -NAME leaves one out (all,-overfitting). Default: all",
    )
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="RULE.NAME=VALUE",
        help="override a rule threshold (repeatable), e.g. vanishing_gradients.ratio=1e-4",
    )
    p.add_argument(
        "--baseline", metavar="PROFILE.json", help="also compare the gradient profile at init with this baseline"
    )
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=None,
        metavar="LOG10",
        help=f"allowed profile change in log10 units, on top of seed noise. Default: {DEFAULT_TOLERANCE!r}",
    )
    p.add_argument("--json", type=_output_path, metavar="PATH", help="write every check with its full report as JSON")
    p.add_argument(
        "--junit", type=_output_path, metavar="PATH", help="write a JUnit XML file (one test case per check)"
    )
    p.add_argument(
        "--markdown", type=_output_path, metavar="PATH", help="write a Markdown summary (for a CI job summary)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only one line per check")
    p.set_defaults(func=run_check)

    s = subparsers.add_parser(
        "snapshot",
        help="record the per-layer gradient profile at init (a baseline for check --baseline)",
        description=(
            "Build the model with FILE.py:factory once per seed and record the gradient norm of every layer on "
            "the first backward pass. `gradscope check FILE.py:factory --baseline PROFILE.json` fails when a "
            "change moves a layer beyond tolerance."
        ),
    )
    s.add_argument("target", metavar="FILE.py:factory", help="the factory to profile")
    s.add_argument(
        "-o", "--output", type=_output_path, required=True, metavar="PROFILE.json", help="where to write the profile"
    )
    s.add_argument(
        "--seeds",
        type=parse_seeds,
        default=len(DEFAULT_SEEDS),
        metavar="N|S1,S2,...",
        help="number of seeds, or the seeds. Default: %(default)r",
    )
    s.set_defaults(func=run_snapshot)


def _error(command: str, message: str) -> None:
    echo(f"gradscope {command}: error: {message}", err=True)


def _guard(target: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; turn an exception that is not a finding into ConfigurationError naming the target.

    ``sys.exit`` in the model or the loss is an error too (an exit 0 would read as healthy to CI);
    ``KeyboardInterrupt`` propagates.
    """
    try:
        return fn()
    except (ConfigurationError, GradientHealthError):
        raise
    except SystemExit as exc:
        code = "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"
        raise ConfigurationError(
            f"{what} {target!r}: the model or loss_fn called {code}. The model, batch and loss_fn that the factory "
            "returns must run as loss_fn(model(inputs), targets) without exiting."
        ) from None
    except Exception as exc:
        reason = str(exc).rstrip().rstrip(".")
        raise ConfigurationError(
            f"{what} {target!r} raised {type(exc).__name__}: {reason}. The model, batch and loss_fn that the "
            "factory returns must run as loss_fn(model(inputs), targets)."
        ) from exc


def _check_rule_flags(args: argparse.Namespace, thresholds: dict[str, dict[str, Any]]) -> None:
    """Refuse unknown rules in ``--rules`` or ``--threshold`` with the flag's name.

    Called after the factory file is imported, since it may register rules of its own.
    """
    from gradscope.rules.engine import build_rules

    try:
        build_rules(args.rules)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--rules {','.join(args.rules)}: {exc}") from None
    if thresholds:
        try:
            build_rules(args.rules, thresholds)
        except ConfigurationError as exc:
            raise ConfigurationError(f"--threshold: {exc}") from None


def _check_target(target: str, args: argparse.Namespace, thresholds: dict[str, dict[str, Any]]) -> list[CheckRecord]:
    started = time.perf_counter()
    try:
        fn = load_callable(target)
        _check_rule_flags(args, thresholds)
        with seeded(args.seed):
            loaded = call_factory(fn, target)
        report = _guard(
            target,
            "Checking",
            lambda: check(
                loaded.model,
                loaded.batch,
                loaded.loss_fn,
                optimizer=loaded.optimizer,
                steps=args.steps,
                rules=args.rules,
                thresholds=thresholds or None,
                seed=args.seed,
                copy=False,  # the factory built it for us
            ),
        )
    except ConfigurationError as exc:
        return [CheckRecord(target, "check", args.fail_on, time.perf_counter() - started, error=str(exc))]
    records = [CheckRecord(target, "check", args.fail_on, time.perf_counter() - started, report=report)]
    if args.baseline is not None:
        started = time.perf_counter()
        try:
            base = load_profile(args.baseline)
            current = _guard(target, "Profiling", lambda: snapshot(fn, seeds=base.seeds, name=target, strict=False))
            tol = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
            comparison = _guard(
                args.baseline, "Comparing with the baseline", lambda: compare(base, current, tolerance=tol)
            )
            comparison.baseline_source = args.baseline
            records.append(
                CheckRecord(target, "baseline", args.fail_on, time.perf_counter() - started, comparison=comparison)
            )
        except (ConfigurationError, GradientHealthError) as exc:
            records.append(CheckRecord(target, "baseline", args.fail_on, time.perf_counter() - started, error=str(exc)))
    return records


def run_check(args: argparse.Namespace) -> int:
    """Run ``gradscope check``; returns the exit code."""
    if args.tolerance is not None and args.baseline is None:
        _error("check", "--tolerance applies to a baseline comparison; pass --baseline PROFILE.json as well.")
        return EXIT_USAGE
    try:
        thresholds = parse_thresholds(args.threshold)
    except ConfigurationError as exc:
        _error("check", str(exc))
        return EXIT_USAGE
    records: list[CheckRecord] = []
    for target in args.targets:
        new = _check_target(target, args, thresholds)
        records += new
        for r in new:
            if r.error is not None:
                _error("check", r.error if target in r.error else f"{target}: {r.error}")
                continue
            if not args.quiet:
                echo(r.details())
                echo()
            echo(r.headline())
    failed = [r for r in records if r.failed]
    total = sum(r.seconds for r in records)
    echo(
        f"gradscope check: {len(records) - len(failed)} passed, {len(failed)} failed "
        f"(fail-on={args.fail_on}) in {total:.2f} s"
    )
    for option, write in (
        ("json", lambda p: write_json(records, p, source="cli", fail_on=args.fail_on)),
        ("junit", lambda p: _write_text(p, junit_xml(records))),
        ("markdown", lambda p: _write_text(p, markdown(records))),
    ):
        path = getattr(args, option)
        if path is not None:
            try:
                write(path)
            except OSError as exc:
                _error("check", f"cannot write --{option} {path!r}: {exc}")
                return EXIT_USAGE
    if any(r.error is not None for r in records):
        return EXIT_USAGE
    return EXIT_UNHEALTHY if failed else EXIT_OK


def _write_text(path: str, text: str) -> None:
    from gradscope._io import atomic_write_text

    atomic_write_text(path, text)


def run_snapshot(args: argparse.Namespace) -> int:
    """Run ``gradscope snapshot``; returns the exit code."""
    try:
        fn = load_callable(args.target)
        profile = _guard(args.target, "Profiling", lambda: snapshot(fn, seeds=args.seeds, name=args.target))
    except ConfigurationError as exc:
        _error("snapshot", str(exc))
        return EXIT_USAGE
    except GradientHealthError as exc:
        _error("snapshot", str(exc))
        return EXIT_UNHEALTHY
    try:
        profile.to_json(args.output)
    except OSError as exc:
        _error("snapshot", f"cannot write {args.output!r}: {exc}")
        return EXIT_USAGE
    echo(str(profile))
    echo(
        f"gradscope snapshot: wrote {args.output} ({len(profile.layers)} layers, seeds "
        f"{', '.join(map(str, profile.seeds))}) in {profile.meta.get('seconds', 0.0):.2f} s"
    )
    return EXIT_OK
