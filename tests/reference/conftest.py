"""Shared settings for the reference tests."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # PyTorch's own conv2d warns about padding="same" with an even kernel; that case is deliberate.
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """One thread for every reference test (the shared fixture of tests/conftest.py, automatic here).

    These tests run thousands of tiny float64 ops. On a shared CI machine, intra-op threads contend for
    busy cores and made the suite up to 10x slower; one thread is also the fastest for such sizes.
    """
