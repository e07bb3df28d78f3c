"""The routers of ``moezoo.layers.token_graph_routers`` (similarity- and attention-aware routing, MaskMoE) against
the naive loops of ``tests/oracles_token_graph.py`` (pairs, gates, losses and their gradients), the invariants each
method promises, state in buffers, batch dependence, and the MoE layer on every backend."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from moezoo.layers import ROUTERS, MoE, TopKRouter, check_router_kwargs, get_router
from moezoo.layers.routers import ATTENTION_PROBS, SAMPLE_SLOTS
from moezoo.layers.side_inputs import synthetic_side
from moezoo.layers.token_graph_routers import (
    TOKEN_GRAPH_ROUTERS,
    AttentionGraphRouter,
    MaskMoERouter,
    SimilarityRouter,
)
from tests import oracles
from tests import oracles_token_graph as naive

DIM, E = 6, 4


def D(t):  # noqa: N802 - the oracles run in float64; gradients flow back to the fp32 parameters
    return t.double()


def _objective(pairs, losses, weight_TE):
    total = torch.zeros((), dtype=torch.float64)
    for t, e, g in pairs:
        total = total + weight_TE[t, e] * g
    return total + sum((v.double() for v in losses.values()), torch.zeros((), dtype=torch.float64))


def check_against_oracle(router, x, oracle, side=None, atol=1e-5, inputs=()):
    """``oracle(x64) -> (pairs, losses)``: the same pairs, gates and losses, and the same gradients of
    ``sum w_te * gate_te + sum losses`` with respect to the input, every router parameter and ``inputs`` (side
    inputs that require gradients, read by both the router and the oracle)."""
    x = x.clone().requires_grad_(True)
    result = router(x, side)
    got_pairs = list(zip(result.token_idx_N.tolist(), result.expert_idx_N.tolist(), result.gate_N))
    want_pairs, want_losses = oracle(x.double())
    assert sorted((t, e) for t, e, _ in got_pairs) == sorted((t, e) for t, e, _ in want_pairs)
    want_gate = {(t, e): g for t, e, g in want_pairs}
    for t, e, g in got_pairs:
        assert math.isclose(float(g.detach()), float(want_gate[t, e].detach()), abs_tol=atol), (t, e)
    assert set(result.losses) == set(want_losses)
    for name, value in want_losses.items():
        torch.testing.assert_close(result.losses[name], value.to(result.losses[name].dtype), atol=atol, rtol=1e-4)
    weight_TE = torch.randn(x.shape[0], router.num_experts)
    params = [x, *(p for p in router.parameters() if p.requires_grad), *inputs]
    names = [
        "x",
        *(n for n, p in router.named_parameters() if p.requires_grad),
        *(f"input{i}" for i in range(len(inputs))),
    ]
    got = torch.autograd.grad(_objective(got_pairs, result.losses, weight_TE), params, allow_unused=True)
    want = torch.autograd.grad(_objective(want_pairs, want_losses, weight_TE), params, allow_unused=True)
    for name, g, w in zip(names, got, want):
        g = torch.zeros_like(params[names.index(name)]) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w.to(g.dtype), atol=atol, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    return result


def _slots(sizes: list[int], width: int) -> tuple[torch.Tensor, list[list[int]]]:
    """A (B, width) token grid with ``sizes[b]`` tokens in sample b (the first places, the rest masked)."""
    slots, samples, start = torch.full((len(sizes), width), -1), [], 0
    for b, size in enumerate(sizes):
        slots[b, :size] = torch.arange(start, start + size)
        samples.append(list(range(start, start + size)))
        start += size
    return slots, samples


# ---------------------------------------------------------------------------------------------- similarity-aware


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("similarity_dim", [None, 3])
@pytest.mark.parametrize("sizes", [None, [4, 1, 0, 3]])  # one group (no side input), or per sample with padding
def test_similarity_matches_oracle(k, similarity_dim, sizes):
    torch.manual_seed(0)
    router = get_router("similarity", DIM, E, top_k=k, similarity_dim=similarity_dim, temperature=0.7).train()
    x = torch.randn(8, DIM)
    side, samples = None, [list(range(8))]
    if sizes is not None:
        slots, samples = _slots(sizes, 5)
        side = {SAMPLE_SLOTS: slots}
    sim = None if router.sim_proj is None else router.sim_proj.weight

    def oracle(x64):
        pairs, losses, _ = naive.similarity_routing(
            x64, D(router.gate.weight), None if sim is None else D(sim), samples, k, 0.7, k > 1, 0.01
        )
        return pairs, losses

    check_against_oracle(router, x, oracle, side)


def test_similarity_mixes_distributions_of_the_same_sample_only():
    """p~ is a convex mix (rows sum to 1) of the softmax rows of the token's own sample: a sample's routing does not
    change when another sample's tokens change; a hot temperature mixes uniformly (every token of a sample gets the
    same experts), a cold one gives each token the softmax of its most similar sample-mate (argmax_j <h_i, h_j>,
    itself or another)."""
    torch.manual_seed(1)
    router = SimilarityRouter(DIM, E, top_k=2).train()
    x = torch.randn(9, DIM)
    slots, _ = _slots([4, 5], 5)
    mixed = router(x, {SAMPLE_SLOTS: slots}).probs_TE
    torch.testing.assert_close(mixed.sum(-1), torch.ones(9))
    other = x.clone()
    other[4:] = torch.randn(5, DIM)
    torch.testing.assert_close(router(other, {SAMPLE_SLOTS: slots}).probs_TE[:4], mixed[:4])
    assert not torch.allclose(router(x).probs_TE[:4], mixed[:4])  # one group of all 9 tokens: this can fail
    hot = SimilarityRouter(DIM, E, top_k=2, temperature=1e9)
    hot.load_state_dict(router.state_dict())
    probs = torch.softmax(x @ router.gate.weight.detach().t(), -1)
    hot_mixed = hot(x, {SAMPLE_SLOTS: slots}).probs_TE
    torch.testing.assert_close(hot_mixed[:4], probs[:4].mean(0).expand(4, E))
    torch.testing.assert_close(hot_mixed[4:], probs[4:].mean(0).expand(5, E))
    cold = SimilarityRouter(DIM, E, top_k=2, temperature=1e-4)
    cold.load_state_dict(router.state_dict())
    logits = x @ router.gate.weight.detach().t()
    nearest = [
        max(sample, key=lambda j, i=i: float(logits[i] @ logits[j])) for sample in _slots([4, 5], 5)[1] for i in sample
    ]
    torch.testing.assert_close(cold(x, {SAMPLE_SLOTS: slots}).probs_TE, probs[nearest])  # the most similar token's


def test_similarity_rules_say_whether_the_batch_matters():
    router = SimilarityRouter(DIM, E)
    assert SimilarityRouter.batch_dependent  # it mixes over tokens: the layer passes the sample grid
    assert not router.depends_on_batch(training=True) and not router.depends_on_batch(training=False)
    both = SimilarityRouter(DIM, E, train_rule="batch", eval_rule="batch")
    assert both.depends_on_batch(training=True) and both.depends_on_batch(training=False)


@pytest.mark.parametrize("training", [True, False])
def test_similarity_item_rule_through_the_layer_is_the_rule_on_each_sample_alone(training):
    """Through the MoE layer (with a padding mask), each sample's output and routing equal that sample run alone,
    in training as at evaluation; the batch rule mixes across samples and the layer warns about it at evaluation."""
    torch.manual_seed(2)
    moe = MoE(DIM, 8, num_experts=E, top_k=2, router="similarity", backend="reference").train(training)
    x = torch.randn(3, 5, DIM)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y, aux = moe(x, mask=mask)
    for b in range(3):
        alone, _ = moe(x[b : b + 1], mask=mask[b : b + 1])
        torch.testing.assert_close(y[b : b + 1], alone, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(aux.aux_loss) and (y[~mask] == 0).all()
    batch_rule = MoE(DIM, 8, num_experts=E, top_k=2, router="similarity", backend="reference").train(training)
    batch_rule.router.train_rule = batch_rule.router.eval_rule = "batch"
    batch_rule.load_state_dict(moe.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole, _ = batch_rule(x, mask=mask)
    assert any("keeps its batch-dependent routing rule" in str(w.message) for w in caught) == (not training)
    assert not torch.allclose(whole, y, atol=1e-4)  # the batch rule differs: this can fail


def test_similarity_gradients_reach_every_token_of_the_sample():
    """The gate of token i depends on its sample-mates' inputs (the graph), and on nothing outside its sample."""
    torch.manual_seed(3)
    router = SimilarityRouter(DIM, E, top_k=1, balance_coef=0.0)
    x = torch.randn(6, DIM, requires_grad=True)
    slots, _ = _slots([3, 3], 3)
    result = router(x, {SAMPLE_SLOTS: slots})
    (grad,) = torch.autograd.grad(result.gate_N[0], x)
    assert (grad[:3].abs().sum(-1) > 0).all() and (grad[3:] == 0).all()


