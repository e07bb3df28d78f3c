"""Triton kernels of moezoo (installed as ``moezoo.kernels``): ``@triton.jit`` bodies and typed launchers.

One file per op: ``permute`` (block-padded expert layout) and ``grouped_gemm`` (expert GEMMs with the row
gather, the activation and the gate-weighted combine fused, and their backward). ``moezoo.ops.triton_backend``
wraps them as custom ops with autograd.

Why there is no routing or standalone combine kernel: both existed (a fused softmax|sigmoid + top-k +
renormalisation kernel with its backward, and a gate-weighted scatter-add with its backward) and no router or
layer called them, so they were removed rather than wired in:

- the combine is already fused into the second expert GEMM's epilogue (``_scatter_add_rows``), so a standalone
  combine has no caller on the Triton path, and the CPU paths have their own;
- the routing kernel would replace a few memory-bound passes over a ``(T, E)`` fp32 tensor, while the routers
  still need the full probabilities for their balance loss, z-loss and statistics, so the softmax would run
  twice. By sizes (an estimate: no GPU was available to time it), at the ``moezoo bench kernels`` default shape
  (16384, 2048, 1408, 64, 6) one such pass moves 4 MiB, about a microsecond at H100-class bandwidth, next to
  about 5 TFLOP of expert GEMMs forward and backward (milliseconds): well under 1% of the layer. Wiring it in
  would also have given the top-k and sigmoid routers a second, CUDA-only path with its own tie-breaking to keep
  equal to the first.

Importing this package never fails: without triton (or with a broken install) ``HAS_TRITON`` is False,
``TRITON_ERROR`` says why, and none of the launchers are exported. The launchers take CUDA tensors, or CPU
tensors when ``TRITON_INTERPRET=1`` was set before this package was imported (``check_device`` says which).
"""

from __future__ import annotations

HAS_TRITON = False
TRITON_ERROR: str | None = None

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as err:  # a missing or broken triton must not break CPU-only users
    TRITON_ERROR = f"{type(err).__name__}: {err}"
else:
    HAS_TRITON = True

if HAS_TRITON:
    from moezoo.kernels.config import INTERPRET, check_device
    from moezoo.kernels.grouped_gemm import expert_in_bwd, expert_in_fwd, expert_out_bwd, expert_out_fwd
    from moezoo.kernels.permute import ExpertLayout, max_row_blocks, permute_fwd

    __all__ = [
        "HAS_TRITON",
        "INTERPRET",
        "TRITON_ERROR",
        "ExpertLayout",
        "check_device",
        "expert_in_bwd",
        "expert_in_fwd",
        "expert_out_bwd",
        "expert_out_fwd",
        "max_row_blocks",
        "permute_fwd",
    ]
else:
    __all__ = ["HAS_TRITON", "TRITON_ERROR"]
