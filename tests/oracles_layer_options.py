"""Naive oracles of the MoE layer options (``moezoo.layers.stochastic``: S2MoE, ``moezoo.layers.cartesian``:
CartesianMoE), written from the methods' equations as token-by-token loops that share no code with the library.

Each takes the layer's own parameter tensors (so gradients can be compared) and returns the output and the weighted
losses as differentiable tensors. Routing is softmax top-k (renormalised for K > 1) with the Switch balance loss at
weight ``balance_coef``, the top-k router's rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.oracles import expert_forward, switch_balance
from tests.oracles_routers import dot, matvec, softmax, softmax_topk


def routed_moe(
    tokens: list[Tensor], gate_ED: Tensor, experts: dict[str, Tensor | None], activation: str, k: int
) -> tuple[list[Tensor], Tensor]:
    """One top-k MoE pass token by token: ``out_t = sum_chosen gate * expert_e(x_t)`` (plus the shared expert when
    ``experts["shared_in"]`` is given) and the Switch balance loss (unweighted) of the routing."""
    logits = [matvec(gate_ED, v) for v in tokens]
    pairs = softmax_topk(logits, k, normalize=k > 1)
    probs = torch.stack([torch.stack(softmax(row)) for row in logits])
    balance = switch_balance(probs, [e for _, e, _ in pairs], k)
    outs = [torch.zeros_like(v) for v in tokens]
    w_in, w_out, b_in, b_out = experts["w_in"], experts["w_out"], experts["b_in"], experts["b_out"]
    assert w_in is not None and w_out is not None
    for t, e, g in pairs:
        outs[t] = outs[t] + g * expert_forward(
            tokens[t],
            w_in[e],
            w_out[e],
            activation,
            None if b_in is None else b_in[e],
            None if b_out is None else b_out[e],
        )
    if experts.get("shared_in") is not None:
        s_in, s_out = experts["shared_in"], experts["shared_out"]
        assert s_in is not None and s_out is not None
        outs = [o + expert_forward(v, s_in.t(), s_out.t(), activation) for o, v in zip(outs, tokens)]
    return outs, balance


def layer_norm(v: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``(v - mean) / sqrt(var + eps) * weight + bias``, the biased variance, entry by entry."""
    n = v.shape[0]
    mean = sum((v[i] for i in range(n)), v.new_zeros(())) / n
    var = sum(((v[i] - mean) ** 2 for i in range(n)), v.new_zeros(())) / n
    return torch.stack([(v[i] - mean) / torch.sqrt(var + eps) * weight[i] + bias[i] for i in range(n)])


def cartesian_moe(
    x_TD: Tensor,
    gate_a: Tensor,
    experts_a: dict[str, Tensor | None],
    gate_b: Tensor,
    experts_b: dict[str, Tensor | None],
    activation: str,
    k: int,
    inner_residual: bool,
    norm: tuple[Tensor, Tensor] | None,
    balance_coef: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """CartesianMoE token by token: ``a = MoE_A(x)``, ``h = x + a`` (or ``a``), ``b = MoE_B(LN(h))`` (or of ``h``),
    ``y = a + b`` (or ``b``); returns ``y`` and ``balance_coef * (balance_A + balance_B)``."""
    tokens = [x_TD[t] for t in range(x_TD.shape[0])]
    out_a, bal_a = routed_moe(tokens, gate_a, experts_a, activation, k)
    h = [x + a if inner_residual else a for x, a in zip(tokens, out_a)]
    h_in = [layer_norm(v, *norm) for v in h] if norm is not None else h
    out_b, bal_b = routed_moe(h_in, gate_b, experts_b, activation, k)
    y = [a + b if inner_residual else b for a, b in zip(out_a, out_b)]
    return torch.stack(y), balance_coef * (bal_a + bal_b)


def info_nce(clean: list[Tensor], noisy: list[Tensor], groups: list[list[int]], temperature: float) -> Tensor:
    """Mean over the tokens of every group of ``-log( exp(cos(c_t, n_t)/tau) / sum_s exp(cos(c_t, n_s)/tau) )``, ``s``
    over the tokens of ``t``'s group."""

    def cos(a: Tensor, b: Tensor) -> Tensor:
        return dot(a, b) / (torch.sqrt(dot(a, a)) * torch.sqrt(dot(b, b)))

    total = clean[0].new_zeros(())
    count = 0
    for group in groups:
        for t in group:
            scores = [cos(clean[t], noisy[s]) / temperature for s in group]
            log_norm = torch.log(sum((torch.exp(v) for v in scores), total.new_zeros(())))
            total = total + log_norm - scores[group.index(t)]
            count += 1
    return total / max(count, 1)


def s2moe(
    x_TD: Tensor,
    eps_TD: Tensor,
    noise_std: float,
    gate_ED: Tensor,
    experts: dict[str, Tensor | None],
    path_w: Tensor,
    path_b: Tensor,
    activation: str,
    k: int,
    groups: list[list[int]],
    uncertainty_coef: float,
    temperature: float,
    balance_coef: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """S2MoE in training, token by token: ``x'_t = x_t + noise_std * rms(x_t) * eps_t`` (rms without gradient),
    ``g_t = sigmoid(w . x_t + b)``, ``y_t = g_t MoE(x_t) + (1 - g_t) MoE(x'_t)`` with one router and one set of
    experts; losses ``balance_coef * (balance(x) + balance(x'))`` and ``uncertainty_coef * InfoNCE`` of the two
    outputs within each group. Returns ``y`` and the total weighted loss."""
    tokens = [x_TD[t] for t in range(x_TD.shape[0])]
    noisy = []
    for t, v in enumerate(tokens):
        rms = math.sqrt(sum(float(v[i].detach()) ** 2 for i in range(v.shape[0])) / v.shape[0])
        noisy.append(v + noise_std * rms * eps_TD[t])
    out_c, bal_c = routed_moe(tokens, gate_ED, experts, activation, k)
    out_n, bal_n = routed_moe(noisy, gate_ED, experts, activation, k)
    y = []
    for t, v in enumerate(tokens):
        g = 1.0 / (1.0 + torch.exp(-(dot(path_w, v) + path_b)))
        y.append(g * out_c[t] + (1.0 - g) * out_n[t])
    loss = balance_coef * (bal_c + bal_n)
    if uncertainty_coef > 0:
        loss = loss + uncertainty_coef * info_nce(out_c, out_n, groups, temperature)
    return torch.stack(y), loss
