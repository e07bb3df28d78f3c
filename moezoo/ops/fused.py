"""The fast PyTorch path: the routed expert FFN as one autograd node with a hand-written, chunked backward.

Legend: T tokens, D model dim, F expert hidden, H = F (GELU) or 2F (SwiGLU), E experts, N routed pairs,
R rows of one chunk.

Why it is fast on CPUs (measured with ``moezoo bench layer``):

- rows are processed in chunks of a few MiB: the gathered inputs, activations, expert outputs and every
  backward temporary live in small reused workspaces that stay in cache, instead of fresh N-row tensors whose
  first touch costs page faults and memory bandwidth;
- only the pre-activation ``h`` is saved for backward (what a dense FFN saves too); inputs are re-gathered chunk
  by chunk and expert outputs are never kept;
- the gate gradient needs no saved output: ``y_n = g_n * a_n @ W_out`` so
  ``dL/dg_n = <dz_n, a_n @ W_out> = <dz_n @ W_out^T, a_n>``, and ``dz_n @ W_out^T`` is needed anyway.

Rows stay expert-contiguous without padding and each chunk runs one ``mm`` per expert segment (chunks cut
through experts; weight gradients accumulate over the chunks an expert spans). Measured on the project's
2-core CPU, an index-space padded ``bmm`` layout and ``torch._grouped_mm`` were no faster than this loop at the
benchmark shapes, and chunks of 16 MiB beat both 4 MiB and 64 MiB chunks. :class:`BucketLayout`
(``MOEZOO_CPU_LAYOUT=bucket``) pads groups of experts with similar loads and runs one ``bmm`` per group: within
noise of this layout at many experts, slower at few large ones, so it is not the default (``moezoo bench layer
--layouts segment,bucket``; ``--breakdown`` splits the layer's time into router, GEMMs and the rest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moezoo.ops.activations import act_backward, act_forward, act_forward_parts
from moezoo.ops.permute import Permutation, sort_by_expert

# Elements of the widest chunk buffer (16 MiB in fp32).
CHUNK_ELEMENTS = 1 << 22


@dataclass
class Chunk:
    r0: int  # first row (in the layout's row space)
    r1: int
    segments: list[tuple[int, int, int, bool]]  # (expert, s0, s1, first segment of that expert)


class SegmentLayout:
    """Rows sorted by expert, unpadded; each chunk holds segments of consecutive experts."""

    def __init__(self, perm: Permutation, gate_sorted_N: Tensor, chunk_rows: int) -> None:
        self.counts = perm.counts
        self.token_R = perm.token_sorted_N
        self.gate_R1 = gate_sorted_N.unsqueeze(-1)
        self.num_rows = perm.token_sorted_N.shape[0]
        self.chunk_rows = chunk_rows

    def chunks(self) -> list[Chunk]:
        bounds = []
        start = 0
        for e, count in enumerate(self.counts):
            if count:
                bounds.append((e, start, start + count))
            start += count
        out = []
        b = 0
        for r0 in range(0, self.num_rows, self.chunk_rows):
            r1 = min(self.num_rows, r0 + self.chunk_rows)
            segs = []
            while b < len(bounds) and bounds[b][1] < r1:
                e, e0, e1 = bounds[b]
                s0, s1 = max(e0, r0), min(e1, r1)
                segs.append((e, s0 - r0, s1 - r0, s0 == e0))
                if e1 > r1:
                    break
                b += 1
            out.append(Chunk(r0, r1, segs))
        return out

    def mm(self, a_RK: Tensor, w_EKM: Tensor, chunk: Chunk, out_RM: Tensor) -> Tensor:
        for e, s0, s1, _ in chunk.segments:
            torch.mm(a_RK[s0:s1], w_EKM[e], out=out_RM[s0:s1])
        return out_RM

    def weight_grad(self, a_RK: Tensor, g_RM: Tensor, chunk: Chunk, out_EKM: Tensor) -> None:
        for e, s0, s1, first in chunk.segments:
            if first:
                torch.mm(a_RK[s0:s1].t(), g_RM[s0:s1], out=out_EKM[e])
            else:
                out_EKM[e].addmm_(a_RK[s0:s1].t(), g_RM[s0:s1])

    def empty_experts(self) -> list[int]:
        return [e for e, count in enumerate(self.counts) if count == 0]

    def gate_grad_to_pairs(self, dgate_R: Tensor, order_N: Tensor, dtype: torch.dtype) -> Tensor:
        dgate = torch.empty(order_N.shape[0], dtype=dtype, device=order_N.device)
        dgate[order_N] = dgate_R.to(dtype)
        return dgate


@dataclass
class BucketChunk:
    r0: int  # first row (in the padded row space)
    r1: int
    bucket: int
    slots: int  # experts in the bucket (the bmm batch)
    rows: int  # rows per expert in this chunk (a capacity slice of the bucket)
    first: bool  # first chunk of its bucket
    last: bool  # last chunk of its bucket


class BucketLayout:
    """Experts grouped into buckets of ``bucket_size`` experts with similar row counts; each bucket is padded to its
    largest count, so that one ``bmm`` per chunk replaces one ``mm`` per expert.

    Row space: bucket -> capacity slice (chunk) -> expert slot -> row, so every chunk is a contiguous
    ``(slots, rows, .)`` block. Padding rows read token 0 with gate 0: their outputs, weight-gradient and input-
    gradient contributions are exactly zero (their gate gradient is discarded).
    """

    def __init__(self, perm: Permutation, gate_sorted_N: Tensor, chunk_rows: int, bucket_size: int) -> None:
        counts = perm.counts
        self.counts = counts
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        by_count = sorted((e for e in range(len(counts)) if counts[e]), key=lambda e: counts[e])
        self.buckets = [by_count[i : i + bucket_size] for i in range(0, len(by_count), bucket_size)]
        device = perm.order_N.device
        self.bucket_ids = [torch.tensor(b, dtype=torch.long, device=device) for b in self.buckets]
        sources = []  # per padded row: its row in the expert-sorted order, or -1 for padding
        self._chunks: list[BucketChunk] = []
        r0 = 0
        for b, experts in enumerate(self.buckets):
            capacity = max(counts[e] for e in experts)
            step = max(1, min(capacity, chunk_rows // len(experts)))
            for c0 in range(0, capacity, step):
                c1 = min(capacity, c0 + step)
                block = torch.full((len(experts), c1 - c0), -1, dtype=torch.long)
                for j, e in enumerate(experts):
                    n = max(0, min(c1, counts[e]) - c0)
                    block[j, :n] = torch.arange(starts[e] + c0, starts[e] + c0 + n)
                sources.append(block.flatten())
                r1 = r0 + block.numel()
                self._chunks.append(BucketChunk(r0, r1, b, len(experts), c1 - c0, c0 == 0, c1 == capacity))
                r0 = r1
        source_R = torch.cat(sources).to(device) if sources else torch.zeros(0, dtype=torch.long, device=device)
        self.valid_R = source_R >= 0
        self.source_R = source_R.clamp_min(0)
        self.token_R = torch.where(self.valid_R, perm.token_sorted_N[self.source_R], 0) if r0 else source_R
        gate_R = gate_sorted_N[self.source_R] if r0 else gate_sorted_N.new_zeros(0)
        self.gate_R1 = torch.where(self.valid_R, gate_R, 0).unsqueeze(-1)
        self.num_rows = r0
        self._weights: dict[tuple[int, int], Tensor] = {}
        self._grads: dict[int, Tensor] = {}

    def chunks(self) -> list[BucketChunk]:
        return self._chunks

    def _bucket_weight(self, w_EKM: Tensor, b: int) -> Tensor:
        """The bucket's experts' weights: a copy made once per weight and bucket, which the transposed view used by
        the backward shares (``bmm`` takes transposed matrices as they are)."""
        transposed = w_EKM.stride(1) < w_EKM.stride(2)
        base = w_EKM.transpose(1, 2) if transposed else w_EKM
        key = (base.untyped_storage().data_ptr(), b)
        if key not in self._weights:
            self._weights[key] = base.index_select(0, self.bucket_ids[b])
        w = self._weights[key]
        return w.transpose(1, 2) if transposed else w

    def mm(self, a_RK: Tensor, w_EKM: Tensor, chunk: BucketChunk, out_RM: Tensor) -> Tensor:
        k, m = a_RK.shape[1], out_RM.shape[1]
        a = a_RK.view(chunk.slots, chunk.rows, k)
        torch.bmm(a, self._bucket_weight(w_EKM, chunk.bucket), out=out_RM.view(chunk.slots, chunk.rows, m))
        return out_RM

    def weight_grad(self, a_RK: Tensor, g_RM: Tensor, chunk: BucketChunk, out_EKM: Tensor) -> None:
        k, m = a_RK.shape[1], g_RM.shape[1]
        a = a_RK.view(chunk.slots, chunk.rows, k).transpose(1, 2)
        g = g_RM.view(chunk.slots, chunk.rows, m)
        key = id(out_EKM)
        if chunk.first:
            self._grads[key] = torch.bmm(a, g)
        else:
            self._grads[key].baddbmm_(a, g)
        if chunk.last:
            out_EKM.index_copy_(0, self.bucket_ids[chunk.bucket], self._grads.pop(key))

    def empty_experts(self) -> list[int]:
        return [e for e, count in enumerate(self.counts) if count == 0]

    def gate_grad_to_pairs(self, dgate_R: Tensor, order_N: Tensor, dtype: torch.dtype) -> Tensor:
        dgate = torch.empty(order_N.shape[0], dtype=dtype, device=order_N.device)
        dgate[order_N[self.source_R[self.valid_R]]] = dgate_R[self.valid_R].to(dtype)
        return dgate


# "segment" (one mm per expert segment) or "bucket" (one bmm per bucket of experts); the environment variable
# MOEZOO_CPU_LAYOUT sets it at import (read once, not on every forward).
LAYOUT = os.environ.get("MOEZOO_CPU_LAYOUT", "segment")
BUCKET_SIZE = 8


def make_layout(perm: Permutation, gate_sorted_N: Tensor, widths: tuple[int, int]) -> SegmentLayout | BucketLayout:
    chunk_rows = max(64, CHUNK_ELEMENTS // max(widths))
    if LAYOUT == "bucket":
        return BucketLayout(perm, gate_sorted_N, chunk_rows, BUCKET_SIZE)
    if LAYOUT != "segment":
        raise ValueError(f"MOEZOO_CPU_LAYOUT={LAYOUT!r} is unknown; choose 'segment' or 'bucket'")
    return SegmentLayout(perm, gate_sorted_N, chunk_rows)


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
        perm = sort_by_expert(token_idx_N, expert_idx_N, num_experts)
        gate_sorted_N = gate_N.index_select(0, perm.order_N).to(x_TD.dtype)
        layout = make_layout(perm, gate_sorted_N, (dim, hidden))
        h_RH = x_TD.new_empty(layout.num_rows, hidden)
        out_TD = x_TD.new_zeros(x_TD.shape)
        chunks: list[Any] = list(layout.chunks())  # Chunk or BucketChunk, matching the layout
        max_rows = max((c.r1 - c.r0 for c in chunks), default=0)
        x_buf = x_TD.new_empty(max_rows, dim)
        y_buf = x_TD.new_empty(max_rows, dim)
        for chunk in chunks:
            n = chunk.r1 - chunk.r0
            tok = layout.token_R[chunk.r0 : chunk.r1]
            x_RD = torch.index_select(x_TD, 0, tok, out=x_buf[:n])
            h_chunk = layout.mm(x_RD, w_in_EDH, chunk, h_RH[chunk.r0 : chunk.r1])
            a_RF = act_forward(h_chunk, activation).mul_(layout.gate_R1[chunk.r0 : chunk.r1])
            out_TD.index_add_(0, tok, layout.mm(a_RF, w_out_EFD, chunk, y_buf[:n]))
        ctx.save_for_backward(x_TD, h_RH, w_in_EDH, w_out_EFD, perm.order_N)
        ctx.layout = layout
        ctx.chunks = chunks
        ctx.activation = activation
        ctx.gate_dtype = gate_N.dtype
        return out_TD

    @staticmethod
    def backward(ctx: Any, dout_TD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_TD, h_RH, w_in_EDH, w_out_EFD, order_N = ctx.saved_tensors
        layout: SegmentLayout | BucketLayout = ctx.layout
        need_x, need_gate, need_w_in, need_w_out = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        dim, ffn_dim = x_TD.shape[1], w_out_EFD.shape[1]
        dout_TD = dout_TD.contiguous()
        empty = layout.empty_experts()
        dx = torch.zeros_like(x_TD) if need_x else None
        dw_in = _weight_grad_buffer(w_in_EDH, empty) if need_w_in else None
        dw_out = _weight_grad_buffer(w_out_EFD, empty) if need_w_out else None
        dgate_R = x_TD.new_empty(layout.num_rows) if need_gate else None
        w_out_t = w_out_EFD.transpose(1, 2)
        w_in_t = w_in_EDH.transpose(1, 2)
        max_rows = max((c.r1 - c.r0 for c in ctx.chunks), default=0)
        dz_buf = x_TD.new_empty(max_rows, dim)
        da_buf = x_TD.new_empty(max_rows, ffn_dim)
        x_buf = x_TD.new_empty(max_rows, dim)
        for chunk in ctx.chunks:
            r0, r1 = chunk.r0, chunk.r1
            n = r1 - r0
            tok = layout.token_R[r0:r1]
            g_R1 = layout.gate_R1[r0:r1]
            dz_RD = torch.index_select(dout_TD, 0, tok, out=dz_buf[:n])
            da_RF = layout.mm(dz_RD, w_out_t, chunk, da_buf[:n])
            h_chunk = h_RH[r0:r1]
            silu_RF, a_RF = act_forward_parts(h_chunk, ctx.activation)
            if dgate_R is not None:
                dgate_R[r0:r1] = torch.linalg.vecdot(da_RF, a_RF)
            if dw_out is not None:
                layout.weight_grad(a_RF.mul_(g_R1), dz_RD, chunk, dw_out)
            if not (need_x or need_w_in):
                continue
            dh_RH = act_backward(da_RF.mul_(g_R1), h_chunk, ctx.activation, silu_RF)
            if dx is not None:
                dx.index_add_(0, tok, layout.mm(dh_RH, w_in_t, chunk, dz_buf[:n]))
            if dw_in is not None:
                x_RD = torch.index_select(x_TD, 0, tok, out=x_buf[:n])
                layout.weight_grad(x_RD, dh_RH, chunk, dw_in)
        dgate = layout.gate_grad_to_pairs(dgate_R, order_N, ctx.gate_dtype) if dgate_R is not None else None
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
