"""Kernel tests: Triton's interpreter on CPU-only machines, real kernels where CUDA is available.

``TRITON_INTERPRET`` must be set before ``triton`` and ``moezoo.kernels`` are imported (``triton.jit`` decides at
decoration time); ``tests/conftest.py`` sets it too, so it holds whichever test folder imports them first.
Every allocation the launchers make with ``torch.empty``/``empty_like``/``new_empty`` is pre-filled with
garbage (NaN, or a sentinel for integers), so a kernel that leaves part of an output unwritten fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INT_GARBAGE = -123456789


def _garbage(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int16):
        t.fill_(INT_GARBAGE)
    return t


@pytest.fixture(autouse=True)
def garbage_outputs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _garbage(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _garbage(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _garbage(new_empty(self, *a, **k)))
    yield
