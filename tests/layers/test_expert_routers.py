"""The routers that read their layer's expert weights (``moezoo.layers.expert_routers``: Autonomy-of-Experts,
the ERC loss and CompeteSMoE) against float64 loop oracles from the papers' equations (pairs, gates, losses and the
gradients to the input, the router and the experts), their invariants, state, batch dependence, the layer hook
(``MoE.route``) on every backend, and the clear errors where they cannot run."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import ROUTERS, GroupedExperts, MoE, check_router_kwargs, get_router
from moezoo.layers.expert_routers import EXPERT_ROUTERS, competition_step, erc_noise_bound
from moezoo.parallel import ExpertParallelGroups, shard_experts
from tests import oracles
from tests import oracles_routers as naive
from tests.layers.test_routers_extra import check_against_oracle

DIM, E, F = 6, 4, 5
READERS = [name for name, cls in EXPERT_ROUTERS.items() if cls.reads_experts]  # SMEAR merges, reads nothing
LAYER_KWARGS = {"compete": {"compete_prob": 1.0}}  # through the layer: a competition step (the router's is top-k)


def test_the_module_registers_aoe_erc_compete_and_smear():
    assert READERS == ["aoe", "erc", "compete"] and EXPERT_ROUTERS["smear"].kind == "merge"
    assert all(ROUTERS[name] is cls for name, cls in EXPERT_ROUTERS.items())


def _experts(activation: str, bias: bool) -> GroupedExperts:
    torch.manual_seed(10)
    return GroupedExperts(E, DIM, F, activation, bias)


def _w_g(experts: GroupedExperts):
    b_in = None if experts.b_in is None else experts.b_in.double()
    return naive.gate_weight(experts.w_in.double(), b_in, F)


def _balance(probs_rows, pairs, k, coef=0.01):
    probs = torch.stack([torch.stack(row) for row in probs_rows])
    return coef * oracles.switch_balance(probs, [e for _, e, _ in pairs], k)


# ---------------------------------------------------------------------------------------------- Autonomy-of-Experts


@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", True)])
@pytest.mark.parametrize("k", [1, 2])
def test_autonomy_matches_the_oracle_with_gradients_into_the_experts(activation, bias, k):
    experts = _experts(activation, bias)
    router = get_router("aoe", DIM, E, top_k=k, z_loss_coef=1e-2)

    def oracle(x):
        w, b = _w_g(experts)
        norms = naive.autonomy_norms(x, w, b)
        pairs = naive.softmax_topk(norms, k, normalize=k > 1)
        probs = [naive.softmax(row) for row in norms]
        z = sum((torch.logsumexp(torch.stack(row), 0) ** 2 for row in norms), torch.zeros((), dtype=torch.float64))
        return pairs, {"balance": _balance(probs, pairs, k), "z_loss": 1e-2 * z / len(norms)}

    check_against_oracle(router, torch.randn(9, DIM), oracle, experts=experts)
    assert list(router.parameters()) == []  # no router: the experts decide


def test_autonomy_chooses_the_experts_with_the_largest_activation_norms():
    """The invariant: every chosen expert's activation norm is >= every unchosen one's, and scaling one expert's
    ``W_g`` up makes it win every token (its norm grows, the others' do not)."""
    experts = _experts("swiglu", False)
    router = get_router("aoe", DIM, E, top_k=2)
    x = torch.randn(30, DIM)
    result = router(x, None, experts=experts)
    w_g, _ = experts.gate_projection()
    norms = torch.einsum("td,edf->tef", x, w_g).norm(dim=-1)
    chosen = torch.zeros(30, E, dtype=torch.bool)
    chosen[result.token_idx_N, result.expert_idx_N] = True
    assert (chosen.sum(-1) == 2).all()
    assert (
        norms.masked_fill(~chosen, float("inf")).min(-1).values >= norms.masked_fill(chosen, -1).max(-1).values
    ).all()
    with torch.no_grad():
        experts.w_in[2, :, :F] *= 50.0  # only the gate half: the up half does not decide
    assert (router(x, None, experts=experts).expert_idx_N.view(30, 2)[:, 0] == 2).all()


# ----------------------------------------------------------------------------------------------------------- ERC


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False)])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_erc_loss_matches_the_oracle_with_gradients_into_router_and_experts(activation, bias, training, alpha):
    experts = _experts(activation, bias)
    torch.manual_seed(11)
    router = get_router("erc", DIM, E, top_k=2, alpha=alpha, erc_coef=0.5).train(training)
    with torch.no_grad():  # a router with real coupling violations to penalise
        router.gate.weight.mul_(3.0)
    seed = 5

    def oracle(x):
        logits = [list(row) for row in x @ router.gate.weight.double().t()]
        pairs = naive.softmax_topk(logits, 2, normalize=True)
        probs = [naive.softmax(row) for row in logits]
        r = router.gate.weight.double()
        noise = None
        if training:
            torch.manual_seed(seed)
            noise = naive.erc_noise(r.detach(), torch.rand(E, DIM).double())
        w, b = _w_g(experts)
        return pairs, {"balance": _balance(probs, pairs, 2), "erc": 0.5 * naive.erc(r, noise, w, b, alpha)}

    x = torch.randn(8, DIM)
    torch.manual_seed(seed)  # the router's one random draw (the proxies' noise) is the oracle's
    result = check_against_oracle(router, x, oracle, experts=experts)
    assert float(result.losses["erc"]) > 0


