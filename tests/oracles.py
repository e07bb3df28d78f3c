"""Naive loop oracles. They share no code with ``moezoo.ops`` or the routers: plain Python loops over pairs,
tokens and experts, written for clarity, used only to check the library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def relu(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


PLAIN = {"gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu, "relu": relu}
GATED = {"swiglu": silu, "geglu": gelu, "reglu": relu}  # act(first half) * second half


def expert_forward(
    x_D: Tensor,
    w_in_DH: Tensor,
    w_out_FD: Tensor,
    activation: str,
    b_in_H: Tensor | None = None,
    b_out_D: Tensor | None = None,
) -> Tensor:
    h = x_D @ w_in_DH
    if b_in_H is not None:
        h = h + b_in_H
    if activation in PLAIN:
        a = PLAIN[activation](h)
    else:
        f = w_out_FD.shape[0]
        a = GATED[activation](h[:f]) * h[f:]
    y = a @ w_out_FD
    return y + b_out_D if b_out_D is not None else y


def expert_ffn(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
) -> Tensor:
    """``out[t] = sum over pairs n with token t of gate[n] * expert_{e_n}(x[t])``, one pair at a time."""
    rows = [x_TD.new_zeros(x_TD.shape[1]) for _ in range(x_TD.shape[0])]
    for n in range(token_idx_N.shape[0]):
        t, e = int(token_idx_N[n]), int(expert_idx_N[n])
        bi = b_in[e] if b_in is not None else None
        bo = b_out[e] if b_out is not None else None
        y = expert_forward(x_TD[t], w_in[e], w_out[e], activation, bi, bo)
        rows[t] = rows[t] + gate_N[n].to(x_TD.dtype) * y
    return torch.stack(rows) if rows else x_TD.new_zeros(x_TD.shape)


def topk_pairs(probs_TE: Tensor, k: int, normalize: bool) -> list[tuple[int, int, float]]:
    """Per token: the k largest probabilities (ties to the lower index), optionally renormalised."""
    pairs = []
    for t in range(probs_TE.shape[0]):
        row = [(float(p), e) for e, p in enumerate(probs_TE[t].tolist())]
        chosen = sorted(row, key=lambda pe: (-pe[0], pe[1]))[:k]
        total = sum(p for p, _ in chosen)
        for p, e in chosen:
            pairs.append((t, e, p / total if normalize else p))
    return pairs


def capacity_keep(experts: list[int], priorities: list[int], capacity: int) -> list[bool]:
    """Each expert keeps its ``capacity`` pairs of lowest priority."""
    keep = [False] * len(experts)
    for e in set(experts):
        mine = sorted((priorities[i], i) for i in range(len(experts)) if experts[i] == e)
        for _, i in mine[:capacity]:
            keep[i] = True
    return keep


def expert_choice_pairs(probs_TE: Tensor, capacity: int) -> list[tuple[int, int, float]]:
    pairs = []
    for e in range(probs_TE.shape[1]):
        col = [(float(probs_TE[t, e]), t) for t in range(probs_TE.shape[0])]
        for p, t in sorted(col, key=lambda pt: (-pt[0], pt[1]))[:capacity]:
            pairs.append((t, e, p))
    return pairs


def sinkhorn_plan(logits_TE: Tensor, num_iters: int) -> Tensor:
    """Balanced plan in the probability domain: rows sum to 1, columns to T/E."""
    t_count, e_count = logits_TE.shape
    plan = torch.exp(logits_TE.double() - logits_TE.double().max())
    for _ in range(num_iters):
        for e in range(e_count):
            plan[:, e] = plan[:, e] * (t_count / e_count) / plan[:, e].sum()
        for t in range(t_count):
            plan[t] = plan[t] / plan[t].sum()
    return plan


def switch_balance(probs_TE: Tensor, experts: list[int], k: int) -> Tensor:
    t_count, e_count = probs_TE.shape
    total = probs_TE.new_zeros(())
    for e in range(e_count):
        frac = sum(1 for x in experts if x == e) / (t_count * k)
        total = total + frac * probs_TE[:, e].mean()
    return e_count * total


def soft_moe(
    x_GLD: Tensor, phi_SD: Tensor, scale: Tensor, slots_per_expert: int, w_in: Tensor, w_out: Tensor, activation: str
) -> Tensor:
    """Soft MoE slot by slot: slot inputs are token mixes, outputs mixed back per token."""
    out = []
    phi = phi_SD / phi_SD.norm(dim=-1, keepdim=True) * scale
    for g in range(x_GLD.shape[0]):
        x = x_GLD[g]
        logits = (x / x.norm(dim=-1, keepdim=True)) @ phi.t()  # (L, S)
        dispatch = torch.softmax(logits, dim=0)
        combine = torch.softmax(logits, dim=1)
        slot_out = []
        for s in range(phi.shape[0]):
            e = s // slots_per_expert
            slot_in = (dispatch[:, s : s + 1] * x).sum(0)
            slot_out.append(expert_forward(slot_in, w_in[e], w_out[e], activation))
        out.append(combine @ torch.stack(slot_out))
    return torch.stack(out)


def promoe_pairs(x_TD: Tensor, protos_PD: Tensor, dropped: list[bool], k: int) -> list[tuple[int, int, Tensor]]:
    """ProMoE: a dropped-label token -> (t, P, 1); otherwise its k most cosine-similar prototypes, gate = cosine."""
    num_protos = protos_PD.shape[0]
    pairs = []
    for t in range(x_TD.shape[0]):
        if dropped[t]:
            pairs.append((t, num_protos, torch.ones((), dtype=x_TD.dtype)))
            continue
        sims = []
        for e in range(num_protos):
            dot = (x_TD[t] * protos_PD[e]).sum()
            sims.append((dot / (x_TD[t].norm() * protos_PD[e].norm()), e))
        for sim, e in sorted(sims, key=lambda se: (-float(se[0]), se[1]))[:k]:
            pairs.append((t, e, sim))
    return pairs


def routing_contrastive(x_TD: Tensor, protos_PD: Tensor, pairs: list[tuple[int, int]], temperature: float) -> Tensor:
    """InfoNCE of each used prototype against the normalised means of the normalised tokens of every used expert."""
    used = sorted({e for _, e in pairs})
    centroids = []
    for e in used:
        rows = [x_TD[t] / x_TD[t].norm() for t, ee in pairs if ee == e]
        mean = torch.stack(rows).mean(0)
        centroids.append(mean / mean.norm())
    total = x_TD.new_zeros(())
    for i, e in enumerate(used):
        p = protos_PD[e] / protos_PD[e].norm()
        logits = [(p * c).sum() / temperature for c in centroids]
        total = total - (logits[i] - torch.logsumexp(torch.stack(logits), 0))
    return total / len(used)


def segment_moe(
    x_BLD: Tensor,
    segment_size: int,
    gate_EW: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    top_k: int = 1,
    shared: tuple[Tensor, Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, list[list[list[int]]]]:
    """Seg-MoE one sequence and one segment at a time: concatenate w tokens (zeros past the end), softmax over
    the gate scores of the whole segment, keep the top-k (ties to the lower index; renormalised when k > 1), and
    give every token of the segment its slice of ``sum gate * expert(segment)`` (+ the shared expert, scaled by
    ``sigmoid(shared gate . segment)``). Returns the output and the chosen experts per (sequence, segment).
    """
    batch, length, dim = x_BLD.shape
    out_rows: list[list[Tensor]] = []
    chosen_all: list[list[list[int]]] = []
    for b in range(batch):
        rows: list[Tensor] = []
        chosen_b: list[list[int]] = []
        for start in range(0, length, segment_size):
            parts = [x_BLD[b, t] if t < length else x_BLD.new_zeros(dim) for t in range(start, start + segment_size)]
            seg = torch.cat(parts)
            scores = [(gate_EW[e].double() * seg.double()).sum() for e in range(gate_EW.shape[0])]
            top = max(float(s) for s in scores)
            exps = [torch.exp(s - top) for s in scores]
            probs = [p / sum(exps) for p in exps]
            order = sorted(range(len(probs)), key=lambda e: (-float(probs[e]), e))[:top_k]
            total = sum(probs[e] for e in order)
            y = seg.new_zeros(seg.shape)
            for e in order:
                g = probs[e] / total if top_k > 1 else probs[e]
                y = y + g.to(seg.dtype) * expert_forward(seg, w_in[e], w_out[e], activation)
            if shared is not None:
                s_in, s_out, s_gate = shared
                s = expert_forward(seg, s_in, s_out, activation)
                if s_gate is not None:
                    s = s / (1.0 + torch.exp(-(s_gate * seg).sum()))
                y = y + s
            chosen_b.append(order)
            for i, t in enumerate(range(start, start + segment_size)):
                if t < length:
                    rows.append(y[i * dim : (i + 1) * dim])
        out_rows.append(rows)
        chosen_all.append(chosen_b)
    return torch.stack([torch.stack(r) for r in out_rows]), chosen_all
