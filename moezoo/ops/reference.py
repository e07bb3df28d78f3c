"""The readable specification of the routed expert FFN, built from differentiable PyTorch ops.

Legend: T tokens, D model dim, F expert hidden, H = F (GELU) or 2F (SwiGLU), E experts, N routed pairs.

``expert_ffn_reference`` is the contract every backend implements::

    out[t] = sum over pairs n with token_idx[n] == t of  gate[n] * FFN_{expert_idx[n]}(x[t])
    FFN_e(x) = act(x @ w_in[e]) @ w_out[e]

Autograd derives every gradient; the fused PyTorch path and the Triton kernels are tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.ops.activations import act_forward
from moezoo.ops.permute import sort_by_expert


def expert_ffn_reference(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str,
) -> Tensor:
    perm = sort_by_expert(token_idx_N, expert_idx_N, w_in_EDH.shape[0])
    x_ND = x_TD.index_select(0, perm.token_sorted_N)
    outputs = []
    start = 0
    for e, count in enumerate(perm.counts):
        rows = x_ND[start : start + count]
        outputs.append(act_forward(rows @ w_in_EDH[e], activation) @ w_out_EFD[e])
        start += count
    y_ND = torch.cat(outputs) if outputs else x_ND.new_zeros(0, x_TD.shape[1])
    y_ND = y_ND * gate_N.index_select(0, perm.order_N).to(y_ND.dtype).unsqueeze(-1)
    return x_TD.new_zeros(x_TD.shape).index_add(0, perm.token_sorted_N, y_ND)
