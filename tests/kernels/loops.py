"""Naive loop oracles for the kernel ops that ``tests/oracles.py`` does not cover.

Plain Python loops over tokens, pairs and experts; they share no code with ``moezoo.ops`` or ``moezoo.kernels``.
Differentiable ones are built from scalar torch ops, so autograd gives the oracle gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def route(
    logits_TE: Tensor, k: int, score: str, bias_E: Tensor | None, normalize: bool, scale: float
) -> tuple[list[list[int]], Tensor]:
    """Per token: scores, the k experts with the largest ``score + bias`` (ties to the lower index), weights."""
    experts_TK: list[list[int]] = []
    weights = []
    for t in range(logits_TE.shape[0]):
        row = [logits_TE[t, e] for e in range(logits_TE.shape[1])]
        if score == "softmax":
            top = max(float(v.detach()) for v in row)
            exps = [torch.exp(v - top) for v in row]
            total = sum(exps)
            scores = [v / total for v in exps]
        else:
            scores = [1.0 / (1.0 + torch.exp(-v)) for v in row]
        select = [float(s.detach()) + (float(bias_E[e]) if bias_E is not None else 0.0) for e, s in enumerate(scores)]
        chosen = sorted(range(len(select)), key=lambda e: (-select[e], e))[:k]
        picked = [scores[e] for e in chosen]
        if normalize:
            denom = sum(picked)
            picked = [p / denom for p in picked]
        experts_TK.append(chosen)
        weights.append(torch.stack([p * scale for p in picked]))
    weight_TK = torch.stack(weights) if weights else logits_TE.new_zeros(0, k)
    return experts_TK, weight_TK


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


def combine(y_ND: Tensor, gate_N: Tensor, token_idx_N: Tensor, num_tokens: int) -> Tensor:
    rows = [y_ND.new_zeros(y_ND.shape[1]) for _ in range(num_tokens)]
    for n, (y_D, gate) in enumerate(zip(y_ND.unbind(0), gate_N.unbind(0))):
        t = int(token_idx_N[n])
        rows[t] = rows[t] + gate.to(y_ND.dtype) * y_D
    return torch.stack(rows) if rows else y_ND.new_zeros(0, y_ND.shape[1])


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