# ------------------------------------------------------------------------------------------------ attention-aware


def _grid(mask: torch.Tensor) -> tuple[torch.Tensor, list[list[int | None]]]:
    """The layer's sample grid of a (B, L) mask: kept tokens numbered in order, -1 (None) at masked places."""
    slots = torch.full(mask.shape, -1, dtype=torch.int64)
    slots[mask] = torch.arange(int(mask.sum()))
    return slots, [[None if j < 0 else j for j in row] for row in slots.tolist()]


def _attention_rows(num_tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(num_tokens, width, generator=generator), -1).requires_grad_(True)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("normalize", [None, False])
@pytest.mark.parametrize("layout", ["one_sample", "grid"])
def test_attention_graph_matches_oracle(k, normalize, layout):
    """Pairs, gates, balance loss and the gradients with respect to x, the gate and the attention rows, against the
    float64 token loop; ``grid``: 3 samples of 5 places with masked places inside, one sample fully masked."""
    torch.manual_seed(0)
    router = get_router("attention_graph", DIM, E, top_k=k, normalize=normalize, z_loss_coef=1e-3).train()
    if layout == "one_sample":  # called without the layer: every token is one sample's, A is (T, T)
        grid: list[list[int | None]] = [list(range(7))]
        side: dict[str, torch.Tensor] = {}
    else:
        mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
        slots, grid = _grid(mask)
        side = {SAMPLE_SLOTS: slots}
    num_tokens = sum(j is not None for row in grid for j in row)
    attn = _attention_rows(num_tokens, len(grid[0]))
    side[ATTENTION_PROBS] = attn
    normalized = k > 1 if normalize is None else normalize

    def oracle(x64):
        pairs, losses, _ = naive.attention_routing(x64, D(router.gate.weight), D(attn), grid, k, normalized, 0.01)
        logits = x64 @ D(router.gate.weight).t()
        losses["z_loss"] = 1e-3 * torch.logsumexp(logits, -1).square().mean()
        return pairs, losses

    check_against_oracle(router, torch.randn(num_tokens, DIM), oracle, side, inputs=(attn,))


