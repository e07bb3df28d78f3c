"""Sorting (token, expert) pairs into expert-contiguous order (host-side plan of the fused CPU path).

Legend: T tokens, N routed pairs, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Permutation:
    """Pairs sorted by expert: row ``i`` of the sorted order is pair ``order_N[i]``."""

    order_N: Tensor  # int64, sorted position -> pair index
    token_sorted_N: Tensor  # int64, token index of each sorted row
    tokens_per_expert_E: Tensor  # int64
    counts: list[int]  # tokens_per_expert_E on the host: one sync, so only for eager code (inside custom ops)

    @property
    def offsets_E1(self) -> Tensor:
        zero = self.tokens_per_expert_E.new_zeros(1)
        return torch.cat([zero, self.tokens_per_expert_E.cumsum(0)])


def sort_by_expert(
    token_idx_N: Tensor, expert_idx_N: Tensor, num_experts: int, order_N: Tensor | None = None
) -> Permutation:
    """Stable sort of the pairs by expert index (pairs of one expert keep their original order).

    ``order_N``: the sort computed before (the fused path's forward hands it to its backward), not recomputed.
    """
    if order_N is None:
        order_N = torch.argsort(expert_idx_N, stable=True)
    tokens_per_expert_E = torch.bincount(expert_idx_N, minlength=num_experts)
    return Permutation(
        order_N=order_N,
        token_sorted_N=token_idx_N.index_select(0, order_N),
        tokens_per_expert_E=tokens_per_expert_E,
        counts=tokens_per_expert_E.tolist(),
    )
