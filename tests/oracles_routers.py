"""Naive oracles of the routers in ``moezoo.layers.routers_extra``, written from the papers' equations.

Plain Python loops over tokens and experts; they share no code with the library. Each takes the router's own
parameter tensors (so gradients can be compared) and returns differentiable scalars: ``logits`` as a list of rows
of 0-d tensors, pairs as ``(token, expert, gate)`` with a 0-d tensor gate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Pairs = list[tuple[int, int, Tensor]]


def dot(a: Tensor, b: Tensor) -> Tensor:
    total = a.new_zeros(())
    for i in range(a.shape[0]):
        total = total + a[i] * b[i]
    return total


def matvec(w_OI: Tensor, x_I: Tensor) -> list[Tensor]:
    return [dot(w_OI[o], x_I) for o in range(w_OI.shape[0])]


def softmax(row: list[Tensor]) -> list[Tensor]:
    top = max(float(v.detach()) for v in row)
    exps = [torch.exp(v - top) for v in row]
    total = sum(exps, row[0].new_zeros(()))
    return [e / total for e in exps]


def order(values: list[float]) -> list[int]:
    """Indices by decreasing value, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def softmax_topk(logits: list[list[Tensor]], k: int, normalize: bool) -> Pairs:
    pairs = []
    for t, row in enumerate(logits):
        probs = softmax(row)
        chosen = order([float(p) for p in probs])[:k]
        total = sum((probs[e] for e in chosen), probs[0].new_zeros(()))
        pairs += [(t, e, probs[e] / total if normalize else probs[e]) for e in chosen]
    return pairs


# ------------------------------------------------------------------------------------------------- logits only


def xmoe_logits(x_TD: Tensor, proj_RD: Tensor, emb_ER: Tensor, tau: Tensor) -> list[list[Tensor]]:
    """``cos(W_p x, e_e) / tau``."""
    rows = []
    for t in range(x_TD.shape[0]):
        h = torch.stack(matvec(proj_RD, x_TD[t]))
        rows.append(
            [
                dot(h, emb_ER[e]) / (dot(h, h).sqrt() * dot(emb_ER[e], emb_ER[e]).sqrt()) / tau
                for e in range(emb_ER.shape[0])
            ]
        )
    return rows


def hyper_logits(x_TD: Tensor, hyper_FM: Tensor, embedding_M: Tensor, num_experts: int) -> list[list[Tensor]]:
    """``W = reshape(H e)`` (E, D), then ``W x``."""
    dim = x_TD.shape[1]
    flat = matvec(hyper_FM, embedding_M)
    w = [torch.stack(flat[e * dim : (e + 1) * dim]) for e in range(num_experts)]
    return [[dot(w[e], x_TD[t]) for e in range(num_experts)] for t in range(x_TD.shape[0])]


def attention_logits(x_TD: Tensor, wq: Tensor, wk: Tensor, wv: Tensor) -> list[list[Tensor]]:
    """Yuan 2.0-M32: ``logit_i = sum_j softmax_j(q_i k_j) v_j``."""
    rows = []
    for t in range(x_TD.shape[0]):
        q, k, v = matvec(wq, x_TD[t]), matvec(wk, x_TD[t]), matvec(wv, x_TD[t])
        row = []
        for i in range(len(q)):
            attn = softmax([q[i] * k[j] for j in range(len(k))])
            row.append(sum((attn[j] * v[j] for j in range(len(v))), q[0].new_zeros(())))
        rows.append(row)
    return rows


def mixture_of_routers_logits(x_TD: Tensor, queries_FD: Tensor, keys_HER: Tensor) -> list[list[Tensor]]:
    """Mean over routers h of ``(W_h x) . k_{h,e} / sqrt(R)``."""
    heads, experts, r = keys_HER.shape
    rows = []
    for t in range(x_TD.shape[0]):
        q = matvec(queries_FD, x_TD[t])
        row = []
        for e in range(experts):
            total = x_TD.new_zeros(())
            for h in range(heads):
                total = total + dot(torch.stack(q[h * r : (h + 1) * r]), keys_HER[h, e]) / math.sqrt(r)
            row.append(total / heads)
        rows.append(row)
    return rows