def test_erc_noise_keeps_every_proxy_token_nearest_its_own_router_row():
    """The paper's bound: with ``|delta - 1| <= eps_i`` the perturbed row i stays nearer R_i than any other row."""
    torch.manual_seed(0)
    r = torch.randn(6, DIM)
    eps = erc_noise_bound(r)
    assert (eps > 0).all() and (eps <= 1).all()
    for _ in range(200):
        u = torch.rand(6, DIM)
        proxies = r * (1 + eps.unsqueeze(-1) * (2 * u - 1))
        assert torch.equal(torch.cdist(proxies, r).argmin(-1), torch.arange(6))
    assert erc_noise_bound(r[:1]).item() == 0.0  # one expert: nothing to keep apart


def test_erc_loss_is_zero_when_experts_and_routers_are_coupled():
    """Block-diagonal coupling (expert e reacts only to the direction of router row e) satisfies both constraints."""
    router = get_router("erc", 4, 4, top_k=1).eval()
    experts = GroupedExperts(4, 4, 3, "relu")
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
        experts.w_in.zero_()
        for e in range(4):
            experts.w_in[e, e, :] = 1.0
    result = router(torch.randn(5, 4), None, experts=experts)
    assert result.losses["erc"].item() == 0.0
    with torch.no_grad():
        experts.w_in[0, 1, :] = 2.0  # expert 0 now reacts to proxy 1 more than expert 1 does
    assert router(torch.randn(5, 4), None, experts=experts).losses["erc"].item() > 0


def test_erc_routing_is_top_k_and_null_experts_have_no_proxy():
    torch.manual_seed(1)
    erc = get_router("erc", DIM, E, top_k=2, num_null_experts=1).eval()
    topk = get_router("topk", DIM, E, top_k=2, num_null_experts=1).eval()
    topk.load_state_dict(erc.state_dict())
    x = torch.randn(12, DIM)
    a, b = erc(x, None, experts=_experts("gelu", False)), topk(x)
    assert torch.equal(a.token_idx_N, b.token_idx_N) and torch.equal(a.expert_idx_N, b.expert_idx_N)
    torch.testing.assert_close(a.gate_N, b.gate_N)
    assert set(a.losses) == set(b.losses) | {"erc"}


# --------------------------------------------------------------------------------------------------- CompeteSMoE


def _router_logits(router, x):
    return [[naive.dot(x[t], router.gate.weight[e].double()) for e in range(E)] for t in range(x.shape[0])]


