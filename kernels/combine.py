"""Combine: the gate-weighted scatter-add of expert output rows back to token order, and its backward.

Legend: T tokens, D model dim, N routed pairs (in any order; a token may own 0..E of them).

Forward: ``out[token[n]] += gate[n] * y[n]`` with fp32 atomics into a ``(T, D)`` fp32 accumulator: no sort by
token is needed, and the pairs may be any list. The tile helper :func:`_scatter_add_rows` is the same code the
second expert GEMM calls in its epilogue, where the combine is fused (``moezoo.kernels.grouped_gemm``).

Backward, one program per ``BLOCK_N`` pairs looping over D, so the gate gradient is a complete row dot product
(no atomics, deterministic): ``dy[n] = gate[n] * dout[token[n]]``, ``dgate[n] = <dout[token[n]], y[n]>``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moezoo.kernels.config import INTERPRET, check_device


@triton.jit
def _scatter_add_rows(out_ptr, stride_out, tok, cols, tile, mask):
    """``out[tok[i], cols[j]] += tile[i, j]`` (fp32 atomics; rows may repeat)."""
    tl.atomic_add(out_ptr + tok[:, None] * stride_out + cols[None, :], tile, mask=mask)


@triton.jit
def _combine_fwd_kernel(
    y_ptr,  # (N, D)
    gate_ptr,  # (N,)
    token_idx_ptr,  # (N,) int
    out_ptr,  # (T, D) fp32 accumulator
    num_pairs,
    dim,
    stride_yn,
    stride_out,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_pairs
    mask = row_ok[:, None] & (cols < dim)[None, :]
    rows64 = rows.to(tl.int64)
    tok = tl.load(token_idx_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    gate = tl.load(gate_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows64[:, None] * stride_yn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _scatter_add_rows(out_ptr, stride_out, tok, cols, y * gate[:, None], mask)


@triton.jit
def _combine_bwd_kernel(
    dout_ptr,  # (T, D)
    y_ptr,  # (N, D)
    gate_ptr,  # (N,)
    token_idx_ptr,  # (N,) int
    dy_ptr,  # (N, D) out, when COMPUTE_DY
    dgate_ptr,  # (N,) fp32 out, when COMPUTE_DGATE
    num_pairs,
    dim,
    stride_dout,
    stride_yn,
    COMPUTE_DY: tl.constexpr,
    COMPUTE_DGATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_pairs
    rows64 = rows.to(tl.int64)
    tok = tl.load(token_idx_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    gate = tl.load(gate_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    dgate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        dout = tl.load(dout_ptr + tok[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if COMPUTE_DY:
            dy = dout * gate[:, None]
            tl.store(dy_ptr + rows64[:, None] * dim + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DGATE:
            y = tl.load(y_ptr + rows64[:, None] * stride_yn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dgate += tl.sum(dout * y, axis=1)
    if COMPUTE_DGATE:
        tl.store(dgate_ptr + rows64, dgate, mask=row_ok)


def _blocks(dim: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(dim, 16)), 256 if INTERPRET else 128)
    return (128 if INTERPRET else 32), block_d


def combine_fwd(y_ND: Tensor, gate_N: Tensor, token_idx_N: Tensor, num_tokens: int) -> Tensor:
    """``out (T, D) = sum over pairs n of gate[n] * y[n]`` placed at row ``token_idx[n]``, in ``y``'s dtype."""
    check_device(y_ND, gate_N, token_idx_N)
    num_pairs, dim = y_ND.shape
    y_ND = y_ND.contiguous()
    out_TD = torch.zeros(num_tokens, dim, dtype=torch.float32, device=y_ND.device)
    if num_pairs and dim:
        block_n, block_d = _blocks(dim)
        grid = (triton.cdiv(num_pairs, block_n), triton.cdiv(dim, block_d))
        _combine_fwd_kernel[grid](
            y_ND,
            gate_N.contiguous(),
            token_idx_N.contiguous(),
            out_TD,
            num_pairs,
            dim,
            y_ND.stride(0),
            out_TD.stride(0),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
        )
    return out_TD.to(y_ND.dtype)


def combine_bwd(
    dout_TD: Tensor,
    y_ND: Tensor,
    gate_N: Tensor,
    token_idx_N: Tensor,
    compute_dy: bool = True,
    compute_dgate: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dy (N, D) in y's dtype, dgate (N,) fp32)``; either may be skipped (returned as ``None``)."""
    check_device(dout_TD, y_ND, gate_N, token_idx_N)
    num_pairs, dim = y_ND.shape
    dout_TD = dout_TD.contiguous()
    y_ND = y_ND.contiguous()
    dy_ND = torch.empty_like(y_ND) if compute_dy else None
    dgate_N = torch.empty(num_pairs, dtype=torch.float32, device=y_ND.device) if compute_dgate else None
    if num_pairs and (compute_dy or compute_dgate):
        if dim == 0:
            return dy_ND, (dgate_N.zero_() if dgate_N is not None else None)
        block_n, block_d = _blocks(dim)
        _combine_bwd_kernel[(triton.cdiv(num_pairs, block_n),)](
            dout_TD,
            y_ND,
            gate_N.contiguous(),
            token_idx_N.contiguous(),
            dy_ND if dy_ND is not None else y_ND,
            dgate_N if dgate_N is not None else gate_N,
            num_pairs,
            dim,
            dout_TD.stride(0),
            y_ND.stride(0),
            COMPUTE_DY=compute_dy,
            COMPUTE_DGATE=compute_dgate,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
        )
    return dy_ND, dgate_N