def test_attention_graph_identity_is_top_k_uniform_is_the_sample_mean_and_masked_places_take_no_weight():
    """A = I routes as softmax top-k; a uniform row gives every token of a sample the sample's mean distribution;
    the attention a token pays to masked places (and their size) changes nothing; rows need not be normalised."""
    torch.manual_seed(1)
    router = AttentionGraphRouter(DIM, E, top_k=2).eval()
    topk = TopKRouter(DIM, E, top_k=2).eval()
    topk.load_state_dict(router.state_dict())
    x = torch.randn(9, DIM)
    eye = router(x, {ATTENTION_PROBS: torch.eye(9)})
    want = topk(x)
    assert torch.equal(eye.expert_idx_N, want.expert_idx_N) and torch.equal(eye.token_idx_N, want.token_idx_N)
    torch.testing.assert_close(eye.gate_N, want.gate_N)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    slots, _ = _grid(mask)
    probs = torch.softmax(x @ router.gate.weight.detach().t(), -1)
    uniform = router(x, {SAMPLE_SLOTS: slots, ATTENTION_PROBS: torch.full((9, 5), 0.2)}).probs_TE
    torch.testing.assert_close(uniform[:4], probs[:4].mean(0).expand(4, E))
    torch.testing.assert_close(uniform[4:], probs[4:].mean(0).expand(5, E))
    attn = _attention_rows(9, 5).detach()
    base = router(x, {SAMPLE_SLOTS: slots, ATTENTION_PROBS: attn})
    torch.testing.assert_close(base.probs_TE.sum(-1), torch.ones(9))
    moved = attn.clone()
    moved[:4, 2] = 50.0  # the masked place of sample 0
    scaled = 3.0 * moved
    for other in (moved, scaled):
        again = router(x, {SAMPLE_SLOTS: slots, ATTENTION_PROBS: other})
        assert torch.equal(again.expert_idx_N, base.expert_idx_N)
        torch.testing.assert_close(again.gate_N, base.gate_N)