@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", True)])
@pytest.mark.parametrize("k", [1, 2])
def test_compete_competition_step_matches_the_oracle_with_gradients_into_router_and_experts(activation, bias, k):
    """A competition step: every expert's response ``mean softplus(y_e(x))`` decides, the winners' gates are their
    responses over their sum (gradients into every expert parameter), the balance loss acts on ``softmax(s)`` and
    the router learns ``softmax(s)`` by the distillation MSE (gradient into the router only)."""
    experts = _experts(activation, bias)
    torch.manual_seed(12)
    router = get_router("compete", DIM, E, top_k=k, compete_prob=1.0, distill_coef=0.5, z_loss_coef=1e-2).train()
    assert router.competes

    def oracle(x):
        ex = experts
        biases = (None if b is None else b.double() for b in (ex.b_in, ex.b_out))
        scores = naive.competition_scores(x, ex.w_in.double(), ex.w_out.double(), activation, *biases)
        pairs = naive.competition_pairs(scores, k)
        logits = _router_logits(router, x)
        z = sum((torch.logsumexp(torch.stack(row), 0) ** 2 for row in logits), torch.zeros((), dtype=torch.float64))
        losses = {
            "balance": _balance([naive.softmax(row) for row in scores], pairs, k),
            "distill": 0.5 * naive.competition_distill(logits, scores),
            "z_loss": 1e-2 * z / len(logits),
        }
        return pairs, losses

    result = check_against_oracle(router, torch.randn(9, DIM), oracle, experts=experts)
    assert float(result.losses["distill"]) > 0


@pytest.mark.parametrize("training", [True, False])
def test_compete_router_step_is_softmax_top_k_of_the_router(training):
    """Every other step (and evaluation): the router decides, as top-k with renormalised gates; ``distill`` is
    reported as 0 in training (so the logged loss exists on every step) and absent at evaluation."""
    experts = _experts("gelu", True)
    torch.manual_seed(13)
    router = get_router("compete", DIM, E, top_k=2, compete_prob=0.0 if training else 1.0).train(training)
    assert router.competes is not training  # evaluation never competes, whatever the schedule says

    def oracle(x):
        logits = _router_logits(router, x)
        pairs = naive.softmax_topk(logits, 2, normalize=True)
        losses = {"balance": _balance([naive.softmax(row) for row in logits], pairs, 2)}
        if training:
            losses["distill"] = torch.zeros((), dtype=torch.float64)
        return pairs, losses

    check_against_oracle(router, torch.randn(7, DIM), oracle, experts=experts)


def test_compete_winners_have_the_largest_responses():
    """The invariant: every winner's response is >= every loser's; raising one expert's output bias makes it win
    every token (its softplus mean grows, the others' do not)."""
    experts = _experts("swiglu", True)
    router = get_router("compete", DIM, E, top_k=2, compete_prob=1.0).train()
    x = torch.randn(30, DIM)
    result = router(x, None, experts=experts)
    y_ETD = torch.stack([experts.forward_dense(x.unsqueeze(0).expand(E, 30, DIM))[e] for e in range(E)])
    scores = torch.nn.functional.softplus(y_ETD).mean(-1).t()
    chosen = torch.zeros(30, E, dtype=torch.bool)
    chosen[result.token_idx_N, result.expert_idx_N] = True
    assert (chosen.sum(-1) == 2).all()
    assert (
        scores.masked_fill(~chosen, float("inf")).min(-1).values >= scores.masked_fill(chosen, -1).max(-1).values
    ).all()
    torch.testing.assert_close(result.gate_N.view(30, 2).sum(-1), torch.ones(30))
    with torch.no_grad():
        experts.b_out[2] += 10.0
    assert (router(x, None, experts=experts).expert_idx_N.view(30, 2)[:, 0] == 2).all()


