"""Bad input to the command line and to ``check`` / ``verify``: exit code 2 (or the exception type) and a
message that names the flag or the argument, for every case in the tables; never a traceback.

Also: factories that call ``sys.exit`` or raise ``KeyboardInterrupt``, control characters in what the
commands print, output files that respect the umask, and ``python -m gradscope``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradscope
from gradscope.ci_report import CheckRecord, junit_xml, markdown
from gradscope.cli import EXIT_INTERRUPTED, main
from gradscope.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[2]

FACTORIES = """
import sys
import torch
import torch.nn as nn
import torch.nn.functional as F


def ok():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, (torch.randn(8, 4), torch.randint(0, 3, (8,))), F.cross_entropy


def exit0():
    sys.exit(0)


def exit_none():
    sys.exit()


def exit_text():
    sys.exit("bye")


def loss_exits():
    def loss(out, target):
        sys.exit(0)

    return nn.Linear(4, 3), (torch.randn(8, 4), torch.randint(0, 3, (8,))), loss


def interrupted():
    raise KeyboardInterrupt


def misfit():
    return nn.Linear(4, 3), (torch.randn(8, 5), torch.randint(0, 3, (8,))), F.cross_entropy


def bad_target():
    return nn.Linear(4, 3), (torch.randn(8, 4), torch.full((8,), 7)), F.cross_entropy


