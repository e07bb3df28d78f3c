"""Shared test settings: deterministic seeds, two threads (the CI machine's cores)."""

import os
from collections.abc import Iterator

import pytest
import torch

SUITE_THREADS = 2
torch.set_num_threads(SUITE_THREADS)


# Process-wide state that code under test may change and that later tests would otherwise inherit: the benchmarks'
# `--threads 1` calls torch.set_num_threads, and Lightning's seed_everything exports its seed to the environment.
# (At one thread fp32 reductions run in another order, so a test's rounding depended on which tests ran before it.)
# After every test both go back to the suite's settings, not to what the test started with: a module-scoped fixture
# (a benchmark run once for a module's tests) changes them before any test's own fixture could record them.
_LEAKY_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
_SUITE_ENV = {name: os.environ.get(name) for name in _LEAKY_ENV}


@pytest.fixture(autouse=True)
def _seed_and_isolate() -> Iterator[None]:
    torch.manual_seed(0)
    yield
    torch.set_num_threads(SUITE_THREADS)
    for name, value in _SUITE_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


if not torch.cuda.is_available():
    # Triton kernels run only interpreted on CPU-only machines (tests/kernels); set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
