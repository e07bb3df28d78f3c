"""The routers of ``moezoo.layers.routers_extra`` against naive oracles from the papers' equations (pairs, gates,
losses and their gradients), the invariants each method promises, state in buffers, batch dependence, and the MoE
layer on every backend."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moezoo.layers import ROUTERS, MoE, check_router_kwargs, get_router, update_router_states
from moezoo.layers.routers_extra import EXTRA_ROUTERS, ExpertRaceRouter, StableMoERouter, TopPRouter
from tests import oracles
from tests import oracles_routers as naive

DIM, E = 6, 4


def _objective(pairs, losses, weight_TE):
    total = torch.zeros((), dtype=torch.float64)
    for t, e, g in pairs:
        total = total + weight_TE[t, e] * g
    return total + sum((v.double() for v in losses.values()), torch.zeros((), dtype=torch.float64))


def check_against_oracle(router, x, oracle, atol=1e-5, experts=None):
    """``oracle(x) -> (pairs, losses)``: the same pairs, gates and losses, and the same gradients of
    ``sum w_te * gate_te + sum losses`` with respect to the input and every router parameter (and, for a router
    that reads the experts, every parameter of ``experts``, which it is then given)."""
    x = x.clone().requires_grad_(True)
    result = router(x) if experts is None else router(x, None, experts=experts)
    got_pairs = list(zip(result.token_idx_N.tolist(), result.expert_idx_N.tolist(), result.gate_N))
    want_pairs, want_losses = oracle(x.double())  # the oracle in float64: the reference, not a second fp32 run
    assert sorted((t, e) for t, e, _ in got_pairs) == sorted((t, e) for t, e, _ in want_pairs)
    want_gate = {(t, e): g for t, e, g in want_pairs}
    for t, e, g in got_pairs:
        assert math.isclose(float(g), float(want_gate[t, e]), abs_tol=atol), (t, e)
    assert set(result.losses) == set(want_losses)
    for name, value in want_losses.items():
        torch.testing.assert_close(result.losses[name], value.to(result.losses[name].dtype), atol=atol, rtol=1e-4)
    weight_TE = torch.randn(x.shape[0], router.num_logits)
    params = [x, *(p for p in router.parameters() if p.requires_grad)]
    names = ["x", *(n for n, p in router.named_parameters() if p.requires_grad)]
    if experts is not None:
        params += list(experts.parameters())
        names += [f"experts.{n}" for n, _ in experts.named_parameters()]
    got = torch.autograd.grad(_objective(got_pairs, result.losses, weight_TE), params, allow_unused=True)
    want = torch.autograd.grad(_objective(want_pairs, want_losses, weight_TE), params, allow_unused=True)
    for name, g, w in zip(names, got, want):
        g = torch.zeros_like(params[names.index(name)]) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w.to(g.dtype), atol=atol, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    return result


def _balance(logits, pairs, k, coef=0.01):
    probs = torch.stack([torch.stack(naive.softmax(row)) for row in logits])
    return coef * oracles.switch_balance(probs, [e for _, e, _ in pairs], k)


# ------------------------------------------------------------------------------------- logits-only top-k variants


def D(t):  # noqa: N802 - the oracles run in float64; gradients flow back to the fp32 parameters
    return t.double()


LOGITS_ORACLES = {
    "xmoe": lambda r, x: naive.xmoe_logits(x, D(r.proj.weight), D(r.gate.weight), D(r.temperature)),
    "hyper": lambda r, x: naive.hyper_logits(x, D(r.hyper_weight), D(r.embedding), r.num_experts),
    "attention": lambda r, x: naive.attention_logits(x, D(r.gate.weight), D(r.key.weight), D(r.value.weight)),
    "mixture_of_routers": lambda r, x: naive.mixture_of_routers_logits(x, D(r.queries.weight), D(r.keys)),
    "gmm": lambda r, x: naive.gmm_logits(x, D(r.proj.weight), D(r.gate.weight), D(r.log_sigma), D(r.mix_logits)),
}


@pytest.mark.parametrize("name", list(LOGITS_ORACLES))
@pytest.mark.parametrize("k", [1, 2])
def test_logits_routers_match_oracle(name, k):
    torch.manual_seed(0)
    router = get_router(name, DIM, E, top_k=k)
    with torch.no_grad():  # move every parameter off its initial value (e.g. GMM's zero log-scales)
        for p in router.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def oracle(x):
        logits = LOGITS_ORACLES[name](router, x)
        pairs = naive.softmax_topk(logits, k, normalize=k > 1)
        return pairs, {"balance": _balance(logits, pairs, k)}

    check_against_oracle(router, torch.randn(9, DIM), oracle)


def test_xmoe_is_scale_invariant_and_bounded_by_its_temperature():
    router = get_router("xmoe", DIM, E, routing_dim=3, temperature=0.5)
    x = torch.randn(20, DIM)
    logits = router.logits(x)
    torch.testing.assert_close(router.logits(3.0 * x), logits)
    assert logits.abs().max() <= 1 / 0.5 + 1e-5
    assert router.temperature.requires_grad  # learnable


def test_hyper_router_trains_only_its_embedding():
    router = get_router("hyper", DIM, E, hyper_dim=5)
    assert [n for n, _ in router.named_parameters()] == ["embedding"]
    assert "hyper_weight" in router.state_dict()  # the fixed hypernetwork is saved with the model
    result = router(torch.randn(7, DIM))
    result.gate_N.sum().backward()
    assert router.embedding.grad is not None and router.embedding.grad.abs().sum() > 0
    assert router.router_weight().shape == (E, DIM)


def test_gmm_softmax_is_the_mixture_posterior():
    router = get_router("gmm", DIM, E, routing_dim=3)
    with torch.no_grad():
        router.log_sigma.copy_(torch.tensor([0.0, 0.5, -0.3, 0.2]))
        router.mix_logits.copy_(torch.tensor([0.1, -1.0, 0.0, 2.0]))
    x = torch.randn(11, DIM)
    z = x @ router.proj.weight.t()
    pi = torch.softmax(router.mix_logits, 0)
    comps = [
        torch.distributions.MultivariateNormal(router.gate.weight[e], torch.exp(2 * router.log_sigma[e]) * torch.eye(3))
        for e in range(E)
    ]
    joint = torch.stack([pi[e] * comps[e].log_prob(z).exp() for e in range(E)], -1)
    torch.testing.assert_close(torch.softmax(router.logits(x), -1), joint / joint.sum(-1, keepdim=True))


def test_one_router_mixture_is_a_query_key_router():
    router = get_router("mixture_of_routers", DIM, E, num_routers=1, head_dim=3)
    x = torch.randn(5, DIM)
    want = (x @ router.queries.weight.t()) @ router.keys[0].t() / math.sqrt(3)
    torch.testing.assert_close(router.logits(x), want)


def test_logits_routers_keep_the_top_k_options():
    """Capacity and null experts compose with the new logits (they are TopKRouter options)."""
    router = get_router("xmoe", DIM, E, top_k=2, capacity_factor=0.5, num_null_experts=1)
    result = router(torch.randn(16, DIM))
    assert result.expert_idx_N.max() < E
    assert torch.bincount(result.expert_idx_N, minlength=E).max() <= router.capacity(16)


# ------------------------------------------------------------------------------------------------------- top-p


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("top_p,max_k", [(0.4, 4), (0.7, 2), (1.0, 4)])
def test_top_p_matches_oracle(top_p, max_k, normalize):
    torch.manual_seed(1)
    router = TopPRouter(DIM, E, top_k=max_k, top_p=top_p, normalize=normalize, entropy_coef=0.1)

    def oracle(x):
        logits = [list(row) for row in x @ D(router.gate.weight).t()]
        probs = [naive.softmax(row) for row in logits]
        pairs = naive.top_p_pairs(probs, top_p, max_k, normalize)
        # balance: f_e over the pairs actually made (k = pairs per token)
        balance = _balance(logits, pairs, len(pairs) / len(logits))
        return pairs, {"balance": balance, "entropy": 0.1 * naive.entropy(probs)}

    check_against_oracle(router, 2 * torch.randn(10, DIM), oracle)


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 30),
    num_experts=st.integers(1, 8),
    top_p=st.floats(0.05, 1.0),
    scale=st.floats(0.1, 5.0),
    data=st.data(),
)
def test_top_p_chosen_set_reaches_p_and_is_minimal(num_tokens, num_experts, top_p, scale, data):
    max_k = data.draw(st.integers(1, num_experts))
    router = TopPRouter(5, num_experts, top_k=max_k, top_p=top_p)
    x = scale * torch.randn(num_tokens, 5)
    result = router(x)
    probs = result.probs_TE
    for t in range(num_tokens):
        chosen = result.expert_idx_N[result.token_idx_N == t]
        assert 1 <= chosen.numel() <= max_k
        mass = float(probs[t, chosen].sum())
        assert mass >= top_p - 1e-6 or chosen.numel() == max_k  # reaches p unless capped
        assert mass - float(probs[t, chosen].min()) < top_p  # minimal: without its smallest it falls short
        others = torch.ones(num_experts, dtype=torch.bool)
        others[chosen] = False
        if others.any():  # the chosen are the most probable
            assert float(probs[t, chosen].min()) >= float(probs[t, others].max())


# ------------------------------------------------------------------------------------------ expert prototyping


@pytest.mark.parametrize("k", [1, 2, 4])
def test_prototype_matches_oracle_and_takes_one_expert_per_group(k):
    router = get_router("prototype", DIM, 8, top_k=k)

    def oracle(x):
        logits = [list(row) for row in x @ D(router.gate.weight).t()]
        pairs = naive.prototype_pairs(logits, k)
        group = 8 // k
        probs = torch.stack(
            [
                torch.cat([torch.stack(naive.softmax(row[g * group : (g + 1) * group])) for g in range(k)]) / k
                for row in logits
            ]
        )
        return pairs, {"balance": 0.01 * oracles.switch_balance(probs, [e for _, e, _ in pairs], k)}

    result = check_against_oracle(router, torch.randn(12, DIM), oracle)
    groups = (result.expert_idx_N // (8 // k)).reshape(12, k)
    assert torch.equal(groups, torch.arange(k).expand(12, k))  # one expert of each prototype per token
    with pytest.raises(ValueError, match="num_experts=6 must be a multiple of top_k=4"):
        get_router("prototype", DIM, 6, top_k=4)


# ------------------------------------------------------------------------------------------------- Expert Race


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_race_matches_oracle_and_uses_exactly_tk_pairs(score):
    router = ExpertRaceRouter(DIM, E, top_k=2, score=score)

    def oracle(x):
        logits = [list(row) for row in x @ D(router.gate.weight).t()]
        scores = [naive.softmax(row) if score == "softmax" else [torch.sigmoid(v) for v in row] for row in logits]
        pairs = naive.expert_race_pairs(scores, 2)
        return pairs, {"balance": _balance(logits, pairs, 2)}

    result = check_against_oracle(router.train(), 2 * torch.randn(10, DIM), oracle)
    assert result.token_idx_N.numel() == 20
    chosen = torch.zeros(10, E, dtype=torch.bool)
    chosen[result.token_idx_N, result.expert_idx_N] = True
    scores = result.probs_TE if score == "softmax" else None
    if scores is not None:  # every winner beats every loser
        assert float(scores[chosen].min()) >= float(scores[~chosen].max())


def test_expert_race_threshold_is_an_ema_of_the_last_winner_and_makes_eval_batch_independent():
    router = ExpertRaceRouter(DIM, E, top_k=1, eval_threshold=True, threshold_momentum=0.5)
    assert float(router.threshold) == pytest.approx(1 / E)
    x = torch.randn(16, DIM)
    router.train()(x)
    last = torch.softmax(x @ router.gate.weight.t(), -1).flatten().sort(descending=True).values[15]
    router.update_state()
    assert float(router.threshold) == pytest.approx(0.5 * (1 / E) + 0.5 * float(last))
    assert float(router.pending_threshold.sum()) == 0.0
    router.eval()
    alone = router(x[:3])
    together = router(x)
    first = together.token_idx_N < 3
    assert torch.equal(alone.expert_idx_N, together.expert_idx_N[first])
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    assert torch.equal(together.gate_N.detach(), probs[probs >= router.threshold])


def test_expert_race_is_batch_dependent_in_training():
    torch.manual_seed(0)
    router = ExpertRaceRouter(DIM, E, top_k=1).train()
    x = torch.randn(8, DIM)
    x_other = torch.cat([x[:2], 5 * torch.randn(6, DIM)])
    first = router(x)
    second = router(x_other)
    pairs = lambda r: sorted((t, e) for t, e in zip(r.token_idx_N.tolist(), r.expert_idx_N.tolist()) if t < 2)  # noqa: E731
    counts = [len(pairs(first)), len(pairs(second))]
    assert counts[0] != counts[1] or pairs(first) != pairs(second)


# -------------------------------------------------------------------------------------------------------- VQ


@pytest.mark.parametrize("k", [1, 2])
def test_vq_matches_oracle(k):
    router = get_router("vq", DIM, E, top_k=k, commitment=0.3)

    def oracle(x):
        pairs, loss = naive.vq(x, D(router.gate.weight), k, 0.3)
        return pairs, {"vq": loss}

    result = check_against_oracle(router, torch.randn(9, DIM), oracle)
    sums = torch.zeros(9).index_add_(0, result.token_idx_N, result.gate_N)
    torch.testing.assert_close(sums, torch.ones(9))


# ------------------------------------------------------------------------------------------------- StableMoE


@pytest.mark.parametrize("k", [1, 2])
def test_stablemoe_stages_match_oracle(k):
    router = StableMoERouter(DIM, E, top_k=k, stage1_steps=2, distill_coef=0.5, balance_coef=0.0).train()
    for stage in (1, 1, 2, 2):
        assert router.stage == stage

        def oracle(x, stage=stage):
            pairs, nll = naive.stablemoe(x, D(router.gate.weight), D(router.distilled.weight), k, stage)
            return pairs, {"distill": 0.5 * nll * (1.0 if stage == 1 else 0.0)}

        check_against_oracle(router, torch.randn(9, DIM), oracle)
        update_router_states(router)


def test_stablemoe_stage_two_is_frozen_and_restored_from_the_checkpoint():
    router = StableMoERouter(DIM, E, top_k=1, stage1_steps=1).train()
    router(torch.randn(4, DIM))
    router.update_state()
    assert router.stage == 2
    x = torch.randn(10, DIM, requires_grad=True)
    result = router(x)
    sum(result.losses.values(), result.gate_N.sum()).backward()
    assert router.distilled.weight.grad is None or router.distilled.weight.grad.abs().sum() == 0  # frozen
    assert torch.equal(result.expert_idx_N, (x.detach() @ router.distilled.weight.t()).argmax(-1))
    fresh = StableMoERouter(DIM, E, top_k=1, stage1_steps=1)
    assert fresh.stage == 1
    fresh.load_state_dict(router.state_dict())
    assert fresh.stage == 2


# ------------------------------------------------------------------------------------------ common properties


def _trained_router(name):
    torch.manual_seed(3)
    router = get_router(name, DIM, E, top_k=2 if name != "vq" else 1).train()
    for _ in range(2):
        result = router(torch.randn(12, DIM))
        objective = sum(result.losses.values(), result.gate_N.sum())
        if objective.requires_grad:  # THOR has nothing to train
            objective.backward()
        router.update_state()
    return router


@pytest.mark.parametrize("name", list(EXTRA_ROUTERS))
def test_state_round_trips_through_the_state_dict(name):
    router = _trained_router(name).eval()
    fresh = get_router(name, DIM, E, top_k=router.top_k)
    fresh.load_state_dict(router.state_dict())
    fresh.eval()
    for (n, b), (_, fb) in zip(router.named_buffers(), fresh.named_buffers()):
        assert torch.equal(b, fb), n
    x = torch.randn(8, DIM)
    torch.manual_seed(4)
    a = router(x)
    torch.manual_seed(4)
    b = fresh(x)
    assert torch.equal(a.expert_idx_N, b.expert_idx_N) and torch.equal(a.gate_N, b.gate_N)


@pytest.mark.parametrize("name", list(EXTRA_ROUTERS))
def test_batch_dependence_is_declared_and_true_to_eval_routing(name):
    router_class = ROUTERS[name]
    assert "batch_dependent" in vars(router_class) and isinstance(router_class.batch_dependent, bool)
    if router_class.batch_dependent or name == "thor":
        return  # Expert Race and Rectify: shown above; THOR's choice reads no input, only fresh random draws
    router = _trained_router(name).eval()
    x = torch.randn(10, DIM)
    alone, together = router(x[:3]), router(x)
    first = together.token_idx_N < 3
    assert torch.equal(alone.token_idx_N, together.token_idx_N[first])
    assert torch.equal(alone.expert_idx_N, together.expert_idx_N[first])
    torch.testing.assert_close(alone.gate_N, together.gate_N[first])


@pytest.mark.parametrize("name", list(EXTRA_ROUTERS))
def test_defaults_are_valid_and_bad_options_name_the_argument(name):
    check_router_kwargs(name, {}, num_experts=4)
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts"):  # bilevel: / num_groups
        check_router_kwargs(name, {"top_k": 5}, num_experts=4)
    with pytest.raises(TypeError, match=f"router='{name}' does not accept bogus"):
        check_router_kwargs(name, {"bogus": 1})


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("top_p", {"top_p": 1.5}, "top_p must be a finite number in \\(0, 1\\], got 1.5"),
        ("top_p", {"top_p": 0.0}, "top_p must be a finite number > 0"),
        ("xmoe", {"temperature": 0.0}, "temperature must be a finite number > 0"),
        ("xmoe", {"routing_dim": 0}, "routing_dim must be an integer >= 1"),
        ("hyper", {"hyper_dim": 0}, "hyper_dim must be an integer >= 1"),
        ("mixture_of_routers", {"num_routers": 0}, "num_routers must be an integer >= 1"),
        ("expert_race", {"score": "relu"}, "score must be one of 'softmax', 'sigmoid'; got 'relu'"),
        ("expert_race", {"threshold_momentum": 2.0}, "threshold_momentum must be in \\(0, 1\\], got 2.0"),
        ("vq", {"commitment": -1.0}, "commitment must be a finite number >= 0"),
        ("stablemoe", {"stage1_steps": -1}, "stage1_steps must be an integer >= 0"),
        ("moec", {"cluster_size": 3}, "cluster_size=3 must divide num_experts=4"),
        ("moec", {"cluster_size": 0}, "cluster_size must be an integer >= 1, got 0"),
        ("moec", {"drop_rate": 1.0}, "drop_rate must be a finite number in \\[0, 1\\), got 1.0"),
        ("moec", {"drop_rate": -0.1}, "drop_rate must be a finite number >= 0, got -0.1"),
        ("moec", {"drop_rate": 0.25}, "drop_rate=0.25 drops no expert of a cluster of cluster_size=2"),
        ("moec", {"variance_coef": -1.0}, "variance_coef must be a finite number >= 0"),
    ],
)
def test_bad_option_values(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_router_kwargs(name, kwargs, num_experts=4)
    with pytest.raises(ValueError, match=match):
        get_router(name, DIM, 4, **kwargs)


# ------------------------------------------------------------------------------------------ through the layer


@pytest.mark.parametrize("name", list(EXTRA_ROUTERS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_moe_layer_with_every_new_router_matches_the_oracle(name, backend):
    torch.manual_seed(1)
    top_k = 1 if name == "vq" else 2
    moe = MoE(12, 10, num_experts=4, top_k=top_k, router=name, activation="swiglu", backend=backend).double().train()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 7, 12, dtype=torch.float64)
    captured = {}
    original_forward = moe.router.forward

    def capture(*args, **kw):
        captured["routing"] = original_forward(*args, **kw)
        return captured["routing"]

    moe.router.forward = capture
    y, aux = moe(x)
    r = captured["routing"]
    x_TD = x.reshape(-1, 12)
    want_y = oracles.expert_ffn(
        x_TD, r.token_idx_N, r.expert_idx_N, r.gate_N, moe.experts.w_in, moe.experts.w_out, "swiglu"
    )
    torch.testing.assert_close(y, want_y.reshape(x.shape), atol=1e-9, rtol=1e-8)
    params = [x, moe.experts.w_in, moe.experts.w_out]
    got = torch.autograd.grad((y * weight).sum(), params, retain_graph=True)
    want = torch.autograd.grad((want_y.reshape(x.shape) * weight).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8)
    assert aux.tokens_per_expert_E.sum() == r.expert_idx_N.numel()
    assert torch.isfinite(aux.aux_loss)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(EXTRA_ROUTERS))
def test_triton_backend_takes_every_new_router(name):
    """Under the interpreter (or on a GPU): the Triton path consumes the same pairs as the fused CPU path."""
    from tests.kernels.common import DEVICE

    if DEVICE is None:
        pytest.skip("needs triton with a CUDA device or TRITON_INTERPRET=1")
    torch.manual_seed(2)
    moe = MoE(16, 24, num_experts=4, top_k=1 if name == "vq" else 2, router=name, backend="triton").to(DEVICE).eval()
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    torch.manual_seed(3)  # the same draws for THOR
    y, _ = moe(x)
    moe.backend = "torch"
    torch.manual_seed(3)
    y_ref, _ = moe(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ GW-MoE


@pytest.mark.parametrize("training", [True, False])
def test_gw_broadcasts_uncertain_tokens_in_training_only(training):
    router = get_router("gw", DIM, E, top_k=2, uncertainty=0.9)
    router.train(training)
    x = torch.randn(12, DIM) * torch.linspace(0.05, 3.0, 12).unsqueeze(-1)  # from uncertain to confident tokens

    def oracle(x):
        logits = [list(row) for row in x @ D(router.gate.weight).t()]
        pairs = naive.gw_pairs(logits, 2, True, 0.9, training)
        return pairs, {"balance": _balance(logits, naive.softmax_topk(logits, 2, True), 2)}

    result = check_against_oracle(router, x, oracle)
    per_token = torch.bincount(result.token_idx_N, minlength=12)
    if training:
        assert (per_token == E).any() and (per_token == 2).any()  # both kinds present in this batch
    else:
        assert torch.equal(per_token, torch.full((12,), 2))  # no extra inference cost


# ------------------------------------------------------------------------------------------------------- SMILE


@pytest.mark.parametrize("groups,k", [(2, 1), (2, 2), (4, 1)])
def test_bilevel_matches_oracle(groups, k):
    router = get_router("bilevel", DIM, 8, top_k=k, num_groups=groups, z_loss_coef=1e-3)

    def oracle(x):
        logits = [list(row) for row in x @ D(router.gate.weight).t()]
        group_logits = [list(row) for row in x @ D(router.group_gate.weight).t()]
        pairs = naive.bilevel_pairs(logits, group_logits, k)
        size = 8 // groups
        group_probs = torch.stack([torch.stack(naive.softmax(row)) for row in group_logits])
        inner = torch.stack(
            [
                torch.cat([torch.stack(naive.softmax(r[g * size : (g + 1) * size])) for g in range(groups)])
                for r in logits
            ]
        )
        chosen_groups = [e // size for t, e, _ in pairs][::k]
        balance = oracles.switch_balance(group_probs, chosen_groups, 1)
        balance = balance + oracles.switch_balance(inner / groups, [e for _, e, _ in pairs], k)
        z = torch.logsumexp(x @ D(router.gate.weight).t(), -1).square().mean()
        z = z + torch.logsumexp(x @ D(router.group_gate.weight).t(), -1).square().mean()
        return pairs, {"balance": 0.01 * balance, "z_loss": 1e-3 * z}

    result = check_against_oracle(router, torch.randn(10, DIM), oracle)
    groups_of_token = (result.expert_idx_N // (8 // groups)).reshape(10, k)
    assert (groups_of_token == groups_of_token[:, :1]).all()  # all of a token's experts in its one group
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts / num_groups=2\\]"):
        get_router("bilevel", DIM, 8, top_k=3, num_groups=4)
    with pytest.raises(ValueError, match="num_experts=6 must be a multiple of num_groups=4"):
        get_router("bilevel", DIM, 6, num_groups=4)


# ---------------------------------------------------------------------------------------------- Rectify-Router


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_rectify_fills_vacant_slots_with_the_best_remaining_tokens(capacity_factor):
    num_tokens, k = 12, 2
    router = get_router("rectify", DIM, E, top_k=k, capacity_factor=capacity_factor, balance_coef=0.0)
    capacity = math.ceil(capacity_factor * num_tokens * k / E)

    def oracle(x):
        logits = [list(row) for row in x @ D(router.gate.weight).t()]
        full = naive.softmax_topk(logits, k, normalize=True)  # token-major, choice-minor
        priorities = [(i % k) * num_tokens + i // k for i in range(len(full))]
        keep = oracles.capacity_keep([e for _, e, _ in full], priorities, capacity)
        kept = [p for p, kk in zip(full, keep) if kk]
        return naive.fill_in(kept, [naive.softmax(row) for row in logits], capacity), {}

    x = torch.randn(num_tokens, DIM) + 1.5 * torch.randn(1, DIM)  # skewed: some experts overflow, some are vacant
    result = check_against_oracle(router, x, oracle)
    load = torch.bincount(result.expert_idx_N, minlength=E)
    assert torch.equal(load, torch.full((E,), capacity)) or load.sum() == num_tokens * E  # no slot left vacant
    assert len(set(zip(result.token_idx_N.tolist(), result.expert_idx_N.tolist()))) == result.token_idx_N.numel()


# -------------------------------------------------------------------------------------------------------- THOR


def test_thor_draws_distinct_uniform_experts_with_equal_gates():
    from moezoo.layers.routers_extra import thor_consistency_loss

    router = get_router("thor", DIM, E, top_k=2)
    assert list(router.parameters()) == []
    result = router.eval()(torch.randn(4000, DIM))  # random at inference too
    experts = result.expert_idx_N.reshape(4000, 2)
    assert (experts[:, 0] != experts[:, 1]).all()
    share = torch.bincount(result.expert_idx_N, minlength=E).float() / 8000
    assert (share - 1 / E).abs().max() < 0.03  # 4 sigma of a fair draw is about 0.02
    torch.testing.assert_close(result.gate_N, torch.full((8000,), 0.5))
    torch.manual_seed(5)
    a = router(torch.randn(6, DIM))
    torch.manual_seed(5)
    b = router(torch.randn(6, DIM))
    assert torch.equal(a.expert_idx_N, b.expert_idx_N)  # reproducible from the seed
    la = torch.randn(3, 5, 7, requires_grad=True)
    lb = torch.randn(3, 5, 7, requires_grad=True)
    got = thor_consistency_loss(la, lb)
    want = naive.symmetric_kl(la.double(), lb.double())
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    g = torch.autograd.grad(got, [la, lb])
    w = torch.autograd.grad(want, [la, lb])
    for gg, ww in zip(g, w):
        torch.testing.assert_close(gg, ww.float(), atol=1e-6, rtol=1e-4)
    assert float(thor_consistency_loss(la, la)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="logits_a and logits_b must have the same shape"):
        thor_consistency_loss(la, lb[:1])


# -------------------------------------------------------------------------------------------------------- MoEC


def _moec_router(k, cluster_size, drop_rate, training, num_experts=8):
    torch.manual_seed(6)
    router = get_router(
        "moec", DIM, num_experts, top_k=k, cluster_size=cluster_size, drop_rate=drop_rate, variance_coef=0.5
    )
    return router.train(training)


@pytest.mark.parametrize(
    "k,cluster_size,drop_rate,training",
    [(1, 2, 0.5, True), (2, 2, 0.5, True), (2, 4, 0.5, True), (3, 4, 0.75, True), (2, 4, 0.5, False),
     (2, 2, 0.0, True), (1, 8, 0.5, True)],
)  # fmt: skip
def test_moec_matches_oracle(k, cluster_size, drop_rate, training):
    """Pairs, gates, losses and gradients (through the gates and the variance loss) against the float64 loop; in
    training the oracle draws the same dropped experts from the same seed."""
    router = _moec_router(k, cluster_size, drop_rate, training)
    num_dropped = math.floor(drop_rate * cluster_size)
    torch.manual_seed(11)
    draw = torch.rand(8 // cluster_size, cluster_size)
    dropped = naive.moec_dropped(draw, num_dropped) if training else set()
    assert len(dropped) == (8 // cluster_size) * num_dropped if training else not dropped

    def oracle(x):
        logits = [list(row) for row in x @ D(router.gate.weight).t()]
        pairs, variance = naive.moec(logits, k, cluster_size, dropped, normalize=k > 1)
        return pairs, {"balance": _balance(logits, pairs, k), "cluster_variance": 0.5 * variance}

    x = torch.randn(16, DIM) * 2.0
    torch.manual_seed(11)  # the router's forward draws the same dropout as ``draw`` above
    result = check_against_oracle(router, x, oracle)
    if training and num_dropped:
        assert not set(result.expert_idx_N.tolist()) & dropped
    # the variance loss's own gradient, apart from the gates
    w = router.gate.weight
    torch.manual_seed(11)
    (got,) = torch.autograd.grad(router(x).losses["cluster_variance"], w)
    _, want_losses = oracle(x.double())
    (want,) = torch.autograd.grad(want_losses["cluster_variance"], w)
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-4)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("k,cluster_size", [(1, 2), (2, 2), (2, 4), (3, 4)])
def test_moec_dropout_reroutes_only_within_the_cluster(k, cluster_size):
    router = _moec_router(k, cluster_size, 0.5, training=True)
    x = torch.randn(300, DIM) * 2.0
    plain = router.eval()(x)  # the token's own choices: evaluation has no dropout
    router.train()
    moved = removed = 0
    for seed in range(5):
        torch.manual_seed(seed)
        result = router(x)
        for t in range(300):
            mine = result.expert_idx_N[result.token_idx_N == t].tolist()
            own = plain.expert_idx_N[plain.token_idx_N == t].tolist()
            assert len(set(mine)) == len(mine) and 1 <= len(mine) <= k  # distinct experts, at least one
            clusters = sorted(e // cluster_size for e in mine)
            own_clusters = [e // cluster_size for e in own]
            for c in set(clusters):  # never outside the clusters of its own choices, never more often
                assert clusters.count(c) <= own_clusters.count(c)
            moved += len(set(mine) - set(own))
            removed += k - len(mine)
        counts = torch.bincount(result.expert_idx_N // cluster_size, minlength=8 // cluster_size)
        assert counts.sum() == result.expert_idx_N.numel()
    assert moved > 0  # rerouting happened
    if cluster_size - cluster_size // 2 >= k:
        assert removed == 0  # enough survivors per cluster: every token keeps k experts (fmnist_vit_moec.yaml)
    elif cluster_size == 2 and k == 2:
        assert removed > 0  # a token with both choices in one cluster of 2 loses the dropped one


def test_moec_drops_the_same_number_in_every_cluster_at_rate():
    router = get_router("moec", DIM, 12, cluster_size=4, drop_rate=0.5)
    alive = torch.stack([router.draw_alive(torch.device("cpu")) for _ in range(2000)])
    assert (alive.reshape(2000, 3, 4).sum(-1) == 2).all()  # exactly floor(0.5 * 4) dropped per cluster
    assert (alive.float().mean(0) - 0.5).abs().max() < 0.05  # each expert dropped at the rate (4 sigma ~ 0.045)


def test_moec_evaluation_has_no_dropout_and_is_deterministic():
    router = _moec_router(2, 4, 0.75, training=False)
    x = torch.randn(40, DIM)
    torch.manual_seed(0)
    a = router(x)
    torch.manual_seed(1)
    b = router(x)
    assert torch.equal(a.expert_idx_N, b.expert_idx_N) and torch.equal(a.gate_N, b.gate_N)
    want = router.logits(x).softmax(-1).topk(2, dim=-1).indices.reshape(-1)
    assert torch.equal(a.expert_idx_N, want) and a.expert_idx_N.numel() == 80
    router.train()
    torch.manual_seed(0)
    c = router(x)
    assert not torch.equal(c.expert_idx_N, a.expert_idx_N)  # dropout in training changes the routing


def test_moec_variance_loss_is_zero_for_equal_experts_within_each_cluster():
    router = get_router("moec", DIM, 8, cluster_size=4)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(2, DIM).repeat_interleave(4, dim=0))  # clusters of identical rows
    losses = router.eval()(torch.randn(9, DIM)).losses
    assert float(losses["cluster_variance"]) == pytest.approx(0.0, abs=1e-12)
    assert float(router(torch.randn(0, DIM)).losses["cluster_variance"]) == 0.0  # no tokens: 0, not NaN


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("top_p", {"normalize": "yes"}, "normalize must be True or False, got 'yes'"),
        ("expert_race", {"eval_threshold": 1}, "eval_threshold must be True or False, got 1"),
        ("top_p", {"top_p": "0.5"}, "top_p must be a finite number > 0"),
        ("stablemoe", {"stage1_steps": 10.0}, "stage1_steps must be an integer >= 0"),
        ("gw", {"uncertainty": None}, "uncertainty must be a finite number >= 0"),
        ("moec", {"cluster_size": 2.0}, "cluster_size must be an integer >= 1, got 2.0"),
        ("moec", {"drop_rate": "0.5"}, "drop_rate must be a finite number >= 0"),
    ],
)
def test_bad_option_types(name, kwargs, match):
    with pytest.raises(TypeError, match=match):
        check_router_kwargs(name, kwargs, num_experts=4)
