"""Shared settings for the reference tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # PyTorch's own conv2d warns about padding="same" with an even kernel; that case is deliberate.
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These tests run thousands of tiny float64 ops. On a shared CI machine, intra-op threads contend
    # for busy cores and made the suite up to 10x slower; one thread is also the fastest for such sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
