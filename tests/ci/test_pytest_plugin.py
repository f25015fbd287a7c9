"""The pytest plugin, run by pytest's own pytester on throwaway test files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch._dynamo  # noqa: F401
from ci_helpers import EXAMPLES, HERE, REPO, plugin_args, plugin_installed

# pytester comes from tests/conftest.py.
# In-process pytester runs forget every module first imported during the run. The first optimizer a
# process builds imports torch._dynamo, which registers operator libraries with torch's C++ side once
# per process: importing it again in a second run fails. Import it here, outside the runs.

HEADER = """
import pytest
import torch
from ci_helpers import BigGradient, make_mlp


def sick():
    torch.manual_seed(0)
    return make_mlp(scale=1e6)


def fine():
    torch.manual_seed(0)
    return make_mlp()
"""


@pytest.fixture
def project(pytester):
    """A throwaway project folder holding ci_helpers.py; returns a function that writes a test file."""
    shutil.copy(HERE / "ci_helpers.py", pytester.path / "ci_helpers.py")

    def write(body: str, name: str = "test_throwaway") -> None:
        pytester.makepyfile(**{name: HEADER + body})

    return write


#: Plugins the throwaway runs do without: hypothesis's would import all of hypothesis again in every
#: in-process run (1.4 s each).
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


def run(pytester, *args):
    return pytester.runpytest_inprocess(*plugin_args(), *QUIET, *args)


def test_fixture_checks_fail_and_pass_with_a_summary(pytester, project):
    project(
        """
def test_fine(gradscope):
    report = gradscope.assert_healthy(*fine(), rules=[BigGradient()])
    assert report.ok and report.steps == 5


def test_sick(gradscope):
    gradscope.assert_healthy(*sick(), rules=[BigGradient()])


def test_sick_but_only_checked(gradscope):
    report = gradscope.check(*sick(), rules=[BigGradient()], steps=2)
    assert len(report.findings) == 2  # check() records, the test decides
"""
    )
    result = run(pytester, "--gradscope-report=out/gradscope.json")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*GradientHealthError: gradscope: test_throwaway.py::test_sick is unhealthy: 2 finding(s) at or above "
            "'error' (2 error(s), 0 warning(s); 5 step(s), seed 0, * s): ci_big_gradient in '0', ci_big_gradient in '3'",
            "*layers, latest values up to step 5 (! = named in a finding):",
            "*= gradscope =*",
            "test_throwaway.py::test_fine [[]check[]] HEALTHY, 0 error(s), 0 warning(s), 5 step(s), * s",
            "test_throwaway.py::test_sick [[]check[]] UNHEALTHY, 2 error(s), 0 warning(s), 5 step(s), * s",
            "    [[]error[]] ci_big_gradient in '0' at step 1: gradient norm * is above 1000. Try: scale the inputs down.",
            "    [[]error[]] ci_big_gradient in '3' at step 1: *",
            "test_throwaway.py::test_sick_but_only_checked [[]check[]] UNHEALTHY, 2 error(s), 0 warning(s), 2 step(s), * s",
            "gradscope: 3 check(s) in 3 test(s): 1 passed, 2 flagged (fail-on=error), * s; report written to "
            "out/gradscope.json",
        ]
    )
    data = json.loads((pytester.path / "out/gradscope.json").read_text())
    assert (data["schema"], data["source"], data["fail_on"]) == ("gradscope.checks", "pytest", "error")
    assert [(c["name"], c["kind"], c["verdict"]) for c in data["checks"]] == [
        ("test_throwaway.py::test_fine", "check", "HEALTHY"),
        ("test_throwaway.py::test_sick", "check", "UNHEALTHY"),
        ("test_throwaway.py::test_sick_but_only_checked", "check", "UNHEALTHY"),
    ]
    assert [f["layer"] for f in data["checks"][1]["report"]["findings"]] == ["0", "3"]


def test_fail_on_option_and_marker(pytester, project):
    project(
        """
WARN = [BigGradient(level="warning")]


def test_default(gradscope):
    gradscope.assert_healthy(*sick(), rules=WARN)


@pytest.mark.gradscope(fail_on="warning")
def test_marked(gradscope):
    gradscope.assert_healthy(*sick(), rules=WARN)


def test_argument_wins(gradscope):
    gradscope.assert_healthy(*sick(), rules=WARN, fail_on="error")
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *GradientHealthError: gradscope: test_throwaway.py::test_marked is unhealthy: 2 finding(s) at or "
            "above 'warning' (0 error(s), 2 warning(s)*",
            "FAILED test_throwaway.py::test_marked - *GradientHealth*",
        ]
    )
    result = run(pytester, "--gradscope-fail-on=warning")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*fail-on=warning*"])