def test_attention_graph_never_crosses_samples():
    """A token's gates depend on its own sample's inputs and attention rows only (gradients), and the router is
    batch-independent in training and at evaluation."""
    torch.manual_seed(3)
    router = AttentionGraphRouter(DIM, E, top_k=1, balance_coef=0.0)
    assert AttentionGraphRouter.batch_dependent and router.train_rule == "item"
    assert not router.depends_on_batch(training=True) and not router.depends_on_batch(training=False)
    x = torch.randn(6, DIM, requires_grad=True)
    attn = _attention_rows(6, 3)
    slots, _ = _grid(torch.ones(2, 3, dtype=torch.bool))
    result = router(x, {SAMPLE_SLOTS: slots, ATTENTION_PROBS: attn})
    grad_x, grad_attn = torch.autograd.grad(result.gate_N[0], (x, attn))
    assert (grad_x[:3].abs().sum(-1) > 0).all() and (grad_x[3:] == 0).all()
    assert (grad_attn[0] != 0).all() and (grad_attn[1:] == 0).all()


@pytest.mark.parametrize("training", [True, False])
def test_attention_graph_through_the_layer_is_the_rule_on_each_sample_alone(training):
    """Through the MoE layer with a padding mask and a (B, L, L) attention side input: each sample's output equals
    that sample run alone, in training as at evaluation, and no warning is given."""
    torch.manual_seed(2)
    moe = MoE(DIM, 8, num_experts=E, top_k=2, router="attention_graph", backend="reference").train(training)
    x = torch.randn(3, 5, DIM)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    attn = torch.softmax(torch.randn(3, 5, 5), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, aux = moe(x, mask=mask, side={ATTENTION_PROBS: attn})
    for b in range(3):
        alone, _ = moe(x[b : b + 1], mask=mask[b : b + 1], side={ATTENTION_PROBS: attn[b : b + 1]})
        torch.testing.assert_close(y[b : b + 1], alone, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(aux.aux_loss) and (y[~mask] == 0).all()
    shuffled = attn.clone()
    shuffled[0] = torch.softmax(torch.randn(5, 5), -1)  # another sample's attention changes: not the others'
    torch.testing.assert_close(moe(x, mask=mask, side={ATTENTION_PROBS: shuffled})[0][1:], y[1:])


@pytest.mark.parametrize("lead", [(0, 4), (1, 0), (4,), (2, 2, 3)])
def test_attention_graph_layer_takes_empty_flat_and_nested_token_shapes(lead):
    """No sample, samples of no token, one flat sample (A is (T, T)) and (B, H, W) tokens (rows over H*W places)."""
    torch.manual_seed(4)
    moe = MoE(DIM, 8, num_experts=E, top_k=2, router="attention_graph")
    x = torch.randn(*lead, DIM, requires_grad=True)
    side = synthetic_side(moe.router, lead, torch.Generator().manual_seed(0))
    y, aux = moe(x, side=side)
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(aux.aux_loss)
    (y.square().sum() + aux.aux_loss).backward()
    assert torch.isfinite(x.grad).all()


def test_attention_graph_refuses_a_missing_or_misshaped_attention():
    router = AttentionGraphRouter(DIM, E)
    x = torch.randn(4, DIM)
    with pytest.raises(ValueError, match="needs the side input 'attention_probs'"):
        router(x)
    with pytest.raises(ValueError, match=r"shape \(4, 4\) here; got \(4, 3\)"):
        router(x, {ATTENTION_PROBS: torch.rand(4, 3)})
    with pytest.raises(ValueError, match=r"shape \(4, 4\) here; got \(3, 4\)"):
        router(x, {ATTENTION_PROBS: torch.rand(3, 4)})
    with pytest.raises(ValueError, match="must hold attention probabilities"):
        router(x, {ATTENTION_PROBS: torch.rand(4, 4) - 0.5})
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        router(x, {ATTENTION_PROBS: torch.ones(4, 4, dtype=torch.int64)})
    moe = MoE(DIM, 8, num_experts=E, top_k=2, router="attention_graph")
    x3 = torch.randn(2, 5, DIM)
    with pytest.raises(ValueError, match=r"AttentionGraphRouter needs the side inputs \['attention_probs'\]"):
        moe(x3)
    with pytest.raises(ValueError, match=r"shape \(10, 5\) here; got \(10, 6\)"):
        moe(x3, side={ATTENTION_PROBS: torch.rand(2, 5, 6)})  # keys: not the sample's 5 tokens
    with pytest.raises(ValueError, match="side input 'attention_probs' has shape \\(2, 3, 5, 5\\)"):
        moe(x3, side={ATTENTION_PROBS: torch.rand(2, 3, 5, 5)})  # per head: average the heads first
    with pytest.raises(ValueError, match="contains NaN or inf"):
        moe(x3, side={ATTENTION_PROBS: torch.full((2, 5, 5), float("nan"))})


# ---------------------------------------------------------------------------------------------------- MaskMoE


@pytest.mark.parametrize("k,visible", [(1, 1), (1, 3), (2, 2), (2, 4)])
def test_maskmoe_matches_oracle(k, visible):
    torch.manual_seed(4)
    router = get_router("maskmoe", DIM, E, top_k=k, num_visible=visible, hash_bits=3).train()

    def oracle(x64):
        pairs, losses, _ = naive.maskmoe_routing(
            x64, D(router.gate.weight), D(router.hash_planes), router.visible, k, k > 1, 0.01
        )
        return pairs, losses

    check_against_oracle(router, torch.randn(16, DIM), oracle)


def test_maskmoe_routes_only_to_the_experts_its_bucket_sees():
    """Every bucket sees exactly V experts; every pair is a visible expert of its token's bucket; tokens of a bucket
    all see the same set (the key is invariant to the input's scale); with V = K = 1 a bucket is one fixed expert."""
    torch.manual_seed(5)
    router = MaskMoERouter(16, 8, top_k=2, num_visible=3, hash_bits=4)
    assert router.visible.shape == (16, 8) and (router.visible.sum(-1) == 3).all()
    x = torch.randn(200, 16)
    bucket = router.bucket(x)
    assert torch.equal(bucket, router.bucket(2.5 * x))
    assert torch.equal(bucket, torch.tensor([naive.hash_bucket(row, router.hash_planes) for row in x]))
    result = router(x)
    assert router.visible[bucket[result.token_idx_N], result.expert_idx_N].all()
    assert torch.equal(result.token_idx_N.bincount(minlength=200), torch.full((200,), 2))
    fixed = MaskMoERouter(16, 8, top_k=1, num_visible=1, hash_bits=4)
    chosen = fixed(x).expert_idx_N
    assert torch.equal(chosen, fixed.visible.float().argmax(-1)[fixed.bucket(x)])
    assert len(set(zip(fixed.bucket(x).tolist(), chosen.tolist()))) == len(set(fixed.bucket(x).tolist()))


def test_maskmoe_defaults_and_option_checks():
    assert MaskMoERouter(DIM, 8, top_k=2).num_visible == 4  # max(top_k, E // 2)
    assert MaskMoERouter(DIM, 4, top_k=3).num_visible == 3
    with pytest.raises(ValueError, match="num_visible must be an integer in \\[top_k=2, num_experts=4\\], got 1"):
        check_router_kwargs("maskmoe", {"top_k": 2, "num_visible": 1}, num_experts=4)
    with pytest.raises(ValueError, match="num_visible must be an integer in \\[top_k=2, num_experts=4\\], got 5"):
        get_router("maskmoe", DIM, 4, top_k=2, num_visible=5)
    with pytest.raises(ValueError, match="hash_bits must be an integer in \\[0, 16\\], got 17"):
        get_router("maskmoe", DIM, 4, hash_bits=17)
    with pytest.raises(TypeError, match="hash_bits must be an integer >= 0"):
        check_router_kwargs("maskmoe", {"hash_bits": 2.0})
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        check_router_kwargs("similarity", {"temperature": 0.0})
    with pytest.raises(ValueError, match="similarity_dim must be an integer >= 1"):
        get_router("similarity", DIM, 4, similarity_dim=0)
    with pytest.raises(ValueError, match="train_rule must be one of 'item', 'batch'; got 'sample'"):
        get_router("similarity", DIM, 4, train_rule="sample")


# ------------------------------------------------------------------------------------------ common properties


@pytest.mark.parametrize("name", list(TOKEN_GRAPH_ROUTERS))
def test_registered_with_valid_defaults_and_named_bad_options(name):
    assert ROUTERS[name] is TOKEN_GRAPH_ROUTERS[name]
    assert "batch_dependent" in vars(ROUTERS[name])
    check_router_kwargs(name, {}, num_experts=4)
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts=4\\]"):
        check_router_kwargs(name, {"top_k": 5}, num_experts=4)
    with pytest.raises(TypeError, match=f"router='{name}' does not accept bogus"):
        check_router_kwargs(name, {"bogus": 1})


@pytest.mark.parametrize(
    "name,kwargs", [("similarity", {"similarity_dim": 3}), ("attention_graph", {}), ("maskmoe", {"hash_bits": 3})]
)
def test_state_round_trips_through_the_state_dict(name, kwargs):
    """MaskMoE's hash planes and masks are buffers drawn at construction: a router built under another seed routes
    differently until the checkpoint is loaded; then it routes identically."""
    torch.manual_seed(6)
    router = get_router(name, DIM, E, **kwargs)
    torch.manual_seed(7)
    fresh = get_router(name, DIM, E, **kwargs)
    x = torch.randn(32, DIM)
    side = synthetic_side(router, (32,), torch.Generator().manual_seed(0))
    if name == "maskmoe":
        assert set(dict(router.named_buffers())) == {"hash_planes", "visible"}
        assert not torch.equal(router.visible, fresh.visible)
    if name == "attention_graph":
        assert set(router.state_dict()) == {"gate.weight"}
    assert not torch.equal(router(x, side).expert_idx_N, fresh(x, side).expert_idx_N)
    fresh.load_state_dict(router.state_dict())
    for (n, b), (_, fb) in zip(router.named_buffers(), fresh.named_buffers()):
        assert torch.equal(b, fb), n
    a, b = router(x, side), fresh(x, side)
    assert torch.equal(a.expert_idx_N, b.expert_idx_N) and torch.equal(a.gate_N, b.gate_N)


def test_maskmoe_is_batch_independent():
    router = get_router("maskmoe", DIM, E, hash_bits=3).eval()
    x = torch.randn(10, DIM)
    alone, together = router(x[:3]), router(x)
    first = together.token_idx_N < 3
    assert torch.equal(alone.expert_idx_N, together.expert_idx_N[first])
    torch.testing.assert_close(alone.gate_N, together.gate_N[first])


# ------------------------------------------------------------------------------------------ through the layer


@pytest.mark.parametrize("name", list(TOKEN_GRAPH_ROUTERS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("masked", [False, True])
def test_moe_layer_with_each_router_matches_the_oracle(name, backend, masked):
    torch.manual_seed(1)
    moe = MoE(12, 10, num_experts=4, top_k=2, router=name, activation="swiglu", backend=backend).double().train()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 7) > 0.3 if masked else None
    side = {k: v.double() for k, v in synthetic_side(moe.router, (2, 7), torch.Generator().manual_seed(0)).items()}
    weight = torch.randn(2, 7, 12, dtype=torch.float64)
    captured = {}
    original_forward = moe.router.forward

    def capture(*args, **kw):
        captured["routing"] = original_forward(*args, **kw)
        return captured["routing"]

    moe.router.forward = capture
    y, aux = moe(x, mask=mask, side=side)
    r = captured["routing"]
    x_TD = x.reshape(-1, 12) if mask is None else x.reshape(-1, 12)[mask.reshape(-1)]
    want_in = oracles.expert_ffn(
        x_TD, r.token_idx_N, r.expert_idx_N, r.gate_N, moe.experts.w_in, moe.experts.w_out, "swiglu"
    )
    want_y = want_in if mask is None else x.new_zeros(14, 12).index_copy(0, mask.reshape(-1).nonzero()[:, 0], want_in)
    torch.testing.assert_close(y, want_y.reshape(x.shape), atol=1e-9, rtol=1e-8)
    params = [x, moe.experts.w_in, moe.experts.w_out]
    got = torch.autograd.grad((y * weight).sum(), params, retain_graph=True)
    want = torch.autograd.grad((want_y.reshape(x.shape) * weight).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8)
    assert aux.tokens_per_expert_E.sum() == r.expert_idx_N.numel() == 2 * x_TD.shape[0]
    assert torch.isfinite(aux.aux_loss)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(TOKEN_GRAPH_ROUTERS))
def test_triton_backend_takes_each_router(name):
    """Under the interpreter (or on a GPU): the Triton path consumes the same pairs as the fused CPU path."""
    from tests.kernels.common import DEVICE

    if DEVICE is None:
        pytest.skip("needs triton with a CUDA device or TRITON_INTERPRET=1")
    torch.manual_seed(2)
    moe = MoE(16, 24, num_experts=4, top_k=2, router=name, backend="triton").to(DEVICE).eval()
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    side = {k: v.to(DEVICE) for k, v in synthetic_side(moe.router, (2, 5), torch.Generator().manual_seed(0)).items()}
    y, _ = moe(x, side=side)
    moe.backend = "torch"
    y_ref, _ = moe(x, side=side)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-4)
