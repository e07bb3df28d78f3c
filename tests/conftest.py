"""Shared test settings: deterministic seeds, two threads (the CI machine's cores)."""

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


if not torch.cuda.is_available():
    # Triton kernels run only interpreted on CPU-only machines (tests/kernels); set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
