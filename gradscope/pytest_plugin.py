"""The gradscope pytest plugin: a ``gradscope`` fixture, a ``gradscope`` marker, options and a summary.

Installing gradscope is enough: pytest loads this module through the ``pytest11`` entry point.

In a test::

    def test_model_trains(gradscope):
        model, batch, loss_fn = make()
        gradscope.assert_healthy(model, batch, loss_fn)          # a few seeded steps; fails the test

    @pytest.mark.gradscope(steps=10, fail_on="warning")
    def test_training_loop(gradscope):
        with gradscope(model, optimizer=opt) as scope:          # watch your own loop
            ...                                                  # judged when the test body ends

Options (group ``gradscope``): ``--gradscope-fail-on=warning|error``, ``--gradscope-report=PATH`` (one
JSON file with every check of the session), ``--gradscope-disable`` (the fixture does nothing and the
tests still run). The terminal summary lists each check and its findings per test.

This module defers its own imports of gradscope's machinery to the tests that use the fixture or the
marker. Loading it imports the light ``gradscope`` package face and :mod:`gradscope.findings`, not
torch: a pytest session that never uses gradscope pays nothing for it.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from gradscope.findings import SEVERITIES

if TYPE_CHECKING:
    from gradscope.baseline import ProfileComparison
    from gradscope.ci_report import CheckRecord
    from gradscope.report import Report
    from gradscope.scope import GradScope

__all__ = ["MARKER_KWARGS", "GradscopeFixture"]

#: Keyword arguments the ``@pytest.mark.gradscope(...)`` marker accepts: defaults for the fixture in
#: that test (``steps``, ``seed``: :meth:`GradscopeFixture.check`; ``rules``, ``thresholds``: checks
#: and watched runs; ``fail_on``: which findings fail the test; ``tolerance``: baseline comparisons).
MARKER_KWARGS = ("fail_on", "rules", "seed", "steps", "thresholds", "tolerance")
_MARKER_DOC = (
    "gradscope(steps=5, seed=0, rules='all', thresholds=None, fail_on=None, tolerance=None): settings of the "
    "`gradscope` fixture in this test"
)


class _Session:
    """Every check of the pytest session, for the summary and the ``--gradscope-report`` file."""

    def __init__(self, config: pytest.Config) -> None:
        self.fail_on: str = config.getoption("gradscope_fail_on")
        self.report_path: str | None = config.getoption("gradscope_report")
        self.disabled: bool = config.getoption("gradscope_disable")
        self.records: list[CheckRecord] = []
        self.written: str | None = None


_SESSION_KEY = pytest.StashKey[_Session]()
_FIXTURE_KEY = pytest.StashKey["GradscopeFixture"]()


# -- options and marker --------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--gradscope-*`` options."""
    group = parser.getgroup("gradscope", "gradient health checks (gradscope)")
    group.addoption(
        "--gradscope-fail-on",
        dest="gradscope_fail_on",
        choices=SEVERITIES,
        default="error",
        help="lowest finding severity that fails a test using the gradscope fixture. Default: %(default)r",
    )
    group.addoption(
        "--gradscope-report",
        dest="gradscope_report",
        metavar="PATH",
        default=None,
        help="write one JSON file with every gradscope check of the session. Default: %(default)r",
    )
    group.addoption(
        "--gradscope-disable",
        dest="gradscope_disable",
        action="store_true",
        default=False,
        help="turn the gradscope fixture into a no-op (tests still run, nothing is checked). Default: %(default)r",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and the session."""
    config.addinivalue_line("markers", _MARKER_DOC)
    config.stash[_SESSION_KEY] = _Session(config)


def _usage(item: pytest.Item, message: str) -> pytest.UsageError:
    return pytest.UsageError(f"@pytest.mark.gradscope on {item.nodeid}: {message}")


def _marker_options(item: pytest.Item) -> dict[str, Any]:
    """The marker's keyword arguments (module, class, then function markers; the closest wins), validated."""
    __tracebackhide__ = True
    options: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers("gradscope"))):
        if mark.args:
            raise _usage(
                item,
                f"takes keyword arguments only, but got positional {mark.args!r}. Valid: {', '.join(MARKER_KWARGS)}.",
            )
        unknown = sorted(set(mark.kwargs) - set(MARKER_KWARGS))
        if unknown:
            raise _usage(
                item,
                f"unknown keyword argument(s) {', '.join(map(repr, unknown))}. Valid: {', '.join(MARKER_KWARGS)}.",
            )
        options.update(mark.kwargs)
    _validate_options(item, options)
    return options


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _validate_options(item: pytest.Item, options: dict[str, Any]) -> None:
    __tracebackhide__ = True
    if "steps" in options and not (_is_int(options["steps"]) and options["steps"] > 0):
        raise _usage(item, f"expected `steps` to be a positive int, but got {options['steps']!r}.")
    if "seed" in options and not _is_int(options["seed"]):
        raise _usage(item, f"expected `seed` to be an int, but got {options['seed']!r}.")
    if "fail_on" in options and options["fail_on"] not in SEVERITIES:
        raise _usage(item, f"expected `fail_on` to be one of {SEVERITIES}, but got {options['fail_on']!r}.")
    tol = options.get("tolerance")
    if tol is not None and not (isinstance(tol, numbers.Real) and not isinstance(tol, bool) and float(tol) >= 0):
        raise _usage(item, f"expected `tolerance` to be a non-negative number (log10 units), but got {tol!r}.")
    if "rules" in options or "thresholds" in options:
        from gradscope.errors import ConfigurationError
        from gradscope.rules.engine import build_rules

        try:
            build_rules(options.get("rules", "all"), options.get("thresholds"))
        except ConfigurationError as exc:
            raise _usage(item, str(exc)) from None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Validate the marker's arguments before the test runs (a usage error names the valid ones)."""
    __tracebackhide__ = True
    if item.get_closest_marker("gradscope") is not None:
        _marker_options(item)


