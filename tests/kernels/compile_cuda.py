"""Compile every kernel ahead of time for a CUDA target, without a GPU (Triton ships ``ptxas``).

The interpreter runs kernel bodies as Python and misses what only the compiler rejects (non-constexpr globals,
unsupported control flow, dtype mismatches in ``tl.dot``, shared-memory overflow). Run in a process where
``TRITON_INTERPRET`` is unset: ``python -m tests.kernels.compile_cuda [arch ...]`` (default 90), exit 0 on success.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER_TYPES = {
    "expert_idx_ptr": "*i64",
    "token_idx_ptr": "*i64",
    "block_counts_ptr": "*i32",
    "block_prefix_ptr": "*i32",
    "tokens_per_expert_ptr": "*i32",
    "block_offsets_ptr": "*i32",
    "block_expert_ptr": "*i32",
    "sorted_pair_ptr": "*i32",
    "slot_of_pair_ptr": "*i32",
    "gate_ptr": "*fp32",
    "out_ptr": "*fp32",
    "dx_ptr": "*fp32",
    "dgate_ptr": "*fp32",
}


# (GATED, ACT, HAS_BIAS): every base activation code of grouped_gemm.ACT_CODES, gated and plain, biases on and off.
ACT_CASES = [
    (False, 0, False),
    (True, 2, False),
    (False, 1, True),
    (False, 3, True),
    (True, 0, True),
    (False, 2, False),
]


def compile_kernel(kernel: Any, constexprs: dict[str, Any], arch: int, data: str = "*bf16", **options: Any) -> None:
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, data)
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    print(f"sm_{arch} {fn.__name__} {constexprs} {options}", flush=True)


def main(archs: list[int]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    from moezoo.kernels import grouped_gemm, permute

    for arch in archs:
        compile_kernel(permute._permute_histogram_fwd_kernel, dict(BLOCK_N=128, BLOCK_E=64), arch)
        compile_kernel(permute._permute_scan_fwd_kernel, dict(BLOCK_M=128, CHUNK=64, BLOCK_E=64), arch)
        compile_kernel(permute._permute_fill_fwd_kernel, dict(BLOCK_M=128, BLOCK_E=64), arch)
        compile_kernel(permute._permute_scatter_fwd_kernel, dict(BLOCK_M=128, BLOCK_N=128), arch)
        gemm = grouped_gemm._gemm_configs()[0]
        weight = grouped_gemm._weight_configs()[0]
        launch = dict(num_warps=gemm.num_warps, num_stages=gemm.num_stages)
        for data, precision in (("*bf16", "tf32"), ("*fp32", "ieee")):
            common = dict(PRECISION=precision, BLOCK_M=128, **gemm.kwargs)
            # Every base activation once, plain and gated, with and without biases.
            for gated, act, bias in ACT_CASES:
                flags = dict(GATED=gated, ACT=act, HAS_BIAS=bias)
                compile_kernel(
                    grouped_gemm._expert_in_fwd_kernel,
                    dict(STORE_H=True, **flags, **common),
                    arch,
                    data,
                    **launch,
                )
                compile_kernel(
                    grouped_gemm._expert_out_bwd_kernel,
                    dict(COMPUTE_DGATE=True, **flags, **common),
                    arch,
                    data,
                    **launch,
                )
            for bias in (False, True):
                compile_kernel(grouped_gemm._expert_out_fwd_kernel, dict(HAS_BIAS=bias, **common), arch, data, **launch)
            compile_kernel(grouped_gemm._expert_in_bwd_kernel, common, arch, data, **launch)
            weight_cases = [(True, False, False, 0)] + [(False, True, gated, act) for gated, act, _ in ACT_CASES]
            for left_by_token, left_act, gated, act in weight_cases:
                compile_kernel(
                    grouped_gemm._expert_weight_bwd_kernel,
                    dict(
                        LEFT_BY_TOKEN=left_by_token,
                        LEFT_ACT=left_act,
                        GATED=gated,
                        ACT=act,
                        PRECISION=precision,
                        BLOCK_M=128,
                        **weight.kwargs,
                    ),
                    arch,
                    data,
                    num_warps=weight.num_warps,
                    num_stages=weight.num_stages,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
