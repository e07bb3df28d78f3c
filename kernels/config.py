"""Launch settings shared by the kernels.

Under ``TRITON_INTERPRET=1`` (CPU) the kernels run in Triton's interpreter: fp32 only, one autotune config
(several configs need a GPU driver), and large tiles because the cost grows with the number of programs.
``triton.jit`` decides between compiled and interpreted at decoration time, so the flag is read once, at import.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune candidates: ``gpu`` when compiled, the single ``interpreter`` config otherwise."""
    return [interpreter] if INTERPRET else gpu


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 operands follow ``torch.backends.cuda.matmul.allow_tf32``."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; anything else is a clear error.

    The one device check of the Triton path: every launcher calls it, and so does the ``"triton"`` backend of
    ``moezoo.ops`` before it launches anything.
    """
    for t in tensors:
        if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET):
            continue
        if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            why = "TRITON_INTERPRET=1 was set after moezoo.kernels was imported; set it before importing moezoo"
        else:
            why = (
                "the Triton kernels need CUDA tensors (on the CPU they run only in Triton's interpreter, with "
                "TRITON_INTERPRET=1 set before moezoo is imported); on the CPU use backend='torch'"
            )
        raise RuntimeError(f"moezoo.kernels cannot run on {t.device} tensors: {why}")