# -- the fixture ---------------------------------------------------------------------------------------


class _DisabledScope:
    """Stands in for a GradScope under ``--gradscope-disable``: every method works, nothing is measured."""

    def __init__(self) -> None:
        self._steps = 0
        self.closed = False

    @property
    def step_count(self) -> int:
        return self._steps

    def step(self, loss: Any = None, val_loss: Any = None, **scalars: Any) -> None:
        self._steps += 1

    def flush(self) -> list:
        return []

    def report(self) -> Report:
        return _empty_report(self._steps)

    def close(self) -> Report:
        self.closed = True
        return _empty_report(self._steps)

    def __enter__(self) -> _DisabledScope:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _empty_report(steps: int = 0) -> Report:
    import pandas as pd

    from gradscope.report import Report

    stats = pd.DataFrame(
        {
            "step": pd.Series(dtype="int64"),
            "layer": pd.Series(dtype=object),
            "param": pd.Series(dtype=object),
            "stat": pd.Series(dtype=object),
            "value": pd.Series(dtype="float64"),
        }
    )
    return Report(findings=[], stats=stats, meta={"disabled": True, "steps": steps})


class GradscopeFixture:
    """What the ``gradscope`` fixture yields: runs checks and watches for one test, and closes them.

    Settings come from, in order of precedence: the call's keyword arguments, the test's
    ``@pytest.mark.gradscope(...)`` marker, then the command line (``--gradscope-fail-on``).

    Attributes:
        nodeid: the test's id (names its checks in the summary and the report file).
        disabled: True under ``--gradscope-disable``: nothing is measured, everything passes.
        fail_on: the lowest severity that fails this test.
        records: the checks this test ran so far.
    """

    def __init__(self, session: _Session, nodeid: str, options: dict[str, Any]) -> None:
        self._session = session
        self.nodeid = nodeid
        self._options = options
        self.disabled = session.disabled
        self.fail_on: str = options.get("fail_on") or session.fail_on
        self.records: list[CheckRecord] = []
        self._scopes: list[tuple[GradScope, bool, str, float]] = []

    def _record(self, record: CheckRecord) -> None:
        self.records.append(record)
        self._session.records.append(record)

    def _rule_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in ("rules", "thresholds"):
            if key in self._options:
                kwargs.setdefault(key, self._options[key])
        return kwargs

    # -- watch your own loop --------------------------------------------------------------------------
    def __call__(self, model: Any, *, assert_healthy: bool = True, fail_on: str | None = None, **kwargs: Any) -> Any:
        """Watch ``model`` (see :func:`gradscope.watch`); the scope is closed and judged when the test body ends.

        Args:
            model: the ``nn.Module`` to watch.
            assert_healthy: fail the test when the run has findings at or above ``fail_on`` (False: only
                record them, for tests that inspect ``scope.report()`` themselves).
            fail_on: overrides the marker and ``--gradscope-fail-on`` for this scope.
            **kwargs: passed to :func:`gradscope.watch` (``optimizer``, ``rules``, ``thresholds``...).

        Returns:
            The :class:`~gradscope.GradScope` (a stand-in that measures nothing under
            ``--gradscope-disable``).
        """
        if self.disabled:
            return _DisabledScope()
        from gradscope.health import validate_fail_on
        from gradscope.scope import watch

        level = validate_fail_on(fail_on or self.fail_on)
        scope = watch(model, **self._rule_kwargs(kwargs))
        self._scopes.append((scope, assert_healthy, level, time.perf_counter()))
        return scope

    # -- checks -----------------------------------------------------------------------------------------
    def check(self, model: Any, batch: Any, loss_fn: Any, **kwargs: Any) -> Report:
        """Run :func:`gradscope.check` with this test's settings and record it; never fails the test itself.

        Args:
            model: the ``nn.Module`` (a copy is trained, unless ``copy=False``).
            batch: ``(inputs, targets)``.
            loss_fn: ``loss_fn(model(inputs), targets)`` returns the scalar loss.
            **kwargs: passed to :func:`gradscope.check`; ``steps``, ``seed``, ``rules`` and ``thresholds``
                default to the marker's.

        Returns:
            The report (an empty, healthy one under ``--gradscope-disable``).
        """
        return self._check(model, batch, loss_fn, None, kwargs)

    def assert_healthy(
        self, model: Any, batch: Any, loss_fn: Any, *, fail_on: str | None = None, **kwargs: Any
    ) -> Report:
        """Like :meth:`check`, then fail the test when the report has findings at or above ``fail_on``.

        Raises:
            GradientHealthError: with the findings and the per-layer table.
        """
        __tracebackhide__ = True
        from gradscope.health import validate_fail_on

        return self._check(model, batch, loss_fn, validate_fail_on(fail_on or self.fail_on), kwargs)

    def _check(self, model: Any, batch: Any, loss_fn: Any, fail_on: str | None, kwargs: dict[str, Any]) -> Report:
        __tracebackhide__ = True
        if self.disabled:
            return _empty_report()
        from gradscope.ci_report import CheckRecord
        from gradscope.errors import GradientHealthError
        from gradscope.health import check, failing_findings, health_message

        for key in ("steps", "seed"):
            if key in self._options:
                kwargs.setdefault(key, self._options[key])
        report = check(model, batch, loss_fn, **self._rule_kwargs(kwargs))
        level = fail_on or self.fail_on
        self._record(CheckRecord(self.nodeid, "check", level, report.meta["check"]["seconds"], report=report))
        if fail_on is not None and failing_findings(report, fail_on):
            raise GradientHealthError(health_message(report, fail_on, name=self.nodeid), report=report)
        return report

    def assert_matches_baseline(
        self, source: Any, baseline: Any, *, tolerance: float | None = None, **kwargs: Any
    ) -> ProfileComparison:
        """:func:`gradscope.assert_matches_baseline` with the marker's ``tolerance``, recorded for the summary.

        Raises:
            GradientHealthError: naming the layers that moved.
        """
        __tracebackhide__ = True
        from gradscope.baseline import DEFAULT_TOLERANCE, ProfileComparison, assert_matches_baseline
        from gradscope.ci_report import CheckRecord
        from gradscope.errors import GradientHealthError

        if self.disabled:
            return ProfileComparison(layers=[], tolerance=0.0, noise_sigmas=0.0, baseline_seeds=[], current_seeds=[])
        if tolerance is None:
            tolerance = self._options.get("tolerance", DEFAULT_TOLERANCE)
        started = time.perf_counter()
        try:
            result = assert_matches_baseline(source, baseline, tolerance=tolerance, **kwargs)
        except GradientHealthError as exc:
            comparison = exc.report if isinstance(exc.report, ProfileComparison) else None
            self._record(
                CheckRecord(self.nodeid, "baseline", self.fail_on, time.perf_counter() - started, comparison=comparison)
            )
            raise
        self._record(
            CheckRecord(self.nodeid, "baseline", self.fail_on, time.perf_counter() - started, comparison=result)
        )
        return result

    # -- end of the test --------------------------------------------------------------------------------
    def _close_scopes(self) -> list[str]:
        """Close every open scope and record it; return the failure messages of those asserted."""
        from gradscope.ci_report import CheckRecord
        from gradscope.health import failing_findings, health_message

        messages = []
        scopes, self._scopes = self._scopes, []
        for scope, asserted, level, started in scopes:
            report = scope.close()
            self._record(CheckRecord(self.nodeid, "watch", level, time.perf_counter() - started, report=report))
            if asserted and failing_findings(report, level):
                messages.append(health_message(report, level, name=self.nodeid))
        return messages

    def _finish(self) -> None:
        __tracebackhide__ = True
        messages = self._close_scopes()
        if messages:
            from gradscope.errors import GradientHealthError

            raise GradientHealthError("\n\n".join(messages))


