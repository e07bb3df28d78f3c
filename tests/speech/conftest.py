"""Speech tests run single-threaded: their models are tiny, and two OpenMP threads on a busy two-core machine
spin-wait on each other (a 60x slowdown measured here). The previous setting is restored afterwards."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
