"""Shared test setup: deterministic, small, CPU unless a test asks for CUDA."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors gain nothing from a second thread, and on a shared
    CI machine the threads contend for busy cores (up to 10x slower). Modules that run many tiny ops use
    it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config: pytest.Config) -> None:
    # Two threads: what CI has; more only oversubscribes the machine.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cpu_kernel():
    """The compiled CPU kernel, built now if this machine has none cached (about a minute, once)."""
    from gradscope.capture import kernels

    if kernels.cpu_kernel_state() == "off":
        pytest.skip(f"{kernels.KERNEL_ENV}=off")
    mp = pytest.MonkeyPatch()
    mp.setenv(kernels.KERNEL_ENV, "sync")
    try:
        fn = kernels.cpu_kernel()
        if fn is None and kernels.cpu_kernel_state() == "building":  # a background build of this process
            import time

            for _ in range(600):
                time.sleep(0.5)
                if kernels.cpu_kernel_state() != "building":
                    break
            fn = kernels.cpu_kernel()
    finally:
        mp.undo()
    if fn is None:
        if kernels.cpu_kernel_state() == "absent":  # not built on this machine: this process runs the eager path
            pytest.skip("the CPU kernel is not built on this machine (python -m gradscope.capture.kernels builds it)")
        pytest.skip(f"no C++ compiler could build the kernel: {kernels._state['error']}")
    return fn


@pytest.fixture
def gloo_spawn():
    """``spawn(fn, args, nprocs, out)``: ``torch.multiprocessing.spawn`` for gloo tests, tolerant of teardown.

    Each rank writes ``<out>/done<rank>`` once its work and its last barrier are done. A rank that
    then dies in gloo's teardown (``destroy_process_group`` or interpreter exit: "terminate called
    without an active exception", SIGABRT, about once in a few dozen runs on a loaded machine) has
    already written everything the test reads, so the abort is not a failure; any other failure is.
    """
    import signal

    import torch.multiprocessing as mp

    def spawn(fn, args: tuple, nprocs: int, out: str) -> None:
        try:
            mp.spawn(fn, args=args, nprocs=nprocs, join=True)
        except mp.ProcessExitedException as exc:
            done = all(os.path.exists(os.path.join(out, f"done{r}")) for r in range(nprocs))
            if not (done and exc.exit_code == -signal.SIGABRT):
                raise

    return spawn