def gmm_logits(x_TD: Tensor, proj_RD: Tensor, mu_ER: Tensor, log_sigma_E: Tensor, mix_E: Tensor) -> list[list[Tensor]]:
    """``log pi_e + log N(z; mu_e, sigma_e^2 I)`` up to the constant ``-R/2 log 2 pi`` (softmax: the posterior)."""
    r = mu_ER.shape[1]
    log_pi = [torch.log(p) for p in softmax(list(mix_E))]
    rows = []
    for t in range(x_TD.shape[0]):
        z = torch.stack(matvec(proj_RD, x_TD[t]))
        row = []
        for e in range(mu_ER.shape[0]):
            sigma = torch.exp(log_sigma_E[e])
            diff = z - mu_ER[e]
            row.append(log_pi[e] - dot(diff, diff) / (2 * sigma * sigma) - r * torch.log(sigma))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ own selection rules


def top_p_pairs(probs: list[list[Tensor]], top_p: float, max_k: int, normalize: bool) -> Pairs:
    """Experts by decreasing probability until the chosen mass reaches ``top_p`` (at most ``max_k``)."""
    pairs = []
    for t, row in enumerate(probs):
        chosen: list[int] = []
        mass = 0.0
        for e in order([float(p) for p in row]):
            if mass >= top_p or len(chosen) == max_k:
                break
            chosen.append(e)
            mass += float(row[e])
        total = sum((row[e] for e in chosen), row[0].new_zeros(()))
        pairs += [(t, e, row[e] / total if normalize else row[e]) for e in sorted(chosen)]
    return pairs


def entropy(probs: list[list[Tensor]]) -> Tensor:
    total = probs[0][0].new_zeros(())
    for row in probs:
        for p in row:
            total = total - p * torch.log(p)
    return total / len(probs)


def prototype_pairs(logits: list[list[Tensor]], k: int) -> Pairs:
    """M6-T: K groups of E/K consecutive experts, top-1 by the softmax within each group."""
    group = len(logits[0]) // k
    pairs = []
    for t, row in enumerate(logits):
        for g in range(k):
            probs = softmax(row[g * group : (g + 1) * group])
            best = order([float(p) for p in probs])[0]
            pairs.append((t, g * group + best, probs[best]))
    return pairs


def expert_race_pairs(scores: list[list[Tensor]], k: int) -> Pairs:
    """The T*K largest entries of the whole score matrix."""
    flat = [(float(s), t, e) for t, row in enumerate(scores) for e, s in enumerate(row)]
    chosen = sorted(flat, key=lambda ste: (-ste[0], ste[1], ste[2]))[: len(scores) * k]
    return [(t, e, scores[t][e]) for _, t, e in sorted(chosen, key=lambda ste: (ste[1], ste[2]))]


def vq(x_TD: Tensor, code_ED: Tensor, k: int, commitment: float) -> tuple[Pairs, Tensor]:
    """Nearest-codeword routing (gate 1/k) and the VQ-VAE codebook + commitment loss, mean over pairs and dims."""
    pairs: Pairs = []
    loss = x_TD.new_zeros(())
    for t in range(x_TD.shape[0]):
        dists = [float(((x_TD[t] - code_ED[e]) ** 2).sum()) for e in range(code_ED.shape[0])]
        for e in order([-d for d in dists])[:k]:
            pairs.append((t, e, torch.tensor(1.0 / k, dtype=x_TD.dtype)))
            loss = (
                loss
                + ((x_TD[t].detach() - code_ED[e]) ** 2).sum()
                + commitment * ((x_TD[t] - code_ED[e].detach()) ** 2).sum()
            )
    return pairs, loss / (len(pairs) * x_TD.shape[1])


def stablemoe(x_TD: Tensor, centroids_ED: Tensor, distilled_ED: Tensor, k: int, stage: int) -> tuple[Pairs, Tensor]:
    """Stage 1: the top-k experts by ``x . c_e``, and the distilled router's cross-entropy on them; stage 2: the
    top-k by the distilled router. Gates ``sigmoid(x . c_e)``."""
    pairs: Pairs = []
    nll = x_TD.new_zeros(())
    for t in range(x_TD.shape[0]):
        scores = matvec(centroids_ED, x_TD[t])
        distilled = matvec(distilled_ED, x_TD[t].detach())
        learned = order([float(s) for s in scores])[:k]
        chosen = learned if stage == 1 else order([float(s) for s in distilled])[:k]
        q = softmax(distilled)
        for e in learned:
            nll = nll - torch.log(q[e])
        pairs += [(t, e, torch.sigmoid(scores[e])) for e in chosen]
    return pairs, nll / (x_TD.shape[0] * k)


