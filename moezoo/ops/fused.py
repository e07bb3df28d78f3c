"""The fast PyTorch path: the routed expert FFN as one autograd node with a hand-written backward.

Legend: T tokens, D model dim, F expert hidden, H = F (GELU) or 2F (SwiGLU), E experts, N routed pairs.

Compared with the reference composition it avoids saving the gathered input (re-gathered in backward),
the expert outputs (the gate gradient is recovered from the activation, see below) and autograd's per-op
bookkeeping. Used on CPUs, and on GPUs when Triton is not selected.

Gate gradient: ``y_n = g_n * a_n @ W_out``, so ``dL/dg_n = <dz_n, a_n @ W_out> = <dz_n @ W_out^T, a_n>``, and
``dz_n @ W_out^T`` is needed for the activation gradient anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moezoo.ops.activations import act_backward, act_forward
from moezoo.ops.grouped import grouped_mm, grouped_weight_grad
from moezoo.ops.permute import sort_by_expert


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
        perm = sort_by_expert(token_idx_N, expert_idx_N, w_in_EDH.shape[0])
        gate_sorted_N = gate_N.index_select(0, perm.order_N).to(x_TD.dtype)
        x_ND = x_TD.index_select(0, perm.token_sorted_N)
        h_NH = grouped_mm(x_ND, w_in_EDH, perm.counts)
        y_ND = grouped_mm(act_forward(h_NH, activation), w_out_EFD, perm.counts)
        y_ND.mul_(gate_sorted_N.unsqueeze(-1))
        out_TD = x_TD.new_zeros(x_TD.shape).index_add_(0, perm.token_sorted_N, y_ND)
        ctx.save_for_backward(x_TD, h_NH, gate_sorted_N, w_in_EDH, w_out_EFD, perm.order_N, perm.token_sorted_N)
        ctx.counts = perm.counts
        ctx.activation = activation
        ctx.gate_dtype = gate_N.dtype
        return out_TD

    @staticmethod
    def backward(ctx: Any, dout_TD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_TD, h_NH, gate_sorted_N, w_in_EDH, w_out_EFD, order_N, token_sorted_N = ctx.saved_tensors
        counts = ctx.counts
        dz_ND = dout_TD.index_select(0, token_sorted_N)
        a_NF = act_forward(h_NH, ctx.activation)
        da_NF = grouped_mm(dz_ND, w_out_EFD, counts, transpose_b=True)
        dgate_sorted_N = (da_NF * a_NF).sum(-1)
        gate_col = gate_sorted_N.unsqueeze(-1)
        dw_out = grouped_weight_grad(a_NF.mul_(gate_col), dz_ND, counts) if ctx.needs_input_grad[5] else None
        dh_NH = act_backward(da_NF.mul_(gate_col), h_NH, ctx.activation)
        dx = dw_in = None
        if ctx.needs_input_grad[0]:
            dx_ND = grouped_mm(dh_NH, w_in_EDH, counts, transpose_b=True)
            dx = torch.zeros_like(x_TD).index_add_(0, token_sorted_N, dx_ND)
        if ctx.needs_input_grad[4]:
            dw_in = grouped_weight_grad(x_TD.index_select(0, token_sorted_N), dh_NH, counts)
        dgate = None
        if ctx.needs_input_grad[3]:
            dgate = torch.empty_like(dgate_sorted_N, dtype=ctx.gate_dtype)
            dgate[order_N] = dgate_sorted_N.to(ctx.gate_dtype)
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
    out = _ExpertFFN.apply(x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, activation)
    assert isinstance(out, Tensor)
    return out
