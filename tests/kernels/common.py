"""Where the kernel tests run, and the expert assignments they exercise.

``DEVICE`` is ``"cpu"`` under Triton's interpreter, ``"cuda"`` when the kernels are compiled for a GPU, ``None``
when neither works (no triton, or a CPU-only machine without ``TRITON_INTERPRET=1``): the tests then skip.
"""

from __future__ import annotations

import pytest
import torch

import moezoo.kernels as kernels

INTERPRET = kernels.HAS_TRITON and kernels.INTERPRET
DEVICE = None
if kernels.HAS_TRITON:
    DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)

kernel_tier = [
    pytest.mark.interpreter,
    pytest.mark.skipif(DEVICE is None, reason="needs triton with a CUDA device or TRITON_INTERPRET=1"),
]

TOKENS = [1, 7, 100, 123]
TOP_K = [1, 2, 3]
LAYOUTS = ["random", "one_expert_empty", "all_on_one", "first_and_last_empty"]
TOL = dict(atol=1e-5, rtol=1e-4)  # fp32


def make_experts(num_pairs: int, num_experts: int, layout: str) -> torch.Tensor:
    """Expert of each pair: uniform, one expert never chosen, all on one, or the first and last never chosen."""
    if layout == "random":
        return torch.randint(0, num_experts, (num_pairs,))
    if layout == "one_expert_empty":
        experts = torch.randint(0, num_experts - 1, (num_pairs,))
        return torch.where(experts == 2, num_experts - 1, experts)
    if layout == "all_on_one":
        return torch.full((num_pairs,), num_experts // 2)
    if layout == "first_and_last_empty":
        return torch.randint(1, num_experts - 1, (num_pairs,))
    raise ValueError(layout)