def test_marker_settings_reach_the_fixture(pytester, project):
    project(
        """
pytestmark = pytest.mark.gradscope(steps=2, seed=3)


@pytest.mark.gradscope(steps=4, rules=[BigGradient(limit=1e12)])
def test_closest_wins(gradscope):
    report = gradscope.assert_healthy(*sick())
    assert report.steps == 4 and report.meta["check"]["seed"] == 3
    assert report.meta["rules"] == ["ci_big_gradient"] and not report.findings


def test_module_marker(gradscope):
    report = gradscope.check(*fine(), rules="none")
    assert report.steps == 2
"""
    )
    run(pytester).assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (
            "gradscope(step=3)",
            "unknown keyword argument(s) 'step'. Valid: fail_on, rules, seed, steps, thresholds, tolerance.",
        ),
        ("gradscope(3)", "takes keyword arguments only, but got positional (3,)."),
        ("gradscope(fail_on='info')", "expected `fail_on` to be one of ('warning', 'error'), but got 'info'."),
        ("gradscope(steps=0)", "expected `steps` to be a positive int, but got 0."),
        ("gradscope(tolerance=-1)", "expected `tolerance` to be a non-negative number (log10 units), but got -1."),
        ("gradscope(rules=['no_such_rule'])", "`rules`: Unknown rule 'no_such_rule'. Registered rules:"),
    ],
)
def test_marker_arguments_are_validated(pytester, project, marker, message):
    project(
        f"""
@pytest.mark.{marker}
def test_marked():
    pass


def test_unmarked():
    pass
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [f"E   pytest.UsageError: @pytest.mark.gradscope on test_throwaway.py::test_marked: {message}*"]
    )


def test_marker_is_registered_for_strict_markers(pytester, project):
    project(
        """
@pytest.mark.gradscope(steps=2)
def test_marked():
    pass
"""
    )
    run(pytester, "--strict-markers").assert_outcomes(passed=1)
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gradscope(steps=5, seed=0, rules='all', *): settings of the*"])


def test_watched_scopes_are_judged_when_the_test_body_ends(pytester, project):
    project(
        """
MODELS = []


def train(scope, model, batch, loss_fn, opt, steps=3):
    x, y = batch
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        opt.zero_grad()


def test_watch_sick(gradscope):
    model, batch, loss_fn = sick()
    MODELS.append(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    scope = gradscope(model, optimizer=opt, rules=[BigGradient()])
    train(scope, model, batch, loss_fn, opt)  # no close(): the fixture closes it


def test_watch_sick_not_asserted(gradscope):
    model, batch, loss_fn = sick()
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    with gradscope(model, optimizer=opt, rules=[BigGradient()], assert_healthy=False) as scope:
        train(scope, model, batch, loss_fn, opt)
    assert not scope.report().ok


def test_watch_fine(gradscope):
    model, batch, loss_fn = fine()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope(model, optimizer=opt, rules=[BigGradient()]) as scope:
        train(scope, model, batch, loss_fn, opt)


def test_body_raises_first(gradscope):
    model, batch, loss_fn = sick()
    MODELS.append(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    scope = gradscope(model, optimizer=opt, rules=[BigGradient()])
    train(scope, model, batch, loss_fn, opt)
    raise KeyError("the test's own failure")


def test_hooks_are_gone():
    for model in MODELS:
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_watch_sick _*",
            "E   *GradientHealthError: gradscope: test_throwaway.py::test_watch_sick is unhealthy: 2 finding(s)*",
            "*_ test_body_raises_first _*",
            'E       KeyError: "the test\'s own failure"',
        ]
    )
    assert "test_body_raises_first is unhealthy" not in result.stdout.str()  # one failure, the test's own
    result.stdout.fnmatch_lines(
        [
            "test_throwaway.py::test_watch_sick [[]watch[]] UNHEALTHY, 2 error(s), 0 warning(s), 3 step(s), * s",
            "test_throwaway.py::test_watch_sick_not_asserted [[]watch[]] UNHEALTHY, *",
            "test_throwaway.py::test_watch_fine [[]watch[]] HEALTHY, 0 error(s), 0 warning(s), 3 step(s), * s",
            "test_throwaway.py::test_body_raises_first [[]watch[]] UNHEALTHY, *",
        ]
    )
    result.stdout.fnmatch_lines(["FAILED test_throwaway.py::test_watch_sick - *GradientHealth*"])


def test_disable_turns_the_fixture_into_a_no_op(pytester, project):
    project(
        """
def test_check(gradscope):
    report = gradscope.assert_healthy(*sick(), rules=[BigGradient()])
    assert gradscope.disabled and report.ok and report.stats.empty


def test_watch(gradscope):
    model, (x, y), loss_fn = sick()
    with gradscope(model, rules=[BigGradient()]) as scope:
        for _ in range(2):
            loss_fn(model(x), y).backward()
            scope.step()
    assert scope.step_count == 2 and scope.report().findings == []
    assert all(not m._forward_pre_hooks for m in model.modules())  # nothing was attached


def test_baseline(gradscope):
    assert gradscope.assert_matches_baseline(sick, "no-such-profile.json").ok
"""
    )
    result = run(pytester, "--gradscope-disable", "--gradscope-report=r.json")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["gradscope: disabled by --gradscope-disable; no gradient checks ran."])
    assert json.loads((pytester.path / "r.json").read_text())["checks"] == []


