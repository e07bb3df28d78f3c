"""Peers the micro benchmarks compare ``moezoo.MoE`` with: other ways to run the same router and expert weights.

Legend: T tokens, D model dim, E experts, N routed pairs, H expert hidden (first projection).

- :class:`NaiveLoopMoE`: the per-expert masked loop most MoE code starts from (one host sync per expert);
- :class:`GroupedMMMoE`: experts on ``torch._grouped_mm`` (sort, gather, two grouped GEMMs, weighted
  ``index_add``; no host sync);
- :func:`hf_mixtral_block`: transformers' Mixtral sparse block with its ``grouped_mm`` experts backend, when
  ``transformers`` is installed.

Each takes an existing :class:`~moezoo.layers.MoE` (sparse router) and reuses its router and weights, so every
candidate of a benchmark row computes the same function; each returns the layer output only (no aux result).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moezoo.layers import MoE, RoutingResult
from moezoo.ops.activations import act_forward


class _Peer(nn.Module):
    """A peer of ``moe``: its router and expert weights, another way to run the experts."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def route(self, x: Tensor) -> tuple[Tensor, RoutingResult]:
        """``x (..., D)`` -> ``(x_TD, the router's pairs)``."""
        x_TD = x.reshape(-1, x.shape[-1])
        return x_TD, self.moe.route(x_TD)


class NaiveLoopMoE(_Peer):
    """For each expert: select its pairs with a mask, run it, add the gated rows back (one host sync per expert)."""

    def forward(self, x: Tensor) -> Tensor:
        experts = self.moe.experts
        x_TD, routing = self.route(x)
        out = torch.zeros_like(x_TD)
        for e in range(experts.num_experts):
            sel = routing.expert_idx_N == e
            tokens = routing.token_idx_N[sel]
            if tokens.numel() == 0:
                continue
            y = act_forward(x_TD[tokens] @ experts.w_in[e], experts.activation) @ experts.w_out[e]
            out = out.index_add(0, tokens, y * routing.gate_N[sel].to(y.dtype).unsqueeze(-1))
        return out.reshape(x.shape)


class GroupedMMMoE(_Peer):
    """The MoE layer's router and weights with the experts on ``torch._grouped_mm`` (no host sync)."""

    def forward(self, x: Tensor) -> Tensor:
        experts = self.moe.experts
        x_TD, routing = self.route(x)
        order_N = torch.argsort(routing.expert_idx_N, stable=True)
        counts_E = torch.bincount(routing.expert_idx_N, minlength=experts.num_experts)
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        token_N = routing.token_idx_N.index_select(0, order_N)
        h_NH = torch._grouped_mm(x_TD.index_select(0, token_N), experts.w_in, offs=offsets_E)
        y_ND = torch._grouped_mm(act_forward(h_NH, experts.activation), experts.w_out, offs=offsets_E)
        y_ND = y_ND * routing.gate_N.index_select(0, order_N).to(y_ND.dtype).unsqueeze(-1)
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND).reshape(x.shape)


class _Reshape3d(nn.Module):
    """transformers blocks take ``(B, L, D)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x.unsqueeze(0)).squeeze(0)


def hf_mixtral_block(moe: MoE) -> nn.Module | None:
    """transformers' Mixtral sparse block with the ``grouped_mm`` experts backend and ``moe``'s weights, taking
    ``(T, D)``; ``None`` without transformers or for non-SwiGLU experts."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    experts = moe.experts
    if experts.activation != "swiglu":
        return None
    config = MixtralConfig(
        hidden_size=experts.dim,
        intermediate_size=experts.ffn_dim,
        num_local_experts=experts.num_experts,
        num_experts_per_tok=moe.top_k,
        hidden_act="silu",
    )
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.gate.weight)
        block.experts.gate_up_proj.copy_(experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(experts.w_out.transpose(1, 2))
    return _Reshape3d(block)
