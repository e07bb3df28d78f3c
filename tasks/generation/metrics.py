"""Routing purity: how concentrated each class's tokens are on experts.

Each token counts once, on its *primary* expert (its pair with the largest gate), so top-1, top-k and expert
choice routers are compared on the same footing; tokens routed to no expert are left out.

Legend: T tokens, B samples, L tokens per sample, E experts, K classes, N routed pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moezoo.layers import MoEAux


def primary_pairs(token_idx_N: Tensor, expert_idx_N: Tensor, gate_N: Tensor) -> tuple[Tensor, Tensor]:
    """One ``(token, expert)`` per routed token: the pair with the largest gate (ties: the first pair)."""
    if token_idx_N.numel() == 0:
        return token_idx_N, expert_idx_N
    by_gate = torch.argsort(-gate_N.float(), stable=True)
    perm = by_gate[torch.argsort(token_idx_N[by_gate], stable=True)]
    token_sorted = token_idx_N[perm]
    first = torch.ones_like(token_sorted, dtype=torch.bool)
    first[1:] = token_sorted[1:] != token_sorted[:-1]
    return token_sorted[first], expert_idx_N[perm][first]


def class_expert_counts(aux: MoEAux, y_B: Tensor, num_classes: int) -> Tensor | None:
    """``(K, E)`` counts of tokens per (class, primary expert) in one sparse MoE layer; ``None`` for Soft MoE."""
    routing = aux.routing
    if routing is None or y_B.numel() == 0:
        return None
    tokens_per_sample = routing.num_tokens // y_B.numel()
    assert tokens_per_sample * y_B.numel() == routing.num_tokens
    token_N, expert_N = primary_pairs(routing.token_idx_N, routing.expert_idx_N, routing.gate_N.detach())
    y_N = y_B.to(token_N.device)[token_N // tokens_per_sample]
    real = y_N < num_classes  # tokens of null-label (unconditional) samples carry no class
    flat = y_N[real] * routing.num_experts + expert_N[real]
    return torch.bincount(flat, minlength=num_classes * routing.num_experts).view(num_classes, -1).float()


def purity_from_counts(counts_KE: Tensor) -> float:
    """``sum_k max_e n[k, e] / sum n``: 1 when each class uses one expert, 1/E for uniform spreading."""
    total = float(counts_KE.sum())
    return float(counts_KE.max(dim=1).values.sum()) / total if total > 0 else float("nan")


def routing_purity(auxes: Sequence[MoEAux], y_B: Tensor, num_classes: int) -> float | None:
    """Mean over sparse MoE layers of :func:`purity_from_counts`; ``None`` without sparse MoE layers."""
    values = []
    for aux in auxes:
        counts = class_expert_counts(aux, y_B, num_classes)
        if counts is not None and counts.sum() > 0:
            values.append(purity_from_counts(counts))
    return sum(values) / len(values) if values else None