def gw_pairs(logits: list[list[Tensor]], k: int, normalize: bool, uncertainty: float, training: bool) -> Pairs:
    """GW-MoE: top-k; in training a token whose routing entropy is >= ``uncertainty * log E`` takes every expert
    with its softmax probabilities as gates."""
    pairs: Pairs = []
    for t, row in enumerate(logits):
        probs = softmax(row)
        h = -sum(float(p) * math.log(float(p)) for p in probs)
        if training and h >= uncertainty * math.log(len(row)):
            pairs += [(t, e, probs[e]) for e in range(len(row))]
            continue
        chosen = order([float(p) for p in probs])[:k]
        total = sum((probs[e] for e in chosen), probs[0].new_zeros(()))
        pairs += [(t, e, probs[e] / total if normalize else probs[e]) for e in chosen]
    return pairs


def bilevel_pairs(logits: list[list[Tensor]], group_logits: list[list[Tensor]], k: int) -> Pairs:
    """SMILE: the top-1 group by its softmax, then the top-k experts of that group by the softmax within it;
    gate ``p(group) p(expert | group)``."""
    groups = len(group_logits[0])
    size = len(logits[0]) // groups
    pairs: Pairs = []
    for t, row in enumerate(logits):
        pg = softmax(group_logits[t])
        g = order([float(p) for p in pg])[0]
        inner = softmax(row[g * size : (g + 1) * size])
        for s in order([float(p) for p in inner])[:k]:
            pairs.append((t, g * size + s, pg[g] * inner[s]))
    return pairs


def fill_in(kept: Pairs, probs: list[list[Tensor]], capacity: int) -> Pairs:
    """Rectify-Router fill-in: each expert's ``capacity - kept`` vacant slots go to the tokens of highest
    probability for it that it does not already hold (ties to the lower token), gate = that probability."""
    held = {(t, e) for t, e, _ in kept}
    added: Pairs = []
    for e in range(len(probs[0])):
        vacant = capacity - sum(1 for _, ee, _ in kept if ee == e)
        candidates = [t for t in range(len(probs)) if (t, e) not in held]
        for t in sorted(candidates, key=lambda tt: (-float(probs[tt][e]), tt))[: max(0, vacant)]:
            added.append((t, e, probs[t][e]))
    return kept + added


def moec_dropped(draw_CS: Tensor, num_dropped: int) -> set[int]:
    """MoEC's cluster-level dropout: in each cluster (a row of ``draw_CS``, one uniform draw per expert) the
    ``num_dropped`` experts with the lowest draws are dropped."""
    size = draw_CS.shape[1]
    dropped: set[int] = set()
    for c in range(draw_CS.shape[0]):
        ranked = sorted(range(size), key=lambda i: float(draw_CS[c, i]))
        dropped |= {c * size + i for i in ranked[:num_dropped]}
    return dropped


