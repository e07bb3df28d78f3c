"""Routers against the naive oracles: which pairs, which gates, which losses; and their invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moezoo.layers import (
    ROUTERS,
    ExpertChoiceRouter,
    ReLURouter,
    SigmoidLossFreeRouter,
    SinkhornRouter,
    TopKRouter,
    get_router,
)
from tests import oracles


def pair_set(result):
    return {
        (int(t), int(e)): float(g) for t, e, g in zip(result.token_idx_N, result.expert_idx_N, result.gate_N.detach())
    }


def assert_pairs(result, expected, atol=1e-6):
    got = pair_set(result)
    want = {(t, e): g for t, e, g in expected}
    assert set(got) == set(want)
    for key, value in want.items():
        assert math.isclose(got[key], value, abs_tol=atol), key


@pytest.mark.parametrize("k,normalize", [(1, False), (2, True), (3, True), (2, False)])
def test_topk_matches_oracle(k, normalize):
    router = TopKRouter(16, 6, top_k=k, normalize=normalize, balance_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(13, 16)
    result = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    expected = oracles.topk_pairs(probs, k, normalize)
    assert_pairs(result, expected)
    experts = [e for _, e, _ in expected]
    torch.testing.assert_close(result.losses["balance"], 0.01 * oracles.switch_balance(probs, experts, k))
    z = torch.logsumexp(x @ router.gate.weight.t(), -1).square().mean()
    torch.testing.assert_close(result.losses["z_loss"], 0.001 * z)


@pytest.mark.parametrize("policy", ["position", "batch_priority"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_dropping_matches_oracle(policy, capacity_factor):
    num_tokens, k, num_experts = 20, 2, 4
    router = TopKRouter(8, num_experts, top_k=k, capacity_factor=capacity_factor, drop_policy=policy)
    x = torch.randn(num_tokens, 8)
    result = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    full = oracles.topk_pairs(probs, k, normalize=True)  # ordered token-major, choice-minor
    top1 = [max(probs[t].tolist()) for t in range(num_tokens)]
    if policy == "position":
        rank = list(range(num_tokens))
    else:
        order = sorted(range(num_tokens), key=lambda t: (-top1[t], t))
        rank = [order.index(t) for t in range(num_tokens)]
    priorities = [(i % k) * num_tokens + rank[i // k] for i in range(len(full))]
    capacity = math.ceil(capacity_factor * num_tokens * k / num_experts)
    keep = oracles.capacity_keep([e for _, e, _ in full], priorities, capacity)
    assert_pairs(result, [p for p, kept in zip(full, keep) if kept])
    assert torch.bincount(result.expert_idx_N, minlength=num_experts).max() <= capacity


def test_null_experts_are_filtered():
    router = TopKRouter(8, 4, top_k=2, num_null_experts=2)
    x = torch.randn(30, 8)
    result = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    expected = [p for p in oracles.topk_pairs(probs, 2, normalize=True) if p[1] < 4]
    assert_pairs(result, expected)
    assert result.expert_idx_N.max() < 4


def test_expert_choice_matches_oracle():
    router = ExpertChoiceRouter(8, 4, top_k=2)
    x = torch.randn(10, 8)
    result = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    assert_pairs(result, oracles.expert_choice_pairs(probs, capacity=5))
    assert router.capacity(10) == 5


def test_sinkhorn_training_uses_balanced_plan_and_eval_is_greedy():
    router = SinkhornRouter(8, 4, top_k=1, num_iters=5)
    x = torch.randn(16, 8) + 2.0 * torch.randn(1, 8)  # skewed towards some experts
    logits = x @ router.gate.weight.t()
    probs = torch.softmax(logits, -1)
    plan = oracles.sinkhorn_plan(logits, 5)
    result = router.train()(x)
    assert_pairs(result, [(t, int(plan[t].argmax()), float(probs[t, plan[t].argmax()])) for t in range(16)])
    result = router.eval()(x)
    assert_pairs(result, [(t, int(probs[t].argmax()), float(probs[t].max())) for t in range(16)])


def test_sigmoid_lossfree_selection_bias_and_update():
    router = SigmoidLossFreeRouter(8, 4, top_k=2, bias_update_rate=0.1)
    router.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))  # expert 0 always selected
    x = torch.randn(12, 8)
    result = router.train()(x)
    scores = torch.sigmoid(x @ router.gate.weight.t())
    expected = []
    for t in range(12):
        second = max(range(1, 4), key=lambda e: float(scores[t, e]))
        total = float(scores[t, 0] + scores[t, second])
        expected += [(t, 0, float(scores[t, 0]) / total), (t, second, float(scores[t, second]) / total)]
    assert_pairs(result, expected)
    load = torch.bincount(result.expert_idx_N, minlength=4).float()
    router.update_state()
    want = torch.tensor([10.0, 0.0, 0.0, 0.0]) + 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(router.expert_bias, want)
    assert router.pending_load.sum() == 0
    before = router.expert_bias.clone()
    router.eval()(x)
    router.update_state()  # eval forwards accumulate nothing
    assert torch.equal(router.expert_bias, before)


def test_relu_router_pairs_and_adaptive_l1():
    router = ReLURouter(8, 4, top_k=1, l1_coef_init=1e-3, l1_growth=2.0)
    x = torch.randn(20, 8)
    result = router.train()(x)
    gates = torch.relu(x @ router.gate.weight.t())
    expected = [(t, e, float(gates[t, e])) for t in range(20) for e in range(4) if gates[t, e] > 0]
    assert_pairs(result, expected)
    observed_sparsity = float((gates == 0).float().mean())
    router.update_state()
    target = 1 - 1 / 4
    factor = 2.0 if observed_sparsity < target else 0.5
    torch.testing.assert_close(router.l1_coef, torch.tensor(1e-3 * factor))


def test_router_gradients_flow_through_gates():
    for name in ["topk", "sigmoid_lossfree", "expert_choice", "sinkhorn", "relu"]:
        router = get_router(name, 8, 4, top_k=2)
        result = router.train()(torch.randn(10, 8))
        (result.gate_N.sum() + sum(result.losses.values(), torch.zeros(()))).backward()
        assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0, name


@settings(max_examples=30, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 8),
    data=st.data(),
)
def test_topk_invariants(num_tokens, num_experts, data):
    k = data.draw(st.integers(1, num_experts))
    router = TopKRouter(6, num_experts, top_k=k)
    result = router(torch.randn(num_tokens, 6))
    assert result.token_idx_N.numel() == num_tokens * k  # counts sum to T*K
    per_token = {}
    for t, e in zip(result.token_idx_N.tolist(), result.expert_idx_N.tolist()):
        per_token.setdefault(t, []).append(e)
    assert all(len(set(v)) == k == len(v) for v in per_token.values())  # K distinct experts each
    assert len(per_token) == num_tokens
    if k > 1:
        sums = torch.zeros(num_tokens).index_add_(0, result.token_idx_N, result.gate_N.detach())
        torch.testing.assert_close(sums, torch.ones(num_tokens))


@settings(max_examples=30, deadline=None)
@given(
    num_tokens=st.integers(1, 50),
    num_experts=st.integers(1, 6),
    capacity_factor=st.floats(0.1, 3.0),
    policy=st.sampled_from(["position", "batch_priority"]),
    data=st.data(),
)
def test_capacity_never_exceeded(num_tokens, num_experts, capacity_factor, policy, data):
    k = data.draw(st.integers(1, num_experts))
    router = TopKRouter(6, num_experts, top_k=k, capacity_factor=capacity_factor, drop_policy=policy)
    result = router(torch.randn(num_tokens, 6))
    assert torch.bincount(result.expert_idx_N, minlength=num_experts).max() <= router.capacity(num_tokens)


def test_registry_and_bad_arguments():
    assert {"topk", "sigmoid_lossfree", "expert_choice", "soft", "sinkhorn", "relu"} <= set(ROUTERS)
    with pytest.raises(ValueError, match="router='nope' is unknown"):
        get_router("nope", 8, 4)
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts=4\\]"):
        get_router("topk", 8, 4, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        get_router("topk", 8, 4, capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        get_router("expert_choice", 8, 4, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="drop_policy"):
        get_router("topk", 8, 4, drop_policy="random")
    with pytest.raises(TypeError, match="does not accept"):
        get_router("topk", 8, 4, slots_per_expert=2)


@pytest.mark.parametrize("noise", ["gaussian", "jitter"])
def test_noisy_gating_only_in_training(noise):
    noisy = TopKRouter(8, 4, top_k=2, noise=noise, noise_eps=0.5)
    clean = TopKRouter(8, 4, top_k=2)
    clean.gate.weight.data.copy_(noisy.gate.weight.data)
    x = torch.randn(50, 8)
    assert pair_set(noisy.eval()(x)) == pair_set(clean.eval()(x))
    first, second = noisy.train()(x), noisy.train()(x)
    assert pair_set(first) != pair_set(second)
    if noise == "gaussian":
        second.gate_N.sum().backward()
        assert noisy.noise_gate.weight.grad is not None and noisy.noise_gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="noise must be one of None, 'gaussian', 'jitter'; got 'uniform'"):
        TopKRouter(8, 4, noise="uniform")


# ----------------------------------------------------------------------------------- options and their checks


def test_bad_argument_names_list_what_the_router_accepts():
    """The message names the rejected argument and every accepted one (not the arguments passed)."""
    with pytest.raises(TypeError) as err:
        get_router("topk", 8, 4, top_kk=2, capacity_factor=1.0)
    message = str(err.value)
    assert message.startswith("router='topk' does not accept top_kk; it accepts top_k, noise, noise_eps, ")
    assert "capacity_factor" in message and "z_loss_coef" in message


def test_a_wrong_type_is_not_an_unknown_argument():
    with pytest.raises(TypeError, match="capacity_factor must be a finite number > 0 or None") as err:
        get_router("topk", 8, 4, capacity_factor="a")
    assert "does not accept" not in str(err.value)
    with pytest.raises(TypeError, match="top_k must be an integer in \\[1, num_experts=4\\], got 2.0"):
        get_router("sinkhorn", 8, 4, top_k=2.0)
    with pytest.raises(TypeError, match="balanced_eval must be True or False"):
        get_router("sinkhorn", 8, 4, balanced_eval="yes")


@pytest.mark.parametrize("name", ["topk", "expert_choice"])
def test_infinite_capacity_fails_at_construction(name):
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0.*got inf"):
        get_router(name, 8, 4, capacity_factor=math.inf)


def test_soft_moe_checks_top_k():
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts=4\\], got 99"):
        get_router("soft", 8, 4, top_k=99)
    get_router("soft", 8, 4, top_k=4)


def test_null_experts_raise_the_top_k_bound():
    assert get_router("topk", 8, 4, top_k=6, num_null_experts=2).top_k == 6
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts \\+ num_null_experts=6\\]"):
        get_router("topk", 8, 4, top_k=7, num_null_experts=2)


def test_check_router_kwargs_without_building():
    from moezoo.layers import check_router_kwargs, router_options

    check_router_kwargs("topk", {"top_k": 2, "capacity_factor": 1.25})  # no dim, no num_experts: nothing built
    check_router_kwargs("topk", {"top_k": 6, "num_null_experts": 2}, num_experts=4)
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts=4\\]"):
        check_router_kwargs("topk", {"top_k": 6}, num_experts=4)
    with pytest.raises(ValueError, match="router='nope' is unknown; registered routers are"):
        check_router_kwargs("nope", {})
    with pytest.raises(TypeError, match="router='soft' does not accept capacity_factor; it accepts top_k, slots_per"):
        check_router_kwargs("soft", {"capacity_factor": 1.0})
    with pytest.raises(ValueError, match="segment_size must be a positive integer"):
        check_router_kwargs("segment", {"segment_size": 0})  # a subclass's own option
    with pytest.raises(ValueError, match="noise must be one of"):
        check_router_kwargs("segment", {"noise": "uniform"})  # ... and its parent's, passed through **kwargs
    with pytest.raises(ValueError, match="num_experts must be an integer >= 2"):
        check_router_kwargs("promoe", {}, num_experts=1)
    with pytest.raises(ValueError, match="embed_dim must be an integer >= 1"):
        check_router_kwargs("global_embedding", {"embed_dim": 0})
    omni = router_options("omni")  # its own defaults first, then TopKRouter's options through **kwargs
    assert omni["top_k"] == 1 and omni["balance_coef"] == 0.01 and omni["capacity_factor"] is None
    assert list(router_options("language")) == ["top_k", "normalize"]


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_has_a_kind_and_valid_defaults(name):
    from moezoo.layers import SoftMoERouter, SparseRouter, check_router_kwargs
    from moezoo.layers.expert_routers import SMEARRouter

    router_class = ROUTERS[name]
    assert router_class.kind in ("sparse", "soft", "merge")
    base = {"soft": SoftMoERouter, "merge": SMEARRouter}.get(router_class.kind, SparseRouter)
    assert issubclass(router_class, base)
    check_router_kwargs(name, {}, num_experts=4)


def test_a_sparse_router_without_forward_says_what_to_override():
    from moezoo.layers.routers import SparseRouter

    class NoForward(SparseRouter):
        pass

    with pytest.raises(TypeError, match="NoForward must override forward"):
        NoForward(8, 4, 0.0, 0.0)(torch.randn(3, 8))
