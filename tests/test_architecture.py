"""The architecture holds: no import loop, a thin orchestrator, a torch-free face, one list of watch() options.

The import graph is read from the source with ``ast``, so it sees every import, whether it runs when the
module loads, inside a function, only under ``if TYPE_CHECKING:``, or by name through ``importlib``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradscope"

#: Import cycles that are allowed, keyed by the set of modules that import each other, with the reason.
#: Only a type-only cycle may be listed: one that disappears when the imports under
#: ``if TYPE_CHECKING:`` are left out, so at run time no module waits on a module that waits on it.
#: Even then, prefer moving the shared type below both modules (as ``gradscope.reference.sampled`` and
#: ``gradscope.reference.calls`` do): a listed cycle is a debt, with its reason written here.
ALLOWED_TYPE_ONLY_CYCLES: dict[frozenset[str], str] = {}


# -- the import graph --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    """One import statement of ``source`` that loads ``target``."""

    source: str
    target: str
    path: str
    line: int
    kind: str  # "module level", "in a function", "type-only" or "by name"
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.kind}): {self.text}"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    name = test.attr if isinstance(test, ast.Attribute) else test.id if isinstance(test, ast.Name) else None
    return name == "TYPE_CHECKING"


def _walk(node: ast.AST, kind: str) -> Iterator[tuple[ast.AST, str]]:
    """Every node below ``node`` with how an import there runs (the outermost reason wins)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, "type-only"
                yield from _walk(stmt, "type-only")
            for stmt in child.orelse:
                yield stmt, kind
                yield from _walk(stmt, kind)
            continue
        inner = kind
        if kind == "module level" and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = "in a function"
        yield child, inner
        yield from _walk(child, inner)


def _dynamic(tree: ast.Module, modules: dict[str, Path]) -> list[ast.Constant]:
    """String constants naming a module, in a file that imports by name (``importlib.import_module``)."""
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and (
            (isinstance(n.func, ast.Attribute) and n.func.attr == "import_module")
            or (isinstance(n.func, ast.Name) and n.func.id in ("import_module", "__import__"))
        )
    ]
    if not calls:
        return []
    return [
        n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in modules
    ]