def escapes():
    class Shout(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("\\x1b[2Jfake", nn.Linear(4, 3))

        def forward(self, x):
            return getattr(self, "\\x1b[2Jfake")(x)

    return Shout(), (torch.randn(8, 4), torch.randint(0, 3, (8,))), F.cross_entropy


def raises_escape():
    raise RuntimeError("\\x1b[2J\\x1b[H all checks HEALTHY \\r")
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory holding f.py (the factories above), exit.py (exits on import) and a folder."""
    (tmp_path / "f.py").write_text(FACTORIES)
    (tmp_path / "exit.py").write_text("import sys\nsys.exit(0)\n\ndef make():\n    pass\n")
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(out: str, err: str) -> None:
    """No traceback and no raw control character in what a terminal would show."""
    assert "Traceback" not in out + err
    assert not any(ord(c) < 32 and c not in "\n\t" for c in out + err), (out + err)[-400:]


# -- CLI flags -------------------------------------------------------------------------------------------

FLAG_CASES = [
    # (argv, text the message must hold: the flag, and what is expected)
    (["check", "f.py:ok", "--steps", "0"], ["--steps", "positive int"]),
    (["check", "f.py:ok", "--steps", "x"], ["--steps", "positive int"]),
    (["check", "f.py:ok", "--steps", "1000000000"], ["--steps", "at most 100000"]),
    (["check", "f.py:ok", "--seed", "-1"], ["--seed", "0 to 4294967295"]),
    (["check", "f.py:ok", "--seed", str(2**64)], ["--seed", "0 to 4294967295"]),
    (["check", "f.py:ok", "--seed", "1.5"], ["--seed", "whole number"]),
    (["check", "f.py:ok", "--fail-on", "info"], ["--fail-on", "choose from"]),
    (["check", "f.py:ok", "--rules", ","], ["--rules", "comma-separated list of rule names"]),
    (["check", "f.py:ok", "--rules", "nope"], ["--rules", "Unknown rule 'nope'"]),
    (["check", "f.py:ok", "--rules", "all,-nope"], ["--rules", "Unknown rule 'nope'"]),
    (["check", "f.py:ok", "--threshold", "ratio=3"], ["--threshold", "RULE.NAME=VALUE"]),
    (["check", "f.py:ok", "--threshold", "nope.x=1"], ["--threshold", "Unknown rule 'nope'"]),
    (["check", "f.py:ok", "--rules", "none", "--threshold", "vanishing_gradients.ratio=1"], ["--threshold"]),
    (["check", "f.py:ok", "--threshold", "vanishing_gradients.ratio=" + "[" * 400], ["--threshold"]),
    (["check", "f.py:ok", "--tolerance", "-1", "--baseline", "b.json"], ["--tolerance", "non-negative"]),
    (["check", "f.py:ok", "--tolerance", "nan", "--baseline", "b.json"], ["--tolerance", "finite"]),
    (["check", "f.py:ok", "--tolerance", "inf", "--baseline", "b.json"], ["--tolerance", "finite"]),
    (["check", "f.py:ok", "--tolerance", "0.2"], ["--tolerance", "--baseline"]),
    (["check", "f.py:ok", "--baseline", "missing.json"], ["baseline profile 'missing.json'", "snapshot"]),
    (["check", "f.py:ok", "--json", ""], ["--json", "empty"]),
    (["check", "f.py:ok", "--junit", ""], ["--junit", "empty"]),
    (["check", "f.py:ok", "--markdown", ""], ["--markdown", "empty"]),
    (["check", "f.py:ok", "--rules", "none", "--junit", "folder"], ["--junit", "folder"]),
    (["check", "f.py:ok", "--rules", "none", "--json", "folder"], ["--json", "folder"]),
    (["check", "f.py:ok", "--nope"], ["unrecognized arguments: --nope"]),
    (["check"], ["FILE.py:factory"]),
    (["snapshot", "f.py:ok"], ["-o/--output"]),
    (["snapshot", "f.py:ok", "-o", ""], ["--output", "empty"]),
    (["snapshot", "f.py:ok", "-o", "p.json", "--seeds", "0"], ["--seeds", "from 1 to 1000"]),
    (["snapshot", "f.py:ok", "-o", "p.json", "--seeds", "a"], ["--seeds", "number of seeds"]),
    (["snapshot", "f.py:ok", "-o", "p.json", "--seeds", "1,1"], ["--seeds", "distinct"]),
    (["snapshot", "f.py:ok", "-o", "p.json", "--seeds=-1,2"], ["--seeds", "0 to 4294967295"]),
    (["snapshot", "f.py:ok", "-o", "folder", "--seeds", "1"], ["cannot write 'folder'"]),
    (["verify", "f.py:ok", "--rtol", "-1"], ["--rtol", "non-negative"]),
    (["verify", "f.py:ok", "--rtol", "nan"], ["--rtol", "finite"]),
    (["verify", "f.py:ok", "--atol", "x"], ["--atol", "non-negative"]),
    (["verify", "f.py:ok", "--fd-directions", "0"], ["--fd-directions", "from 1 to 4096"]),
    (["verify", "f.py:ok", "--dtype", "float16"], ["--dtype", "choose from"]),
    (["verify", "f.py:ok", "--on-unsupported", "skip"], ["--on-unsupported", "choose from"]),
    (["verify", "f.py:ok", "--json", ""], ["--json", "empty"]),
    (["verify", "f.py:ok", "--json", "folder"], ["--json", "folder"]),
    (["report", ""], ["RUN", "empty"]),
    (["report", "missing.json"], ["'missing.json' does not exist"]),
    (["report", "folder"], ["No TensorBoard event files in 'folder'"]),
    (["report", "f.py", "-o", ""], ["--output", "empty"]),
    (["report", "f.py", "--json", ""], ["--json", "empty"]),
    (["report", "f.py", "--run-name", ""], ["--run-name", "empty"]),
    (["report", "folder", "--run-name", "nope"], ["No run 'nope'"]),
    (["nope"], ["invalid choice: 'nope'"]),
]


@pytest.mark.parametrize(("argv", "expected"), FLAG_CASES, ids=[" ".join(a)[:60] for a, _ in FLAG_CASES])
def test_bad_flag_exits_2_naming_the_flag(work, capsys, argv, expected):
    (work / "b.json").write_text("{}")
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    for text in expected:
        assert text in err, err
    assert_clean(out, err)
    assert len([line for line in err.splitlines() if ": error: " in line]) == 1, err  # one reason


# -- factories that exit, interrupt or fail ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "snapshot", "verify"])
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("f.py:exit0", "The factory 'f.py:exit0' called sys.exit(0)"),
        ("f.py:exit_none", "The factory 'f.py:exit_none' called sys.exit()"),
        ("f.py:exit_text", "The factory 'f.py:exit_text' called sys.exit('bye')"),
        ("exit.py:make", "Importing 'exit.py' called sys.exit(0)"),
        ("f.py:loss_exits", "called sys.exit(0)"),
    ],
)
def test_sys_exit_in_user_code_is_exit_2_not_healthy(work, capsys, command, target, expected):
    argv = [command, target] + (["-o", "p.json", "--seeds", "1"] if command == "snapshot" else [])
    if command == "check":
        argv += ["--steps", "1", "--rules", "none", "--junit", "r.xml"]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert f"gradscope {command}: error: " in err and expected in err, err
    assert_clean(out, err)
    if command == "check":
        error = ET.parse(work / "r.xml").getroot().find("testsuite/testcase/error")
        assert error is not None and expected in error.get("message")
    if command == "snapshot":
        assert not (work / "p.json").exists()


@pytest.mark.parametrize("command", ["check", "snapshot", "verify"])
def test_keyboard_interrupt_in_a_factory_is_130(work, capsys, command):
    argv = [command, "f.py:interrupted"] + (["-o", "p.json"] if command == "snapshot" else [])
    code, out, err = run(capsys, *argv)
    assert code == EXIT_INTERRUPTED == 130
    assert err.strip() == f"gradscope {command}: interrupted"
    assert_clean(out, err)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("f.py:misfit", "mat1 and mat2 shapes cannot be multiplied (8x5 and 4x3)"),
        ("f.py:bad_target", "Target 7 is out of bounds"),
    ],
)
def test_verify_and_check_of_a_model_that_fails_on_its_batch_exit_2(work, capsys, target, expected):
    for argv in (["verify", target], ["check", target, "--steps", "1", "--rules", "none", "-q"]):
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert expected in err and "gradscope " + argv[0] + ": error: " in err
        assert ".." not in err.split("raised", 1)[-1].split("(", 1)[0]  # no doubled full stop
        assert_clean(out, err)


def test_unexpected_errors_are_one_line_exit_2(work, capsys, monkeypatch):
    # A failure inside gradscope itself (not the user's code) still ends in one line and exit 2...
    import gradscope.check_command as cc

    def boom(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded\nwhile doing something")

    monkeypatch.setattr(cc, "write_json", boom)
    code, _out, err = run(capsys, "check", "f.py:ok", "--steps", "1", "--rules", "none", "--json", "r.json", "-q")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last == (
        "gradscope check: error: RecursionError: maximum recursion depth exceeded while doing something "
        "(set GRADSCOPE_TRACEBACK=1 for the traceback)"
    )
    # ...and the traceback is there for whoever asks for it.
    monkeypatch.setenv("GRADSCOPE_TRACEBACK", "1")
    with pytest.raises(RecursionError):
        main(["check", "f.py:ok", "--steps", "1", "--rules", "none", "--json", "r.json", "-q"])


# -- control characters ------------------------------------------------------------------------------------


def test_check_escapes_control_characters_in_terminal_junit_and_markdown(work, capsys):
    argv = ["check", "f.py:escapes", "f.py:raises_escape", "--steps", "2", "--rules", "no_gradient"]
    code, out, err = run(capsys, *argv, "--junit", "r.xml", "--markdown", "r.md", "--json", "r.json")
    assert code == 2  # the second target cannot run
    assert_clean(out, err)
    assert "\\x1b[2Jfake" in out  # the layer name, visible but inert
    assert "\\x1b[2J\\x1b[H all checks HEALTHY \\x0d" in err
    root = ET.parse(work / "r.xml").getroot()  # parses: no raw control character in the XML
    error = root.find("testsuite/testcase[@name='f.py:raises_escape']/error")
    assert "\\x1b[2J\\x1b[H all checks HEALTHY" in error.get("message")
    md = (work / "r.md").read_text()
    assert not any(ord(c) < 32 and c not in "\n" for c in md)
    assert "\\\\x1b[2J\\\\x1b[H all checks HEALTHY" in md  # backslash escaped for Markdown
    # JSON keeps the exact text (escaped by the JSON encoder), so nothing is lost.
    data = json.loads((work / "r.json").read_text())
    assert "\x1b[2J\x1b[H all checks HEALTHY \r" in data["checks"][-1]["error"]


def test_report_of_a_crafted_json_cannot_clear_the_screen_or_fake_a_verdict(tmp_path, capsys):
    data = gradscope.check(_model(), _BATCH, F.cross_entropy, steps=1, rules="none").to_dict()
    data["meta"]["model"] = "\x1b]0;title\x07Net"
    data["findings"] = [
        {
            "kind": "nonfinite_gradients",
            "severity": "error",
            "step": 1,
            "layer": "0",
            "message": "\x1b[2J\x1b[Hgradscope report: HEALTHY\r",
            "suggestion": "\x1b[8mhidden",
            "evidence": {},
        }
    ]
    (tmp_path / "r.json").write_text(json.dumps(data))
    code, out, err = run(capsys, "report", str(tmp_path / "r.json"), "--no-html")
    assert code == 1  # the crafted finding is an error: the verdict is not faked
    assert_clean(out, err)
    assert out.splitlines()[0].startswith("gradscope report: UNHEALTHY")
    assert "\\x1b[2J\\x1b[Hgradscope report: HEALTHY\\x0d" in out
    assert "\\x1b]0;title\\x07Net" in out


HOSTILE = [
    "\x1b[2J\x1b[H\x1b[32mHEALTHY\x1b[0m",
    "line\rover",
    "bell\x07back\x08space\x00nul",
    "c1\x9bcsi",
    "bidi\u202eevil\u2066",
    "lone\ud800surrogate",
    "xml\ufffe\uffff",
    "]]><!-- </failure> & <x>",
    "pipe | ` `` ``` backtick",
]


def test_junit_xml_with_hostile_text_parses_and_keeps_it_visible():
    records = [CheckRecord(name=h, kind="check", error=f"{h}\nsecond line {h}") for h in HOSTILE]
    text = junit_xml(records)
    root = ET.fromstring(text.encode("utf-8"))  # the document is well-formed XML 1.0 in UTF-8
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == [
        "\\x1b[2J\\x1b[H\\x1b[32mHEALTHY\\x1b[0m",
        "line\\x0dover",
        "bell\\x07back\\x08space\\x00nul",
        "c1\\x9bcsi",
        "bidi\\u202eevil\\u2066",
        "lone\\ud800surrogate",
        "xml\\ufffe\\uffff",
        "]]><!-- </failure> & <x>",
        "pipe | ` `` ``` backtick",
    ]
    assert all(c.find("error").text.startswith(c.get("name")) for c in cases)


def test_junit_xml_with_hostile_text_reads_in_a_junit_consumer(tmp_path):
    junitparser = pytest.importorskip("junitparser")
    records = [CheckRecord(name=h, kind="check", error=h) for h in HOSTILE]
    path = tmp_path / "r.xml"
    path.write_text(junit_xml(records), encoding="utf-8")
    xml = junitparser.JUnitXml.fromfile(str(path))
    names = [case.name for suite in xml for case in suite]
    assert len(names) == len(HOSTILE) and names[0] == "\\x1b[2J\\x1b[H\\x1b[32mHEALTHY\\x1b[0m"


def test_markdown_with_hostile_text_stays_in_its_cell_and_code_spans():
    records = [CheckRecord(name=h, kind="check", error=h) for h in HOSTILE]
    text = markdown(records)
    assert not any(ord(c) < 32 and c not in "\n" for c in text)
    text.encode("utf-8")  # no lone surrogate left
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | check | " in line]
    assert len(rows) == len(HOSTILE)
    # each row keeps its five cells: an escaped "|" does not split one
    assert all(len([p for p in row.replace("\\|", "").split("|")]) == 7 for row in rows)
    # a name holding backticks is wrapped in a longer fence, so it cannot close its own code span
    assert "| ````pipe \\| ` `` ``` backtick```` |" in text


# -- Python arguments of check() and verify() --------------------------------------------------------------


def _model():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


_BATCH = (torch.randn(8, 4), torch.randint(0, 3, (8,)))

CHECK_CASES = [
    ({"model": 5}, "`model`"),
    ({"batch": (1,)}, "`batch`"),
    ({"batch": 5}, "`batch`"),
    ({"loss_fn": 5}, "`loss_fn`"),
    ({"steps": 0}, "`steps`"),
    ({"steps": 1.5}, "`steps`"),
    ({"steps": True}, "`steps`"),
    ({"seed": "a"}, "`seed`"),
    ({"seed": 2**64}, "`seed`"),
    ({"seed": -(2**63) - 1}, "`seed`"),
    ({"copy": "yes"}, "`copy`"),
    ({"optimizer": 5}, "`optimizer`"),
    ({"optimizer": torch.optim.SGD(_model().parameters(), lr=0.1)}, "optimizer"),
    ({"rules": 5}, "`rules`"),
    ({"rules": ["nope"]}, "'nope'"),
    ({"thresholds": 5}, "`thresholds`"),
    ({"thresholds": {"nope": {}}}, "'nope'"),
    ({"stats": 5}, "`stats`"),
    ({"stats": ["nope"]}, "'nope'"),
    ({"activations": "x"}, "`activations`"),
]


@pytest.mark.parametrize(("kwargs", "named"), CHECK_CASES, ids=[repr(k)[:50] for k, _ in CHECK_CASES])
def test_check_arguments(kwargs, named):
    args = {"model": _model(), "batch": _BATCH, "loss_fn": F.cross_entropy, "steps": 1, **kwargs}
    with pytest.raises(ConfigurationError) as info:
        gradscope.check(args.pop("model"), args.pop("batch"), args.pop("loss_fn"), **args)
    assert named in str(info.value)


VERIFY_CASES = [
    ({"model": 5}, "`model`"),
    ({"inputs": [1.0]}, "`inputs`"),
    ({"loss_fn": 5}, "`loss_fn`"),
    ({"dtype": torch.float16}, "`dtype`"),
    ({"rtol": -1.0}, "`rtol`"),
    ({"rtol": float("nan")}, "`rtol`"),
    ({"atol": "x"}, "`atol`"),
    ({"fd_rtol": -1.0}, "`fd_rtol`"),
    ({"fd_atol": -1e-3}, "`fd_atol`"),
    ({"on_unsupported": "skip"}, "`on_unsupported`"),
    ({"fd_directions": 0}, "`fd_directions`"),
    ({"fd_coordinates": 1.5}, "`fd_coordinates`"),
    ({"seed": "x"}, "`seed`"),
    ({"targets": torch.full((8,), 7)}, "Target 7 is out of bounds"),
    ({"inputs": torch.randn(8, 5)}, "mat1 and mat2 shapes cannot be multiplied"),
]


@pytest.mark.parametrize(("kwargs", "named"), VERIFY_CASES, ids=[repr(k)[:50] for k, _ in VERIFY_CASES])
def test_verify_arguments(kwargs, named):
    args = {"model": _model(), "inputs": _BATCH[0], "targets": _BATCH[1], "loss_fn": F.cross_entropy, **kwargs}
    with pytest.raises(ConfigurationError) as info:
        gradscope.verify(args.pop("model"), args.pop("inputs"), args.pop("targets"), args.pop("loss_fn"), **args)
    assert named in str(info.value)


# -- files and entry points --------------------------------------------------------------------------------


def test_output_files_respect_the_umask(work, capsys):
    old = os.umask(0o022)
    try:
        code, _out, err = run(
            capsys,
            "check",
            "f.py:ok",
            "--steps",
            "1",
            "--rules",
            "none",
            "-q",
            "--json",
            "r.json",
            "--junit",
            "r.xml",
            "--markdown",
            "r.md",
        )
        assert code == 0, err
        code, _, err = run(capsys, "snapshot", "f.py:ok", "-o", "p.json", "--seeds", "1")
        assert code == 0, err
        os.umask(0o077)
        code, _, err = run(capsys, "snapshot", "f.py:ok", "-o", "private.json", "--seeds", "1")
        assert code == 0, err
        (work / "kept.md").write_text("old")
        os.chmod(work / "kept.md", 0o640)
        os.umask(0o022)
        code, _, err = run(capsys, "check", "f.py:ok", "--steps", "1", "--rules", "none", "-q", "--markdown", "kept.md")
        assert code == 0, err
    finally:
        os.umask(old)
    modes = {n: oct((work / n).stat().st_mode & 0o777) for n in ("r.json", "r.xml", "r.md", "p.json")}
    assert modes == {"r.json": "0o644", "r.xml": "0o644", "r.md": "0o644", "p.json": "0o644"}
    assert oct((work / "private.json").stat().st_mode & 0o777) == "0o600"
    assert oct((work / "kept.md").stat().st_mode & 0o777) == "0o640"  # an existing file keeps its mode
    assert not [p.name for p in work.iterdir() if p.name.endswith(".tmp")]


def test_report_json_and_html_respect_the_umask(tmp_path, capsys):
    report = gradscope.check(_model(), _BATCH, F.cross_entropy, steps=1, rules="none")
    old = os.umask(0o022)
    try:
        report.to_json(tmp_path / "r.json")
        code, _, err = run(
            capsys,
            "report",
            str(tmp_path / "r.json"),
            "-o",
            str(tmp_path / "r.html"),
            "--json",
            str(tmp_path / "c.json"),
        )
        assert code == 0, err
        os.umask(0o027)
        report.to_json(tmp_path / "group.json")
    finally:
        os.umask(old)
    modes = {n: oct((tmp_path / n).stat().st_mode & 0o777) for n in ("r.json", "r.html", "c.json", "group.json")}
    assert modes == {"r.json": "0o644", "r.html": "0o644", "c.json": "0o644", "group.json": "0o640"}


def _python(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_python_dash_m_gradscope(work):
    proc = _python("-m", "gradscope", "--version", cwd=work)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gradscope {gradscope.__version__}"
    proc = _python("-m", "gradscope", "check", "f.py:exit0", cwd=work)
    assert proc.returncode == 2
    assert "The factory 'f.py:exit0' called sys.exit(0)" in proc.stderr
    assert "Traceback" not in proc.stderr
