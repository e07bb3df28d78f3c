"""The readable specification of the routed expert FFN, built from differentiable PyTorch ops.

Legend: T tokens, D model dim, F expert hidden, H = F (plain activations) or 2F (gated: SwiGLU, GEGLU, ReGLU),
E experts, N routed pairs, M pairs of one expert.

``expert_ffn_reference`` is the contract every backend implements::

    out[t] = sum over pairs n with token_idx[n] == t of  gate[n] * FFN_{expert_idx[n]}(x[t])
    FFN_e(x) = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]       (biases optional: None means zero)

Autograd derives every gradient; the fused PyTorch path and the Triton kernels are tested against it. It loops
over experts and selects each expert's pairs with :func:`~moezoo.ops.indexing.true_indices`, so it needs no host
sync and traces under ``torch.compile`` like the other backends.
"""

from __future__ import annotations

from torch import Tensor

from moezoo.ops.activations import act_forward
from moezoo.ops.indexing import true_indices


def expert_ffn_reference(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str,
    b_in_EH: Tensor | None = None,
    b_out_ED: Tensor | None = None,
) -> Tensor:
    out_TD = x_TD.new_zeros(x_TD.shape)
    for e in range(w_in_EDH.shape[0]):
        pairs_M = true_indices(expert_idx_N == e)
        token_M = token_idx_N.index_select(0, pairs_M)
        h_MH = x_TD.index_select(0, token_M) @ w_in_EDH[e]
        if b_in_EH is not None:
            h_MH = h_MH + b_in_EH[e]
        y_MD = act_forward(h_MH, activation) @ w_out_EFD[e]
        if b_out_ED is not None:
            y_MD = y_MD + b_out_ED[e]
        gate_M1 = gate_N.index_select(0, pairs_M).to(y_MD.dtype).unsqueeze(-1)
        out_TD.index_add_(0, token_M, y_MD * gate_M1)
    return out_TD