def test_baseline_through_the_fixture(pytester, project):
    project(
        """
import torch.nn as nn
import gradscope as gs

def make(std=None):
    torch.manual_seed(0)
    model, batch, loss_fn = fine()
    if std is not None:
        nn.init.normal_(model[3].weight, std=std)  # the head: what flows back to layer 0 shrinks
    return model, batch, loss_fn


def test_record(tmp_path_factory):
    gs.snapshot(make).to_json("profile.json")


def test_matches(gradscope):
    assert gradscope.assert_matches_baseline(make, "profile.json").ok


@pytest.mark.gradscope(tolerance=10)
def test_loose(gradscope):
    gradscope.assert_matches_baseline(lambda: make(1e-4), "profile.json")


def test_moved(gradscope):
    gradscope.assert_matches_baseline(lambda: make(1e-4), "profile.json")
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *GradientHealthError: gradient profile vs profile.json: FAILED, 1 of 2 layers changed: '0'",
            "test_throwaway.py::test_moved [[]baseline[]] MOVED, 1 of 2 layer(s) changed, * s",
            "    0: moved: its gradient norm at init is 1/* the baseline*",
        ]
    )


def test_help_lists_the_options(pytester):
    result = pytester.runpytest_inprocess(*plugin_args(), *QUIET, "--help")
    result.stdout.fnmatch_lines(
        [
            "gradient health checks (gradscope):",
            "*--gradscope-fail-on={warning,error}",
            "*lowest finding severity that fails a test using the",
            "*gradscope fixture. Default: 'error'",
            "*--gradscope-report=PATH",
            "*--gradscope-disable*",
        ]
    )


def test_sessions_without_the_fixture_print_nothing(pytester):
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest_inprocess(*plugin_args(), *QUIET)
    result.assert_outcomes(passed=1)
    assert "= gradscope =" not in result.stdout.str()  # no summary section


# -- real subprocesses ---------------------------------------------------------------------------------------


def test_examples_project(pytester, monkeypatch):
    """`pytest examples/ci` as a CI job runs it: a subprocess, the examples' own files."""
    for name in ("nets.py", "healthy_model.py", "broken_model.py", "test_model_health.py", "profile.json"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # this checkout's gradscope, installed or not
    args = plugin_args((str(REPO),))
    result = pytester.runpytest_subprocess(*args, *QUIET, "--gradscope-report=gradscope.json", timeout=300)
    if plugin_installed():
        assert not args  # loaded through its pytest11 entry point, as users get it
        result.stdout.fnmatch_lines(["plugins:*gradscope-*"])
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(
        [
            "test_model_health.py::test_classifier_is_healthy [[]check[]] HEALTHY, 0 error(s), 0 warning(s), 5 step(s), * s",
            "test_model_health.py::test_transformer_is_healthy [[]check[]] HEALTHY, *, 3 step(s), * s",
            "test_model_health.py::test_classifier_matches_its_baseline [[]baseline[]] MATCHES, 5 layer(s) within *",
            "test_model_health.py::test_broken_init_moves_the_profile [[]baseline[]] MOVED, 4 of 5 layer(s) changed, *",
        ]
    )
    data = json.loads((pytester.path / "gradscope.json").read_text())
    verdicts = {(c["name"].split("::")[1], c["kind"]): c["verdict"] for c in data["checks"]}
    assert verdicts[("test_classifier_is_healthy", "check")] == "HEALTHY"
    assert verdicts[("test_broken_init_moves_the_profile", "baseline")] == "MOVED"
