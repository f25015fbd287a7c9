"""The integrations stay optional: importing gradscope pulls in no framework, a missing one names the extra."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_importing_gradscope_and_its_integrations_package_imports_no_framework():
    code = (
        "import sys, gradscope, gradscope.integrations as gi\n"
        "assert sorted(gi.__all__) == ['GradscopeCallback', 'GradscopeTrainerCallback']\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        (
            "gradscope.integrations.lightning",
            ("lightning", "lightning.pytorch", "pytorch_lightning"),
            "gradscope[lightning]",
        ),
        ("gradscope.integrations.huggingface", ("transformers",), "gradscope[hf]"),
    ],
)
def test_a_missing_framework_names_the_extra_to_install(monkeypatch, module, blocked, extra):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # import of `name` now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ModuleNotFoundError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        importlib.import_module(module)
    # the lazy name on the package gives the same error
    import gradscope.integrations as gi

    name = "GradscopeCallback" if module.endswith("lightning") else "GradscopeTrainerCallback"
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ModuleNotFoundError, match="pip install"):
        getattr(gi, name)
    monkeypatch.delitem(sys.modules, module, raising=False)  # let later imports see the real framework


def test_unknown_name_on_the_package():
    import gradscope.integrations as gi

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gi.Nope  # noqa: B018
