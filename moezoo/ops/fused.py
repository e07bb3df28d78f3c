"""The fast PyTorch path: the routed expert FFN as one autograd node with a hand-written, chunked backward.

Legend: T tokens, D model dim, F expert hidden, H = F (GELU) or 2F (SwiGLU), E experts, N routed pairs,
R rows of one chunk.

Why it is fast on CPUs (measured with ``moezoo bench layer``):

- the N routed rows are processed in chunks of R rows (a few MiB per buffer): the gathered inputs, the
  activations, the expert outputs and every backward temporary live in small reused workspaces that stay in
  cache, instead of fresh N-row tensors whose first touch costs page faults and memory bandwidth;
- only the pre-activation ``h (N, H)`` is saved for backward (what a dense FFN saves too); the gathered input
  is re-gathered chunk by chunk, and the expert outputs are never kept;
- the gate gradient needs no saved output: ``y_n = g_n * a_n @ W_out`` so
  ``dL/dg_n = <dz_n, a_n @ W_out> = <dz_n @ W_out^T, a_n>``, and ``dz_n @ W_out^T`` is needed anyway.

Chunks cut through experts freely: a chunk holds segments of consecutive experts, one ``mm`` per segment,
and weight gradients accumulate over the chunks an expert spans.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moezoo.ops.activations import act_backward, act_forward
from moezoo.ops.permute import sort_by_expert

# Elements of the widest chunk buffer (4 MiB in fp32).
CHUNK_ELEMENTS = 1 << 20


def _chunk_rows(*widths: int) -> int:
    return max(64, CHUNK_ELEMENTS // max(widths))


def _segments(counts: list[int], chunk_rows: int) -> Iterator[tuple[int, int, list[tuple[int, int, int, bool]]]]:
    """Yield ``(r0, r1, [(expert, s0, s1, first)])``: chunk row range and its per-expert segments.

    ``s0:s1`` are rows relative to the chunk; ``first`` marks an expert's first segment (weight gradients are
    written there and accumulated in later segments).
    """
    bounds = []
    start = 0
    for e, count in enumerate(counts):
        if count:
            bounds.append((e, start, start + count))
        start += count
    total = start
    b = 0
    for r0 in range(0, total, chunk_rows):
        r1 = min(total, r0 + chunk_rows)
        segs = []
        while b < len(bounds) and bounds[b][1] < r1:
            e, e0, e1 = bounds[b]
            s0, s1 = max(e0, r0), min(e1, r1)
            segs.append((e, s0 - r0, s1 - r0, s0 == e0))
            if e1 <= r1:
                b += 1
            else:
                break
        yield r0, r1, segs


def _segment_mm(a_RK: Tensor, b_EKM: Tensor, segs: list[tuple[int, int, int, bool]], out_RM: Tensor) -> Tensor:
    for e, s0, s1, _ in segs:
        torch.mm(a_RK[s0:s1], b_EKM[e], out=out_RM[s0:s1])
    return out_RM


def _segment_weight_grad(a_RK: Tensor, g_RM: Tensor, segs: list[tuple[int, int, int, bool]], out_EKM: Tensor) -> None:
    for e, s0, s1, first in segs:
        if first:
            torch.mm(a_RK[s0:s1].t(), g_RM[s0:s1], out=out_EKM[e])
        else:
            out_EKM[e].addmm_(a_RK[s0:s1].t(), g_RM[s0:s1])


def _weight_grad_buffer(weight_EKM: Tensor, empty_experts: list[int]) -> Tensor:
    """Uninitialised except for experts without rows, which get zero gradient; the rest is written by mm."""
    out = torch.empty_like(weight_EKM)
    if empty_experts:
        out[empty_experts] = 0
    return out


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_TD: Tensor,
        token_idx_N: Tensor,
        expert_idx_N: Tensor,
        gate_N: Tensor,
        w_in_EDH: Tensor,
        w_out_EFD: Tensor,
        activation: str,
    ) -> Tensor:
        num_experts, dim, hidden = w_in_EDH.shape
        ffn_dim = w_out_EFD.shape[1]
        perm = sort_by_expert(token_idx_N, expert_idx_N, num_experts)
        gate_col = gate_N.index_select(0, perm.order_N).to(x_TD.dtype).unsqueeze(-1)
        tok = perm.token_sorted_N
        h_NH = x_TD.new_empty(tok.shape[0], hidden)
        out_TD = x_TD.new_zeros(x_TD.shape)
        rows = _chunk_rows(dim, hidden)
        x_buf = x_TD.new_empty(rows, dim)
        y_buf = x_TD.new_empty(rows, dim)
        for r0, r1, segs in _segments(perm.counts, rows):
            n = r1 - r0
            x_RD = torch.index_select(x_TD, 0, tok[r0:r1], out=x_buf[:n])
            h_RH = _segment_mm(x_RD, w_in_EDH, segs, h_NH[r0:r1])
            a_RF = act_forward(h_RH, activation).mul_(gate_col[r0:r1])
            y_RD = _segment_mm(a_RF, w_out_EFD, segs, y_buf[:n])
            out_TD.index_add_(0, tok[r0:r1], y_RD)
        ctx.save_for_backward(x_TD, h_NH, gate_col, w_in_EDH, w_out_EFD, perm.order_N, tok)
        ctx.counts = perm.counts
        ctx.activation = activation
        ctx.gate_dtype = gate_N.dtype
        ctx.ffn_dim = ffn_dim
        return out_TD

    @staticmethod
    def backward(ctx: Any, dout_TD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_TD, h_NH, gate_col, w_in_EDH, w_out_EFD, order_N, tok = ctx.saved_tensors
        need_x, need_gate, need_w_in, need_w_out = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        num_experts, dim, hidden = w_in_EDH.shape
        ffn_dim = ctx.ffn_dim
        dout_TD = dout_TD.contiguous()
        dx = torch.zeros_like(x_TD) if need_x else None
        empty = [e for e, count in enumerate(ctx.counts) if count == 0]
        dw_in = _weight_grad_buffer(w_in_EDH, empty) if need_w_in else None
        dw_out = _weight_grad_buffer(w_out_EFD, empty) if need_w_out else None
        dgate_sorted = x_TD.new_empty(tok.shape[0]) if need_gate else None
        w_out_t = w_out_EFD.transpose(1, 2)
        w_in_t = w_in_EDH.transpose(1, 2)
        rows = _chunk_rows(dim, hidden)
        dz_buf = x_TD.new_empty(rows, dim)
        da_buf = x_TD.new_empty(rows, ffn_dim)
        x_buf = x_TD.new_empty(rows, dim)
        for r0, r1, segs in _segments(ctx.counts, rows):
            n = r1 - r0
            g_R1 = gate_col[r0:r1]
            dz_RD = torch.index_select(dout_TD, 0, tok[r0:r1], out=dz_buf[:n])
            da_RF = _segment_mm(dz_RD, w_out_t, segs, da_buf[:n])
            a_RF = act_forward(h_NH[r0:r1], ctx.activation)
            if dgate_sorted is not None:
                dgate_sorted[r0:r1] = torch.linalg.vecdot(da_RF, a_RF)
            if dw_out is not None:
                _segment_weight_grad(a_RF.mul_(g_R1), dz_RD, segs, dw_out)
            if not (need_x or need_w_in):
                continue
            dh_RH = act_backward(da_RF.mul_(g_R1), h_NH[r0:r1], ctx.activation)
            if dx is not None:
                dx.index_add_(0, tok[r0:r1], _segment_mm(dh_RH, w_in_t, segs, dz_buf[:n]))
            if dw_in is not None:
                x_RD = torch.index_select(x_TD, 0, tok[r0:r1], out=x_buf[:n])
                _segment_weight_grad(x_RD, dh_RH, segs, dw_in)
        dgate = None
        if dgate_sorted is not None:
            dgate = torch.empty(order_N.shape[0], dtype=ctx.gate_dtype, device=order_N.device)
            dgate[order_N] = dgate_sorted.to(ctx.gate_dtype)
        return dx, None, None, dgate, dw_in, dw_out, None


def expert_ffn_fused(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str,
) -> Tensor:
    out = _ExpertFFN.apply(x_TD.contiguous(), token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, activation)
    assert isinstance(out, Tensor)
    return out
