"""Router losses and routing statistics.

Legend: T tokens, E experts, N routed pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch_balance_loss(probs_TE: Tensor, expert_idx_N: Tensor, num_pairs_per_token: int) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the T*K requested assignments that chose expert ``e`` (before any capacity
    dropping), ``P_e`` the mean router probability of ``e``. Equals 1 for a perfectly uniform router.
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum() * 0.0
    counts_E = torch.bincount(expert_idx_N, minlength=num_experts).to(probs_TE.dtype)
    frac_E = counts_E / (num_tokens * num_pairs_per_token)
    return num_experts * (frac_E * probs_TE.mean(0)).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps router logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def routing_entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of the routing distribution."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    p = probs_TE.clamp_min(1e-12)
    return -(p * p.log()).sum(-1).mean()


def load_cv(tokens_per_expert_E: Tensor) -> Tensor:
    """Coefficient of variation (population std / mean) of the expert load; 0 when perfectly balanced."""
    load = tokens_per_expert_E.float()
    mean = load.mean()
    # branch-free (no data-dependent Python control flow), so it traces under torch.compile(fullgraph=True)
    return torch.where(mean > 0, load.std(unbiased=False) / mean.clamp_min(1e-12), torch.zeros_like(mean))
