"""One training run for the gradscope-tab tests (each test module starts its own server over it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tbhelp import RUN, train_run

import gradscope


@pytest.fixture(scope="session")
def vanish_logdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gradscope.Report]:
    """A log dir holding the run ``vanish`` written by a short training script, and its in-memory report."""
    logdir = tmp_path_factory.mktemp("tbplugin") / "logs"
    report = train_run(logdir / RUN)
    return logdir, report