@pytest.fixture(name="gradscope")
def _gradscope_fixture(request: pytest.FixtureRequest) -> Iterator[GradscopeFixture]:
    """Gradient health checks for this test; see :class:`gradscope.pytest_plugin.GradscopeFixture`."""
    session = request.config.stash[_SESSION_KEY]
    fixture = GradscopeFixture(session, request.node.nodeid, _marker_options(request.node))
    request.node.stash[_FIXTURE_KEY] = fixture
    try:
        yield fixture
    finally:
        # Scopes left open by a test that failed early: close them (their hooks must not outlive the
        # test) and record them, without piling a second failure on the first.
        fixture._close_scopes()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Once the test body has passed, judge the scopes it watched: the failure belongs to the test."""
    __tracebackhide__ = True
    result = yield
    fixture = item.stash.get(_FIXTURE_KEY, None)
    if fixture is not None:
        fixture._finish()
    return result


# -- the end of the session ------------------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write ``--gradscope-report`` (on the controller only, when tests run distributed)."""
    state = session.config.stash.get(_SESSION_KEY, None)
    if state is None or state.report_path is None or hasattr(session.config, "workerinput"):
        return
    from gradscope.ci_report import write_json

    write_json(state.records, state.report_path, source="pytest", fail_on=state.fail_on)
    state.written = state.report_path


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """List every check and its findings, per test."""
    state = config.stash.get(_SESSION_KEY, None)
    if state is None:
        return
    tr = terminalreporter
    if state.disabled:
        tr.write_sep("=", "gradscope")
        tr.write_line("gradscope: disabled by --gradscope-disable; no gradient checks ran.")
        return
    if not state.records and state.written is None:
        return
    from gradscope._io import escape_controls as x  # names and messages come from user code

    tr.write_sep("=", "gradscope")
    for r in state.records:
        tr.write_line(x(r.headline()), red=r.failed, green=not r.failed)
        if r.report is not None:
            for f in r.report.findings:
                tr.write_line(x(f"    {f}"))
        if r.comparison is not None:
            for lc in r.comparison.mismatches:
                tr.write_line(x(f"    {lc.layer or '(root)'}: {lc.status}: {lc.message}"))
        if r.error is not None:
            tr.write_line(x(f"    {r.error}"))
    failed = sum(r.failed for r in state.records)
    tests = len({r.name for r in state.records})
    seconds = sum(r.seconds for r in state.records)
    line = (
        f"gradscope: {len(state.records)} check(s) in {tests} test(s): {len(state.records) - failed} passed, "
        f"{failed} flagged (fail-on={state.fail_on}), {seconds:.2f} s"
    )
    if state.written is not None:
        line += f"; report written to {state.written}"
    tr.write_line(line)
