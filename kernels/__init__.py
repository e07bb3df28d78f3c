"""Triton kernels of moezoo (installed as ``moezoo.kernels``): ``@triton.jit`` bodies and typed launchers.

One file per op: ``routing`` (fused score + top-k + renormalisation), ``permute`` (block-padded expert layout),
``grouped_gemm`` (expert GEMMs with gather, activation and combine fused, and their backward), ``combine``
(gate-weighted scatter-add to token order and its backward). ``moezoo.ops.triton_backend`` wraps them as
custom ops with autograd.

Importing this package never fails: without triton (or with a broken install) ``HAS_TRITON`` is False,
``TRITON_ERROR`` says why, and none of the launchers are exported. The launchers take CUDA tensors, or CPU
tensors when ``TRITON_INTERPRET=1`` was set before this package was imported.
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
    from moezoo.kernels.combine import combine_bwd, combine_fwd
    from moezoo.kernels.config import INTERPRET
    from moezoo.kernels.grouped_gemm import expert_in_bwd, expert_in_fwd, expert_out_bwd, expert_out_fwd
    from moezoo.kernels.permute import ExpertLayout, max_row_blocks, permute_fwd
    from moezoo.kernels.routing import routing_bwd, routing_fwd

    __all__ = [
        "HAS_TRITON",
        "INTERPRET",
        "TRITON_ERROR",
        "ExpertLayout",
        "combine_bwd",
        "combine_fwd",
        "expert_in_bwd",
        "expert_in_fwd",
        "expert_out_bwd",
        "expert_out_fwd",
        "max_row_blocks",
        "permute_fwd",
        "routing_bwd",
        "routing_fwd",
    ]
else:
    __all__ = ["HAS_TRITON", "TRITON_ERROR"]
