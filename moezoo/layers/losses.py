"""Router losses and routing statistics.

Legend: T tokens, E experts, N routed pairs.

Means over tokens divide by ``max(T, 1)`` (:func:`moezoo.ops.size_max`) instead of branching on ``T == 0``: the
token count of a masked layer is data-dependent under ``torch.compile``, and a Python branch on it cannot be traced.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.ops import count_per_expert, size_max


def switch_balance_loss(probs_TE: Tensor, expert_idx_N: Tensor, num_pairs_per_token: int | torch.SymInt) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the T*K requested assignments that chose expert ``e`` (before any capacity
    dropping), ``P_e`` the mean router probability of ``e``. Equals 1 for a perfectly uniform router; 0 for T = 0.
    """
    num_tokens, num_experts = probs_TE.shape
    tokens = size_max(num_tokens, 1)
    frac_E = count_per_expert(expert_idx_N, num_experts).to(probs_TE.dtype) / (tokens * num_pairs_per_token)
    return num_experts * (frac_E * probs_TE.sum(0) / tokens).sum()


def logsumexp_TE(x_TE: Tensor, dim: int) -> Tensor:
    """``torch.logsumexp(x, dim, keepdim=True)`` of a ``(T, E)`` tensor whose T may be data-dependent under
    ``torch.compile`` (a masked layer): ``torch.logsumexp`` branches on ``numel() == 0``, which cannot be decided
    then, so one ``-inf`` row is appended (the tensor is never empty; the row adds nothing to a sum over tokens)
    and, for a sum over experts, its result is dropped."""
    pad_1E = x_TE.new_full((1, x_TE.shape[1]), float("-inf"))
    out = torch.logsumexp(torch.cat([x_TE, pad_1E]), dim=dim, keepdim=True)
    return out if dim == 0 else out[:-1]


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps router logits small (0 for T = 0)."""
    return logsumexp_TE(logits_TE, dim=1).square().sum() / size_max(logits_TE.shape[0], 1)


def routing_entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of the routing distribution (0 for T = 0)."""
    p = probs_TE.clamp_min(1e-12)
    logp = p.log()
    # p * log(p) into log(p)'s buffer when no gradient needs the buffer (the layers' statistics): one pass less
    plogp = logp.mul_(p) if not (torch.is_grad_enabled() and probs_TE.requires_grad) else p * logp
    return -plogp.sum() / size_max(probs_TE.shape[0], 1)


def load_cv(tokens_per_expert_E: Tensor) -> Tensor:
    """Coefficient of variation (population std / mean) of the expert load; 0 when perfectly balanced."""
    load = tokens_per_expert_E.float()
    mean = load.mean()
    # branch-free (no data-dependent Python control flow), so it traces under torch.compile(fullgraph=True)
    return torch.where(mean > 0, load.std(unbiased=False) / mean.clamp_min(1e-12), torch.zeros_like(mean))