def imports_of(name: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    """Every import in module ``name`` of another module of the package, resolved to the module it loads."""
    source = path.read_text()
    tree = ast.parse(source)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    shown = path.relative_to(root.parent).as_posix()
    found: list[Import] = []
    seen: set[tuple[str, int]] = set()

    def add(target: str, node: ast.AST, kind: str) -> None:
        if target != name and (target, id(node)) not in seen:
            seen.add((target, id(node)))
            text = " ".join((ast.get_source_segment(source, node) or "").split())
            found.append(Import(name, target, shown, getattr(node, "lineno", 0), kind, text))

    def known_prefix(dotted: str) -> str | None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    for node, kind in _walk(tree, "module level"):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = known_prefix(alias.name)
                if target is not None:
                    add(target, node, kind)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                # `from pkg import name` loads the submodule pkg.name when there is one.
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known_prefix(base)
                if target is not None:
                    add(target, node, kind)
    for constant in _dynamic(tree, modules):
        add(constant.value, constant, "by name")
    return found


def import_graph(root: Path, package: str) -> dict[str, list[Import]]:
    """Each module's imports of the package's other modules."""
    modules = module_files(root, package)
    return {name: imports_of(name, path, modules, root) for name, path in modules.items()}


def cycles(graph: dict[str, list[Import]], *, runtime_only: bool = False) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    edges = {
        m: sorted({i.target for i in imps if not (runtime_only and i.kind == "type-only")}) for m, imps in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def _a_loop(graph: dict[str, list[Import]], component: list[str]) -> list[str]:
    """One closed path through the component, for the reader: a -> b -> a."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted({i.target for i in graph[v] if i.target in members}):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return component


def describe(graph: dict[str, list[Import]], component: list[str]) -> str:
    """A cycle in words: its modules, one loop through them, and every import that closes it."""
    members = set(component)
    lines = [
        f"{len(component)} modules import each other: {', '.join(component)}",
        f"  for example {' -> '.join(_a_loop(graph, component))}",
        "  the imports among them:",
    ]
    lines += [f"    {i}" for m in component for i in graph[m] if i.target in members]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    return import_graph(PACKAGE, "gradscope")


def test_no_module_imports_a_module_that_imports_it_back(graph):
    unexpected = [c for c in cycles(graph) if frozenset(c) not in ALLOWED_TYPE_ONLY_CYCLES]
    assert not unexpected, (
        "Import cycles among gradscope's modules (move what both need into a module below them; a cycle "
        "through `if TYPE_CHECKING:` imports only may be listed in ALLOWED_TYPE_ONLY_CYCLES with its reason):\n"
        + "\n".join(describe(graph, c) for c in unexpected)
    )


def test_every_allowed_cycle_is_current_type_only_and_explained(graph):
    current = {frozenset(c) for c in cycles(graph)}
    at_run_time = cycles(graph, runtime_only=True)
    problems = []
    for members, reason in ALLOWED_TYPE_ONLY_CYCLES.items():
        if not reason.strip():
            problems.append(f"{sorted(members)}: give the reason it is allowed")
        if members not in current:
            problems.append(f"{sorted(members)}: no longer a cycle; remove it from the list")
        for c in at_run_time:
            if set(c) & members:
                problems.append(f"{sorted(members)} is a cycle at run time, not only for types:\n{describe(graph, c)}")
    assert not problems, "\n".join(problems)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    # A package with one cycle per way of importing, to show that the walker cannot miss one.
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg.b import thing\n    return thing\n",
        "b.py": "from typing import TYPE_CHECKING\n\nthing = 1\nif TYPE_CHECKING:\n    from .c import C\n",
        "c.py": "from pkg import a\n\nC = a\n",
        "sub/__init__.py": "from .x import y\n",
        "sub/x.py": "from .. import sub\n\ny = sub\n",
        "f.py": "import importlib\n\ng = importlib.import_module('pkg.g')\n",
        "g.py": "import pkg.f as f\n",
        "alone.py": "import os\nfrom pkg.sub import x\nfrom pkg import a\n",
    }
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    g = import_graph(tmp_path / "pkg", "pkg")
    assert cycles(g) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.f", "pkg.g"], ["pkg.sub", "pkg.sub.x"]]
    assert cycles(g, runtime_only=True) == [["pkg.f", "pkg.g"], ["pkg.sub", "pkg.sub.x"]]
    kinds = {(i.source, i.target): (i.kind, i.line) for imps in g.values() for i in imps}
    assert kinds == {
        ("pkg.a", "pkg.b"): ("in a function", 2),
        ("pkg.b", "pkg.c"): ("type-only", 5),
        ("pkg.c", "pkg.a"): ("module level", 1),
        ("pkg.sub", "pkg.sub.x"): ("module level", 1),
        ("pkg.sub.x", "pkg.sub"): ("module level", 1),
        ("pkg.f", "pkg.g"): ("by name", 3),
        ("pkg.g", "pkg.f"): ("module level", 1),
        ("pkg.alone", "pkg.sub.x"): ("module level", 2),
        ("pkg.alone", "pkg.a"): ("module level", 3),
    }
    text = describe(g, ["pkg.a", "pkg.b", "pkg.c"])
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.a" in text
    assert "pkg/b.py:5 (type-only): from .c import C" in text


# -- the orchestrator stays wiring ---------------------------------------------------------------------------
def test_scope_py_is_wiring_and_lifecycle_only():
    lines = len((PACKAGE / "scope.py").read_text().splitlines())
    assert lines < 500, f"gradscope/scope.py has {lines} lines; the hot path belongs in capture/, the math in stats/"


# -- types ---------------------------------------------------------------------------------------------------
def test_every_type_ignore_names_its_error_and_says_why():
    # mypy runs on gradscope/ in CI (warn_unused_ignores); a silenced error carries its code and its reason.
    pattern = re.compile(r"#\s*type:\s*ignore(?P<codes>\[[\w\-, ]+\])?(?P<rest>.*)$")
    bare = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            found = pattern.search(line)
            if found and not (found["codes"] and re.match(r"\s*#\s*\S", found["rest"])):
                bare.append(f"{path.relative_to(ROOT).as_posix()}:{number}: {line.strip()}")
    assert not bare, "Write `# type: ignore[code]  # why` (or fix the type):\n" + "\n".join(bare)


# -- the face stays light ------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["gradscope", "gradscope.pytest_plugin"])
def test_importing_the_face_does_not_import_torch(module):
    # Every pytest session in an environment with gradscope loads the plugin: it must cost nothing.
    code = f"import sys, {module}\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:5])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"`import {module}` imported {done.stdout.strip()}"


# -- one list of watch() options -----------------------------------------------------------------------------
def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _documented_args(doc: str) -> list[str]:
    section = re.search(r"^Args:\n(.*?)(?=^\S|\Z)", doc, flags=re.S | re.M)
    assert section, "watch() has no Args: section"
    return re.findall(r"^    (\w+):", section.group(1), flags=re.M)


def test_watch_takes_exactly_the_watch_options_in_order_with_their_defaults():
    import gradscope
    from gradscope.options import WatchOptions

    params = list(inspect.signature(gradscope.watch).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "optimizer"]
    fields = dataclasses.fields(WatchOptions)
    assert [p.name for p in params[2:]] == [f.name for f in fields], (
        "watch()'s options and WatchOptions' fields must be the same list, in the same order"
    )
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    wrong = [
        (f.name, p.default, _field_default(f)) for p, f in zip(params[2:], fields) if p.default != _field_default(f)
    ]
    assert not wrong, f"defaults differ between watch() and WatchOptions (name, watch, WatchOptions): {wrong}"
    documented = _documented_args(inspect.getdoc(gradscope.watch) or "")
    assert documented == [p.name for p in params], "watch()'s docstring must document every option, in order"


def non_default_options(tmp_path: Path) -> dict[str, Any]:
    """A valid value other than the default for every field of WatchOptions."""
    from torch.utils.tensorboard import SummaryWriter

    from gradscope.options import WatchOptions
    from gradscope.sinks.base import Sink

    class NullSink(Sink):
        def write(self, update):
            pass

    chosen: dict[str, Any] = {
        "log_dir": str(tmp_path / "runs"),
        "writer": SummaryWriter(str(tmp_path / "writer")),
        "stats": "l2_norm",
        "rules": "none",
        "thresholds": {"vanishing_gradients": {"ratio": 1e-20}},
        "on_nonfinite": "raise",
        "on_finding": print,
        "stop_on": "error",
        "sinks": (NullSink(),),
        "report_path": str(tmp_path / "report.json"),
        "distributed": "local",
        "histogram_every": None,
        "figure_every": None,
    }
    values = {}
    for f in dataclasses.fields(WatchOptions):
        default = _field_default(f)
        if f.name in chosen:
            values[f.name] = chosen[f.name]
        elif isinstance(default, bool):
            values[f.name] = not default
        elif isinstance(default, int):
            values[f.name] = 2 * default  # every multiple and minimum stays valid when doubled
        else:
            raise AssertionError(f"Add a non-default value for the new option {f.name!r} to `chosen` here.")
    return values


def _check_each_option(build, tmp_path: Path, skip: dict[str, str] | None = None) -> None:
    """Build with one non-default option at a time; ``build(**option)`` returns the WatchOptions it holds."""
    from gradscope.options import WatchOptions

    skip = skip or {}
    defaults = WatchOptions()
    wrong = []
    for name, value in non_default_options(tmp_path).items():
        if name in skip:
            continue
        expected = getattr(WatchOptions(**{name: value}), name)
        assert expected != getattr(defaults, name), name
        got = getattr(build(**{name: value}), name)
        if got != expected:
            wrong.append(f"{name}: expected {expected!r}, got {got!r}")
    assert not wrong, "options not forwarded:\n" + "\n".join(wrong)


def test_watch_forwards_every_option(tmp_path):
    import torch

    import gradscope

    def build(**option: Any) -> Any:
        scope = gradscope.watch(torch.nn.Linear(2, 1), **option)
        try:
            return scope.options
        finally:
            scope.close()

    _check_each_option(build, tmp_path)


def test_the_lightning_callback_accepts_every_option(tmp_path):
    pytest.importorskip("lightning")
    from gradscope.errors import ConfigurationError
    from gradscope.integrations.lightning import GradscopeCallback

    refused = {"writer": "it writes into the trainer's logger, or into log_dir"}
    _check_each_option(lambda **option: GradscopeCallback(**option).options, tmp_path, skip=refused)
    with pytest.raises(ConfigurationError, match="takes no `writer`"):
        GradscopeCallback(writer=non_default_options(tmp_path)["writer"])


def test_the_hugging_face_callback_accepts_every_option(tmp_path):
    pytest.importorskip("transformers")
    from gradscope.integrations.huggingface import GradscopeTrainerCallback

    _check_each_option(lambda **option: GradscopeTrainerCallback(**option).options, tmp_path)
