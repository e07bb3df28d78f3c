"""Naive oracles of the routers in ``moezoo.layers.token_graph_routers``, written from the papers' equations.

Plain Python loops over tokens, neighbours and experts that share no code with the library (as
``tests/oracles_routers.py``): pairs are ``(token, expert, gate)`` with a 0-d tensor gate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests import oracles
from tests.oracles_routers import Pairs, dot, matvec, order, softmax


def _select(
    mixed: list[list[Tensor]], k: int, normalize: bool, balance_coef: float, zero: Tensor
) -> tuple[Pairs, dict[str, Tensor], list[list[Tensor]]]:
    """Token by token: the top-k of each mixed row ``p~`` with gates ``p~`` (renormalised when ``normalize``), and the
    Switch balance loss on ``p~`` and the pairs."""
    pairs: Pairs = []
    for t, row in enumerate(mixed):
        chosen = order([float(p.detach()) for p in row])[:k]
        total = sum((row[e] for e in chosen), zero)
        pairs += [(t, e, row[e] / total if normalize else row[e]) for e in chosen]
    losses = {}
    if balance_coef > 0 and mixed:
        probs_TE = torch.stack([torch.stack(row) for row in mixed])
        losses["balance"] = balance_coef * oracles.switch_balance(probs_TE, [e for _, e, _ in pairs], k)
    return pairs, losses, mixed


def similarity_routing(
    x_TD: Tensor,
    gate_ED: Tensor,
    sim_RD: Tensor | None,
    samples: list[list[int]],
    k: int,
    temperature: float,
    normalize: bool,
    balance_coef: float,
) -> tuple[Pairs, dict[str, Tensor], list[list[Tensor]]]:
    """Similarity-aware SMoE token by token: ``p~_i = sum_{j in sample(i)} S_ij softmax(W_g x_j)``,
    ``S_ij = exp(<h_i, h_j> / (tau sqrt(R))) / sum_l exp(<h_i, h_l> / (tau sqrt(R)))``, ``h = W_g x`` or ``W_s x``;
    top-k of ``p~`` with gates ``p~`` (renormalised). Returns the pairs, the balance loss and the ``p~`` rows."""
    num_tokens = x_TD.shape[0]
    logits = [matvec(gate_ED, x_TD[t]) for t in range(num_tokens)]
    probs = [softmax(row) for row in logits]
    feats = logits if sim_RD is None else [matvec(sim_RD, x_TD[t]) for t in range(num_tokens)]
    width = len(feats[0]) if feats else 1
    scale = 1.0 / (temperature * math.sqrt(width))
    mixed: list[list[Tensor]] = [[] for _ in range(num_tokens)]
    for sample in samples:
        for i in sample:
            weights = softmax([scale * dot(torch.stack(feats[i]), torch.stack(feats[j])) for j in sample])
            mixed[i] = [
                sum((w * probs[j][e] for w, j in zip(weights, sample)), x_TD.new_zeros(()))
                for e in range(gate_ED.shape[0])
            ]
    return _select(mixed, k, normalize, balance_coef, x_TD.new_zeros(()))


def attention_routing(
    x_TD: Tensor,
    gate_ED: Tensor,
    attn_TL: Tensor,
    grid: list[list[int | None]],
    k: int,
    normalize: bool,
    balance_coef: float,
) -> tuple[Pairs, dict[str, Tensor], list[list[Tensor]]]:
    """Attention-aware SMoE token by token: ``p~_i = sum_j A_ij softmax(W_g x_j) / sum_j A_ij`` over the tokens j of
    i's sample, ``A_ij = attn_TL[i, l]`` with l the place of j in ``grid`` (``grid[b][l]``: the token at place l of
    sample b, None for a masked place); top-k of ``p~`` with gates ``p~`` (renormalised). Returns the pairs, the
    balance loss and the ``p~`` rows."""
    num_tokens, num_experts = x_TD.shape[0], gate_ED.shape[0]
    probs = [softmax(matvec(gate_ED, x_TD[t])) for t in range(num_tokens)]
    mixed: list[list[Tensor]] = [[] for _ in range(num_tokens)]
    for row in grid:
        places = [(place, j) for place, j in enumerate(row) if j is not None]
        for _, i in places:
            total = sum((attn_TL[i, place] for place, _ in places), x_TD.new_zeros(()))
            mixed[i] = [
                sum((attn_TL[i, place] * probs[j][e] for place, j in places), x_TD.new_zeros(())) / total
                for e in range(num_experts)
            ]
    return _select(mixed, k, normalize, balance_coef, x_TD.new_zeros(()))


def hash_bucket(x_D: Tensor, planes_PD: Tensor) -> int:
    """MaskMoE's key of a token here: bit b set when ``<planes_b, x> > 0``."""
    return sum(2**b for b in range(planes_PD.shape[0]) if float(dot(planes_PD[b], x_D).detach()) > 0)


def maskmoe_routing(
    x_TD: Tensor, gate_ED: Tensor, planes_PD: Tensor, visible_UE: Tensor, k: int, normalize: bool, balance_coef: float
) -> tuple[Pairs, dict[str, Tensor], list[int]]:
    """MaskMoE token by token: ``p = softmax(W_g x + m)`` with ``m_e = 0`` for the experts visible to the token's
    key and ``-inf`` otherwise; the K most probable visible experts, gates ``p`` (renormalised). Returns the pairs,
    the balance loss and each token's bucket."""
    pairs: Pairs = []
    rows, buckets = [], []
    for t in range(x_TD.shape[0]):
        bucket = hash_bucket(x_TD[t], planes_PD)
        buckets.append(bucket)
        logits = matvec(gate_ED, x_TD[t])
        seen = [e for e in range(gate_ED.shape[0]) if bool(visible_UE[bucket, e])]
        visible_probs = softmax([logits[e] for e in seen])
        p = [x_TD.new_zeros(()) for _ in logits]
        for e, q in zip(seen, visible_probs):
            p[e] = q
        rows.append(p)
        chosen = [seen[i] for i in order([float(logits[e].detach()) for e in seen])[:k]]
        total = sum((p[e] for e in chosen), x_TD.new_zeros(()))
        pairs += [(t, e, p[e] / total if normalize else p[e]) for e in chosen]
    losses = {}
    if balance_coef > 0 and rows:
        probs_TE = torch.stack([torch.stack(row) for row in rows])
        losses["balance"] = balance_coef * oracles.switch_balance(probs_TE, [e for _, e, _ in pairs], k)
    return pairs, losses, buckets
