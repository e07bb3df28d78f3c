"""Expert-contiguous layout of the routed pairs, padded to the GEMM row block in index space only.

Legend: N routed pairs, E experts, EP = E padded to a power of two, NB = cdiv(N, BLOCK_N) pair blocks,
BLOCK_M rows of one GEMM block, B = cdiv(N, BLOCK_M) + min(E, N) row blocks (an upper bound that depends on
shapes only, so buffers have static sizes and nothing is read back to the host), P = B * BLOCK_M slots.

A stable counting sort in four launches (no data is copied; only int32 index maps are built):

1. histogram: ``block_counts[nb, e]`` = pairs of block ``nb`` routed to ``e``;
2. scan (one program): per-expert exclusive prefix over blocks, ``tokens_per_expert``, and the padded block
   offsets ``block_offsets[e] = sum_{e' < e} ceil(count[e'] / BLOCK_M)``;
3. fill: ``block_expert[b]`` (the expert of row block ``b``, -1 for unused blocks) and -1 in every padding slot;
4. scatter: pair ``n`` goes to slot ``block_offsets[e] * BLOCK_M + prefix[nb, e] + rank of n among the pairs of
   its block with the same expert``: pairs of one expert keep their order. It also writes the inverse map.

Every element of every output is written by a kernel, so nothing needs zero-initialising.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from moezoo.kernels.config import check_device

BLOCK_N = 128


class ExpertLayout(NamedTuple):
    """Pairs in expert-contiguous, block-padded order; rows of expert ``e`` are slots
    ``block_offsets_E1[e] * block_m + [0, tokens_per_expert_E[e])``."""

    tokens_per_expert_E: Tensor  # int32
    block_offsets_E1: Tensor  # int32, first row block of each expert; [E] = blocks in use
    block_expert_B: Tensor  # int32, expert of each row block, -1 past the blocks in use
    sorted_pair_P: Tensor  # int32, pair index of each slot, -1 for padding
    slot_of_pair_N: Tensor  # int32, the inverse: slot of each pair
    block_m: int


def max_row_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on ``sum_e ceil(count_e / block_m)`` over every routing of ``num_pairs`` pairs."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


@triton.jit
def _permute_histogram_fwd_kernel(
    expert_idx_ptr,  # (N,) int
    block_counts_ptr,  # (NB, E) int32 out
    num_pairs,
    num_experts,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < num_pairs
    experts = tl.load(expert_idx_ptr + offs, mask=ok, other=0).to(tl.int32)
    counts = tl.histogram(experts, BLOCK_E, mask=ok)
    cols = tl.arange(0, BLOCK_E)
    tl.store(block_counts_ptr + pid.to(tl.int64) * num_experts + cols, counts, mask=cols < num_experts)


@triton.jit
def _permute_scan_fwd_kernel(
    block_counts_ptr,  # (NB, E) int32
    block_prefix_ptr,  # (NB, E) int32 out: exclusive prefix over blocks
    tokens_per_expert_ptr,  # (E,) int32 out
    block_offsets_ptr,  # (E + 1,) int32 out
    num_blocks,
    num_experts,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    carry = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, num_blocks, CHUNK):
        rows = b0 + tl.arange(0, CHUNK)
        off = rows.to(tl.int64)[:, None] * num_experts + cols[None, :]
        ok = (rows < num_blocks)[:, None] & col_ok[None, :]
        tile = tl.load(block_counts_ptr + off, mask=ok, other=0)
        excl = tl.cumsum(tile, axis=0) - tile + carry[None, :]
        tl.store(block_prefix_ptr + off, excl, mask=ok)
        carry += tl.sum(tile, axis=0)
    tl.store(tokens_per_expert_ptr + cols, carry, mask=col_ok)
    blocks = (carry + BLOCK_M - 1) // BLOCK_M
    tl.store(block_offsets_ptr + cols, tl.cumsum(blocks, axis=0) - blocks, mask=col_ok)
    tl.store(block_offsets_ptr + num_experts, tl.sum(blocks, axis=0))


@triton.jit
def _permute_fill_fwd_kernel(
    tokens_per_expert_ptr,  # (E,) int32
    block_offsets_ptr,  # (E + 1,) int32
    block_expert_ptr,  # (B,) int32 out
    sorted_pair_ptr,  # (P,) int32 out (padding slots only)
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    ends = tl.load(block_offsets_ptr + cols + 1, mask=cols < num_experts, other=2147483647)
    expert = tl.sum((ends <= b).to(tl.int32), axis=0)
    in_use = expert < num_experts
    safe = tl.where(in_use, expert, 0)
    start = tl.load(block_offsets_ptr + safe)
    count = tl.load(tokens_per_expert_ptr + safe)
    tl.store(block_expert_ptr + b, tl.where(in_use, expert, -1))
    local = (b - start) * BLOCK_M + tl.arange(0, BLOCK_M)
    pad = (local >= count) | (expert >= num_experts)
    slots = b.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(sorted_pair_ptr + slots, tl.full((BLOCK_M,), -1, dtype=tl.int32), mask=pad)


@triton.jit
def _permute_scatter_fwd_kernel(
    expert_idx_ptr,  # (N,) int
    block_prefix_ptr,  # (NB, E) int32
    block_offsets_ptr,  # (E + 1,) int32
    sorted_pair_ptr,  # (P,) int32 out (real slots)
    slot_of_pair_ptr,  # (N,) int32 out
    num_pairs,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK_N)
    offs = pid * BLOCK_N + local
    ok = offs < num_pairs
    experts = tl.load(expert_idx_ptr + offs, mask=ok, other=-1).to(tl.int32)
    before = (experts[:, None] == experts[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(before.to(tl.int32), axis=1)
    safe = tl.where(ok, experts, 0)
    prefix = tl.load(block_prefix_ptr + pid.to(tl.int64) * num_experts + safe, mask=ok, other=0)
    start = tl.load(block_offsets_ptr + safe, mask=ok, other=0)
    slots = start.to(tl.int64) * BLOCK_M + prefix + rank
    tl.store(sorted_pair_ptr + slots, offs, mask=ok)
    tl.store(slot_of_pair_ptr + offs, slots.to(tl.int32), mask=ok)


def permute_fwd(expert_idx_N: Tensor, num_experts: int, block_m: int) -> ExpertLayout:
    """Build the block-padded expert layout of ``expert_idx_N`` (values must lie in ``[0, num_experts)``)."""
    check_device(expert_idx_N)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    expert_idx_N = expert_idx_N.contiguous()
    device = expert_idx_N.device
    num_pairs = expert_idx_N.shape[0]
    num_blocks = max_row_blocks(num_pairs, num_experts, block_m)
    i32 = dict(dtype=torch.int32, device=device)
    tokens_per_expert_E = torch.empty(num_experts, **i32)
    block_offsets_E1 = torch.empty(num_experts + 1, **i32)
    block_expert_B = torch.empty(num_blocks, **i32)
    sorted_pair_P = torch.empty(num_blocks * block_m, **i32)
    slot_of_pair_N = torch.empty(num_pairs, **i32)
    if num_pairs == 0:
        tokens_per_expert_E.zero_()
        block_offsets_E1.zero_()
        return ExpertLayout(
            tokens_per_expert_E, block_offsets_E1, block_expert_B, sorted_pair_P, slot_of_pair_N, block_m
        )
    pair_blocks = triton.cdiv(num_pairs, BLOCK_N)
    block_e = triton.next_power_of_2(max(num_experts, 2))
    block_counts = torch.empty(pair_blocks, num_experts, **i32)
    block_prefix = torch.empty(pair_blocks, num_experts, **i32)
    _permute_histogram_fwd_kernel[(pair_blocks,)](
        expert_idx_N, block_counts, num_pairs, num_experts, BLOCK_N=BLOCK_N, BLOCK_E=block_e
    )
    chunk = max(1, min(64, 8192 // block_e))
    _permute_scan_fwd_kernel[(1,)](
        block_counts,
        block_prefix,
        tokens_per_expert_E,
        block_offsets_E1,
        pair_blocks,
        num_experts,
        BLOCK_M=block_m,
        CHUNK=chunk,
        BLOCK_E=block_e,
    )
    _permute_fill_fwd_kernel[(num_blocks,)](
        tokens_per_expert_E,
        block_offsets_E1,
        block_expert_B,
        sorted_pair_P,
        num_experts,
        BLOCK_M=block_m,
        BLOCK_E=block_e,
    )
    _permute_scatter_fwd_kernel[(pair_blocks,)](
        expert_idx_N,
        block_prefix,
        block_offsets_E1,
        sorted_pair_P,
        slot_of_pair_N,
        num_pairs,
        num_experts,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
    )
    return ExpertLayout(tokens_per_expert_E, block_offsets_E1, block_expert_B, sorted_pair_P, slot_of_pair_N, block_m)
