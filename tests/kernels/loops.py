"""Naive loop oracles for the kernel ops that ``tests/oracles.py`` does not cover.

Plain Python loops over tokens, pairs and experts; they share no code with ``moezoo.ops`` or ``moezoo.kernels``.
Differentiable ones are built from scalar torch ops, so autograd gives the oracle gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expected_layout(experts: list[int], num_experts: int, block_m: int) -> dict[str, list[int]]:
    """The block-padded layout by hand: each expert's pairs in order, padded to whole blocks of ``block_m``."""
    per_expert: list[list[int]] = [[] for _ in range(num_experts)]
    for n, e in enumerate(experts):
        per_expert[e].append(n)
    counts = [len(p) for p in per_expert]
    block_offsets = [0]
    block_expert: list[int] = []
    sorted_pair: list[int] = []
    for e, pairs in enumerate(per_expert):
        blocks = math.ceil(len(pairs) / block_m)
        block_offsets.append(block_offsets[-1] + blocks)
        block_expert += [e] * blocks
        sorted_pair += pairs + [-1] * (blocks * block_m - len(pairs))
    return {
        "counts": counts,
        "block_offsets": block_offsets,
        "block_expert": block_expert,
        "sorted_pair": sorted_pair,
    }


def expert_hidden(
    x_TD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, w_in: Tensor, activation: str
) -> tuple[Tensor, Tensor]:
    """Per pair: pre-activation ``h = x[t] @ w_in[e]`` and activation ``a``, one pair at a time."""
    hs, acts = [], []
    for n in range(token_idx_N.shape[0]):
        h = x_TD[int(token_idx_N[n])] @ w_in[int(expert_idx_N[n])]
        if activation == "gelu":
            a = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        else:
            f = h.shape[0] // 2
            a = h[:f] / (1.0 + torch.exp(-h[:f])) * h[f:]
        hs.append(h)
        acts.append(a)
    return torch.stack(hs), torch.stack(acts)