def moec(
    logits: list[list[Tensor]], k: int, cluster_size: int, dropped: set[int], normalize: bool
) -> tuple[Pairs, Tensor]:
    """MoEC, token by token: top-k on the softmax; each choice (in order) whose expert is in ``dropped`` goes to the
    surviving expert of the same cluster (``cluster_size`` consecutive experts) with the highest probability (ties
    to the lower index) that the token does not already use (its surviving choices count as used from the start),
    or is removed when there is none; gates are the final experts' probabilities (renormalised over the token's
    final pairs with ``normalize``). Also returns the within-cluster population variance of the probabilities,
    summed over clusters and averaged over tokens."""
    pairs: Pairs = []
    variance = torch.zeros((), dtype=torch.float64)
    for t, row in enumerate(logits):
        probs = softmax(row)
        chosen = order([float(p.detach()) for p in probs])[:k]
        used = [e for e in chosen if e not in dropped]
        final = []
        for e in chosen:
            if e not in dropped:
                final.append(e)
                continue
            start = (e // cluster_size) * cluster_size
            free = [f for f in range(start, start + cluster_size) if f not in dropped and f not in used]
            if free:
                best = sorted(free, key=lambda f: (-float(probs[f].detach()), f))[0]
                used.append(best)
                final.append(best)
        total = sum((probs[e] for e in final), probs[0].new_zeros(()))
        pairs += [(t, e, probs[e] / total if normalize else probs[e]) for e in final]
        for start in range(0, len(row), cluster_size):
            members = probs[start : start + cluster_size]
            mean = sum(members, probs[0].new_zeros(())) / cluster_size
            variance = variance + sum(((p - mean) ** 2 for p in members), probs[0].new_zeros(())) / cluster_size
    return pairs, variance / max(1, len(logits))


def symmetric_kl(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Mean over rows of ``(KL(p_a || p_b) + KL(p_b || p_a)) / 2``."""
    total = logits_a.new_zeros(())
    rows = logits_a.reshape(-1, logits_a.shape[-1])
    other = logits_b.reshape(-1, logits_b.shape[-1])
    for i in range(rows.shape[0]):
        pa, pb = softmax(list(rows[i])), softmax(list(other[i]))
        for a, b in zip(pa, pb):
            total = total + 0.5 * (a * torch.log(a / b) + b * torch.log(b / a))
    return total / rows.shape[0]


# ------------------------------------------------------------------------- routers that read the expert weights


def gate_weight(w_in_EDH: Tensor, b_in_EH: Tensor | None, ffn_dim: int) -> tuple[Tensor, Tensor | None]:
    """The paper's ``W_g``: the columns of ``w_in`` entering the activation (the first F of a gated form's 2F)."""
    return w_in_EDH[..., :ffn_dim], None if b_in_EH is None else b_in_EH[..., :ffn_dim]


def activation_norm(x_D: Tensor, w_DF: Tensor, b_F: Tensor | None) -> Tensor:
    """``||x W_g + b_g||_2``, one hidden unit at a time."""
    total = x_D.new_zeros(())
    for f in range(w_DF.shape[1]):
        h = dot(x_D, w_DF[:, f]) + (b_F[f] if b_F is not None else 0.0)
        total = total + h * h
    return torch.sqrt(total)


def autonomy_norms(x_TD: Tensor, w_EDF: Tensor, b_EF: Tensor | None) -> list[list[Tensor]]:
    """Autonomy-of-Experts: every expert's activation norm for every token."""
    return [
        [activation_norm(x_TD[t], w_EDF[e], None if b_EF is None else b_EF[e]) for e in range(w_EDF.shape[0])]
        for t in range(x_TD.shape[0])
    ]


def erc(router_ED: Tensor, noise_ED: Tensor | None, w_EDF: Tensor, b_EF: Tensor | None, alpha: float) -> Tensor:
    """ERC loss: proxies ``R_i * noise_i``; ``M[i][j]`` = activation norm of proxy i in expert j; the sum over
    ``i != j`` of ``relu(M_ij - alpha M_ii) + relu(M_ji - alpha M_ii)``, / E^2."""
    n = router_ED.shape[0]
    proxies = [router_ED[i] * (noise_ED[i] if noise_ED is not None else 1.0) for i in range(n)]
    m = [[activation_norm(proxies[i], w_EDF[j], None if b_EF is None else b_EF[j]) for j in range(n)] for i in range(n)]
    total = router_ED.new_zeros(())
    for i in range(n):
        for j in range(n):
            if i != j:
                total = total + torch.relu(m[i][j] - alpha * m[i][i]) + torch.relu(m[j][i] - alpha * m[i][i])
    return total / (n * n)


def erc_noise(router_ED: Tensor, uniform_ED: Tensor) -> Tensor:
    """``1 + eps_i (2u - 1)`` with ``eps_i = min(1, min_{j != i} ||R_i - R_j|| / (2 ||R_i||))``."""
    n = router_ED.shape[0]
    rows = []
    for i in range(n):
        dists = [float(torch.sqrt(sum((router_ED[i] - router_ED[j]) ** 2))) for j in range(n) if j != i]
        eps = min(1.0, min(dists) / (2 * float(torch.sqrt(sum(router_ED[i] ** 2))))) if dists else 0.0
        rows.append(1.0 + eps * (2 * uniform_ED[i] - 1))
    return torch.stack(rows)


def _merged(p: list[Tensor], stack: Tensor | None) -> Tensor | None:
    """``sum_e p_e stack_e``, one expert at a time."""
    if stack is None:
        return None
    return sum((p[e] * stack[e] for e in range(len(p))), torch.zeros_like(stack[0]))


def smear(
    x_GLD: Tensor,
    mask_GL: Tensor | None,
    gate_ED: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SMEAR, example by example: ``p = softmax(W mean of the real tokens)``, merged parameters
    ``theta = sum_e p_e theta_e``, every token through the merged expert (padding: 0). Returns ``(y, p)``."""
    from tests.oracles import expert_forward

    outputs, weights = [], []
    for g in range(x_GLD.shape[0]):
        real = [i for i in range(x_GLD.shape[1]) if mask_GL is None or bool(mask_GL[g, i])]
        mean = sum((x_GLD[g, i] for i in real), x_GLD.new_zeros(x_GLD.shape[2])) / max(len(real), 1)
        p = softmax(matvec(gate_ED, mean))
        weights.append(torch.stack(p))

        m_in, m_out, m_bin, m_bout = (_merged(p, stack) for stack in (w_in, w_out, b_in, b_out))
        assert m_in is not None and m_out is not None
        rows = []
        for i in range(x_GLD.shape[1]):
            y = expert_forward(x_GLD[g, i], m_in, m_out, activation, m_bin, m_bout)
            rows.append(y if i in real else torch.zeros_like(y))
        outputs.append(torch.stack(rows))
    return torch.stack(outputs), torch.stack(weights)


def competition_scores(
    x_TD: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
) -> list[list[Tensor]]:
    """CompeteSMoE's neural response of every expert to every token: the mean over the output's D entries of
    ``softplus(y) = log(1 + exp(y))``, ``y`` the expert's full forward, one expert and one token at a time."""
    from tests.oracles import expert_forward

    rows = []
    for t in range(x_TD.shape[0]):
        row = []
        for e in range(w_in.shape[0]):
            b_in_e = None if b_in is None else b_in[e]
            y = expert_forward(x_TD[t], w_in[e], w_out[e], activation, b_in_e, None if b_out is None else b_out[e])
            total = y.new_zeros(())
            for d in range(y.shape[0]):
                total = total + torch.log(1.0 + torch.exp(y[d]))
            row.append(total / y.shape[0])
        rows.append(row)
    return rows


def competition_pairs(scores: list[list[Tensor]], k: int) -> Pairs:
    """The K largest responses win (ties to the lower index); gates are the winners' responses over their sum."""
    pairs = []
    for t, row in enumerate(scores):
        chosen = order([float(s) for s in row])[:k]
        total = sum((row[e] for e in chosen), row[0].new_zeros(()))
        pairs += [(t, e, row[e] / total) for e in chosen]
    return pairs


def competition_distill(router_logits: list[list[Tensor]], scores: list[list[Tensor]]) -> Tensor:
    """Mean over tokens and experts of ``(softmax(router)_te - softmax(s)_te)^2``, the competition's side fixed."""
    total = router_logits[0][0].new_zeros(())
    count = 0
    for logits, row in zip(router_logits, scores):
        target = softmax([s.detach() for s in row])
        for p, q in zip(softmax(logits), target):
            total = total + (p - q) ** 2
            count += 1
    return total / count


def chain_of_experts(
    x_TD: Tensor,
    gates: list[Tensor],
    w_in: Tensor,
    w_out: Tensor,
    activation: str,
    k: int,
    inner_residual: bool,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chain-of-Experts token by token: iteration r routes ``h`` by softmax top-k (renormalised) of ``gates[r] h``,
    ``out = sum_chosen gate * expert(h)``, then ``h <- h + out`` (inner residual) or ``h <- out``. Returns ``y``
    (``sum_r out_r`` with the inner residual, the last ``h`` without) and the sum over iterations of the Switch
    balance loss (weight 0.01) of each iteration's routing."""
    from tests.oracles import expert_forward, switch_balance

    h = [x_TD[t] for t in range(x_TD.shape[0])]
    total = [torch.zeros_like(x_TD[t]) for t in range(x_TD.shape[0])]
    balance = x_TD.new_zeros(())
    for gate_ED in gates:
        logits = [matvec(gate_ED, h[t]) for t in range(len(h))]
        pairs = softmax_topk(logits, k, normalize=k > 1)
        probs = torch.stack([torch.stack(softmax(row)) for row in logits])
        balance = balance + 0.01 * switch_balance(probs, [e for _, e, _ in pairs], k)
        outs = [torch.zeros_like(v) for v in h]
        for t, e, g in pairs:
            b_in_e = None if b_in is None else b_in[e]
            outs[t] = outs[t] + g * expert_forward(
                h[t], w_in[e], w_out[e], activation, b_in_e, None if b_out is None else b_out[e]
            )
        for t in range(len(h)):
            total[t] = total[t] + outs[t]
            h[t] = h[t] + outs[t] if inner_residual else outs[t]
    return torch.stack(total if inner_residual else h), balance


def gru_step(x_R: Tensor, h_R: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One GRU step, unit by unit: ``r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)``, ``z`` alike,
    ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``, ``h' = (1 - z) n + z h`` (rows of ``w_ih``/``w_hh``: r, z, n)."""
    width = h_R.shape[0]
    out = []
    for j in range(width):
        pre = [dot(w_ih[g * width + j], x_R) + b_ih[g * width + j] for g in range(3)]
        hid = [dot(w_hh[g * width + j], h_R) + b_hh[g * width + j] for g in range(3)]
        r = 1.0 / (1.0 + torch.exp(-(pre[0] + hid[0])))
        z = 1.0 / (1.0 + torch.exp(-(pre[1] + hid[1])))
        n = torch.tanh(pre[2] + r * hid[2])
        out.append((1.0 - z) * n + z * h_R[j])
    return torch.stack(out)


def recurrent_router_stack(
    x_TD: Tensor,
    keep: list[bool],
    layers: list[dict[str, Tensor]],
    cell: dict[str, Tensor],
    activation: str,
    k: int,
    balance_coef: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """L MoE layers with the layerwise recurrent router (RMoE) and a residual, token by token: layer i projects the
    token, ``x' = proj_i x``; the shared GRU gives ``h_i = GRU(x', h_{i-1})``, ``h_0 = 0``; layer i routes by softmax
    top-k (renormalised for k > 1) of ``gate_i h_i``, adds ``sum_chosen gate * expert_i(x)`` to the token. Tokens
    with ``keep`` False are not routed (their state stays 0 and they pass unchanged). ``layers[i]``: ``proj``,
    ``gate``, ``w_in``, ``w_out``; ``cell``: ``w_ih``, ``w_hh``, ``b_ih``, ``b_hh``. Returns the tokens after the
    last layer and the summed Switch balance losses (each layer's over its kept tokens)."""
    from tests.oracles import expert_forward, switch_balance

    tokens = [x_TD[t] for t in range(x_TD.shape[0])]
    kept = [t for t in range(len(tokens)) if keep[t]]
    width = cell["w_hh"].shape[1]
    h = {t: x_TD.new_zeros(width) for t in kept}
    balance = x_TD.new_zeros(())
    for layer in layers:
        rows, experts, outs = [], [], {}
        for t in kept:
            h[t] = gru_step(torch.stack(matvec(layer["proj"], tokens[t])), h[t], **cell)
            probs = softmax(matvec(layer["gate"], h[t]))
            rows.append(torch.stack(probs))
            chosen = order([float(p.detach()) for p in probs])[:k]
            total = sum((probs[e] for e in chosen), probs[0].new_zeros(()))
            out = torch.zeros_like(tokens[t])
            for e in chosen:
                gate = probs[e] / total if k > 1 else probs[e]
                out = out + gate * expert_forward(tokens[t], layer["w_in"][e], layer["w_out"][e], activation)
            outs[t] = out
            experts += chosen
        if kept:
            balance = balance + balance_coef * switch_balance(torch.stack(rows), experts, k)
        for t in kept:
            tokens[t] = tokens[t] + outs[t]
    return torch.stack(tokens), balance