def test_compete_schedule_warmup_seed_and_resume():
    """Competition steps: a ``compete_prob`` fraction after ``warmup_steps``, a function of ``(seed, step)`` only;
    ``update_state`` advances the step in training (not at evaluation) and a restored state dict resumes the draws."""
    draws = [competition_step(s, 100, 0.25, 3) for s in range(4100)]
    assert not any(draws[:100])
    frac = sum(draws[100:]) / 4000
    assert abs(frac - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5  # binomial, 4 standard deviations
    assert draws != [competition_step(s, 100, 0.25, 4) for s in range(4100)]  # another seed, other steps
    assert not any(competition_step(s, 0, 0.0, 0) for s in range(500))
    assert all(competition_step(s, 0, 1.0, 0) for s in range(500))
    router = get_router("compete", DIM, E, compete_prob=0.25, warmup_steps=100, seed=3).train()
    seen = []
    for _ in range(300):
        seen.append(router.competes)
        router.update_state()
    assert seen == draws[:300] and int(router.step) == 300
    router.eval().update_state()
    assert int(router.step) == 300
    fresh = get_router("compete", DIM, E, compete_prob=0.25, warmup_steps=100, seed=3)
    assert fresh.competes is False
    fresh.load_state_dict(router.state_dict())
    assert int(fresh.step) == 300 and fresh.competes == draws[300]
    step = next(s for s in range(300, 4100) if draws[s])
    fresh.step.fill_(step - 1)
    fresh.train().update_state()
    assert fresh.competes


def test_compete_distillation_teaches_the_router_the_competition():
    """The point of the distillation loss: trained on it alone (experts fixed), the router's softmax approaches the
    competition's (the loss falls over 100x) and its top-1 goes from chance to the competition's winner for most
    tokens (a linear router cannot match a nonlinear competition exactly: about 0.8 here)."""
    experts = _experts("gelu", False).requires_grad_(False)
    torch.manual_seed(14)
    router = get_router("compete", DIM, E, top_k=1, compete_prob=1.0, balance_coef=0.0).train()
    x = torch.randn(256, DIM)

    def agreement():
        with torch.no_grad():
            winners = router(x, None, experts=experts).expert_idx_N
            return float((router.logits(x).argmax(-1) == winners).float().mean())

    before = agreement()
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = router(x, None, experts=experts).losses["distill"]
        loss.backward()
        opt.step()
        losses.append(float(loss))
    after = agreement()
    assert before < 0.35 and after > 0.7 and losses[-1] < losses[0] / 100, (before, after, losses[0], losses[-1])


# ------------------------------------------------------------------------------------------ common properties


@pytest.mark.parametrize("name", READERS)
def test_registered_declared_and_state_round_trips(name):
    cls = ROUTERS[name]
    assert cls.reads_experts and "batch_dependent" in vars(cls) and cls.batch_dependent is False
    torch.manual_seed(3)
    moe = MoE(DIM, F, E, 2, router=name).train()
    for _ in range(2):
        y, aux = moe(torch.randn(2, 5, DIM))
        (y.square().mean() + aux.aux_loss).backward()
        moe.router.update_state()
    fresh = MoE(DIM, F, E, 2, router=name)
    fresh.load_state_dict(moe.state_dict())
    assert set(moe.state_dict()) == set(fresh.state_dict())
    moe.eval()
    fresh.eval()
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(moe(x)[0], fresh(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", READERS)
def test_routing_of_an_item_does_not_depend_on_its_batchmates(name):
    experts = _experts("gelu", False)
    router = get_router(name, DIM, E, top_k=2).eval()
    x = torch.randn(10, DIM)
    alone, together = router(x[:3], None, experts=experts), router(x, None, experts=experts)
    first = together.token_idx_N < 3
    assert torch.equal(alone.expert_idx_N, together.expert_idx_N[first])
    torch.testing.assert_close(alone.gate_N, together.gate_N[first])


@pytest.mark.parametrize("name", READERS)
def test_called_without_or_with_the_wrong_experts_says_what_it_needs(name):
    router = get_router(name, DIM, E, top_k=2)
    with pytest.raises(ValueError, match="reads its layer's expert weights: call it through MoE"):
        router(torch.randn(3, DIM))
    with pytest.raises(ValueError, match="experts has num_experts=3, dim=6"):
        router(torch.randn(3, DIM), None, experts=GroupedExperts(3, DIM, F))
    with pytest.raises(TypeError, match="experts must be a GroupedExperts"):
        router(torch.randn(3, DIM), None, experts=torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", READERS)
def test_expert_parallelism_refuses_a_router_that_reads_every_expert(name):
    moe = MoE(DIM, F, E, 2, router=name)
    groups = ExpertParallelGroups(None, None, ep_size=2, ep_rank=0, num_replicas=1, world_size=2, timeout_s=1.0)
    with pytest.raises(ValueError, match="reads every expert's weights"):
        shard_experts(moe, groups)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("aoe", {"top_k": 5}, "top_k must be an integer in \\[1, num_experts=4\\]"),
        ("aoe", {"balance_coef": -1.0}, "balance_coef must be a finite number >= 0"),
        ("erc", {"alpha": 0.0}, "alpha must be a finite number > 0"),
        ("erc", {"alpha": 1.5}, "alpha must be a finite number in \\(0, 1\\], got 1.5"),
        ("erc", {"erc_coef": 0.0}, "erc_coef must be a finite number > 0"),
        ("compete", {"top_k": 5}, "top_k must be an integer in \\[1, num_experts=4\\]"),
        ("compete", {"compete_prob": 1.5}, "compete_prob must be a finite number in \\[0, 1\\], got 1.5"),
        ("compete", {"compete_prob": -0.1}, "compete_prob must be a finite number >= 0.0"),
        ("compete", {"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ("compete", {"distill_coef": -1.0}, "distill_coef must be a finite number >= 0"),
        ("compete", {"seed": -2}, "seed must be an integer >= 0"),
    ],
)
def test_bad_options_name_the_argument(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_router_kwargs(name, kwargs, num_experts=4)
    with pytest.raises(ValueError, match=match):
        get_router(name, DIM, 4, **kwargs)


# ------------------------------------------------------------------------------------------ through the layer


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_moe_layer_matches_the_oracle_on_each_cpu_backend(name, backend):
    """The layer hands its experts to the router (``MoE.route``) and consumes the pairs like any router's; the
    output and the gradients to the input and both expert weights (through the gates too) match the loop oracle."""
    torch.manual_seed(1)
    kwargs = LAYER_KWARGS.get(name, {})
    moe = MoE(12, 10, 4, 2, router=name, router_kwargs=kwargs, activation="swiglu", backend=backend).double().train()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.manual_seed(2)
    y, aux = moe(x)
    torch.manual_seed(2)
    r = moe.route(x.reshape(-1, 12))
    want_y = oracles.expert_ffn(
        x.reshape(-1, 12), r.token_idx_N, r.expert_idx_N, r.gate_N, moe.experts.w_in, moe.experts.w_out, "swiglu"
    ).reshape(x.shape)
    torch.testing.assert_close(y, want_y, atol=1e-9, rtol=1e-8)
    params = [x, *moe.parameters()]
    got = torch.autograd.grad((y * weight).sum() + aux.aux_loss, params, allow_unused=True)
    want = torch.autograd.grad((want_y * weight).sum() + sum(r.losses.values()), params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8)
    assert aux.tokens_per_expert_E.sum() == r.expert_idx_N.numel() == 2 * 14


@pytest.mark.interpreter
@pytest.mark.parametrize("name", READERS)
def test_triton_backend_takes_the_expert_reading_routers(name):
    """Under the interpreter (or on a GPU): the Triton path consumes the same pairs as the fused CPU path."""
    from tests.kernels.common import DEVICE

    if DEVICE is None:
        pytest.skip("needs triton with a CUDA device or TRITON_INTERPRET=1")
    torch.manual_seed(2)
    moe = MoE(16, 24, num_experts=4, top_k=2, router=name, backend="triton").to(DEVICE).eval()
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    y, _ = moe(x)
    moe.backend = "torch"
    y_ref, _ = moe(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------- SMEAR


def _smear_layer(activation="swiglu", bias=True, shared=0):
    torch.manual_seed(4)
    moe = MoE(DIM, F, E, 1, router="smear", activation=activation, bias=bias, num_shared_experts=shared)
    return moe.double().train()


@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", True)])
@pytest.mark.parametrize("masked", [False, True])
def test_smear_matches_the_oracle_forward_and_gradients(activation, bias, masked):
    moe = _smear_layer(activation, bias)
    x = torch.randn(3, 5, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.4 if masked else None
    if masked:
        mask[0] = False  # an example with no real token: uniform weights, zero output
    y, aux = moe(x, mask)
    ex = moe.experts
    want_y, want_p = naive.smear(x, mask, moe.router.gate.weight, ex.w_in, ex.w_out, activation, ex.b_in, ex.b_out)
    # the routing weights are computed in fp32 (every router's rule), the merged expert in the layer's float64
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(y)
    params = [x, *moe.parameters()]
    got = torch.autograd.grad((y * weight).sum(), params)
    want = torch.autograd.grad((want_y * weight).sum(), params)
    for (name, _), g, w in zip([("x", x), *moe.named_parameters()], got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    real = mask.sum(1) if masked else torch.full((3,), 5)
    torch.testing.assert_close(aux.tokens_per_expert_E.double(), (want_p * real.unsqueeze(-1)).sum(0).detach())
    assert aux.num_tokens == int(real.sum()) and float(aux.dropped_frac) == 0.0


def test_smear_invariants_identical_experts_and_padding():
    """Merging identical experts gives that expert whatever the weights; padding tokens neither change the routing
    nor get an output; every expert gets a gradient from every example (no discrete choice)."""
    moe = _smear_layer("gelu", True)
    with torch.no_grad():
        for name in ("w_in", "w_out", "b_in", "b_out"):
            stack = getattr(moe.experts, name)
            stack.copy_(stack[0].expand_as(stack))
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    y, _ = moe(x)
    e0 = [
        oracles.expert_forward(
            x[g, i],
            *(getattr(moe.experts, n)[0] for n in ("w_in", "w_out")),
            "gelu",
            moe.experts.b_in[0],
            moe.experts.b_out[0],
        )
        for g in range(2)
        for i in range(4)
    ]
    torch.testing.assert_close(y.reshape(8, DIM), torch.stack(e0))
    moe = _smear_layer("gelu", False)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    padded = x.clone()
    padded[0, 2:] = 100.0
    y, _ = moe(x, mask)
    y_pad, _ = moe(padded, mask)
    torch.testing.assert_close(y, y_pad)
    assert (y[0, 2:] == 0).all()
    y.square().sum().backward()
    assert (moe.experts.w_in.grad.flatten(1).abs().sum(1) > 0).all()


def test_smear_is_per_example_state_round_trips_and_says_what_it_is():
    moe = _smear_layer("swiglu", False).eval()
    x = torch.randn(4, 6, DIM, dtype=torch.float64)
    torch.testing.assert_close(moe(x[:1])[0], moe(x)[0][:1])  # an example's output ignores its batchmates
    fresh = MoE(DIM, F, E, 1, router="smear", activation="swiglu").double().eval()
    fresh.load_state_dict(moe.state_dict())
    torch.testing.assert_close(fresh(x)[0], moe(x)[0], rtol=0, atol=0)
    assert moe.router.kind == "merge" and ROUTERS["smear"].batch_dependent is False
    assert MoE(DIM, F, E, 2, router="smear").active_ffn_dim == F  # one merged expert, whatever top_k
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts=4\\]"):
        check_router_kwargs("smear", {"top_k": 5}, num_experts=4)
    with pytest.raises(TypeError, match="expert parallelism supports routers that return"):
        groups = ExpertParallelGroups(None, None, ep_size=2, ep_rank=0, num_replicas=1, world_size=2, timeout_s=1.0)
        shard_experts(MoE(DIM, F, E, 1, router="smear"), groups)


@pytest.mark.interpreter
def test_smear_on_the_triton_device_matches_the_cpu_path():
    """SMEAR has no pairs, so the layer's ``backend`` does not apply: on the Triton test device (the interpreter's
    CPU or a GPU) the merged expert runs as batched matmuls, like Soft MoE's slots, and matches the CPU layer."""
    from tests.kernels.common import DEVICE

    if DEVICE is None:
        pytest.skip("needs triton with a CUDA device or TRITON_INTERPRET=1")
    torch.manual_seed(2)
    moe = MoE(16, 24, num_experts=4, top_k=1, router="smear", backend="triton").eval()
    x = torch.randn(2, 5, 16)
    y_cpu, _ = moe(x)
    y_dev, _ = moe.to(DEVICE)(x.to(DEVICE))
    torch.testing.assert_close(y_dev.cpu(), y_cpu, atol=1e-5, rtol=1e-4)
