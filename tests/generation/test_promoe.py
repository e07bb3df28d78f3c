"""ProMoE router against the naive oracle and a hand-computed case; its place in the MoE layer."""

from __future__ import annotations

import math

import pytest
import torch

from moezoo.layers import MoE, get_router
from moezoo.layers.promoe import ProMoERouter
from tests import oracles


def _pairs(result):
    return {(int(t), int(e)): g for t, e, g in zip(result.token_idx_N, result.expert_idx_N, result.gate_N)}


def test_hand_made_case_assignment_gates_and_contrastive_loss():
    router = ProMoERouter(2, 4, top_k=1, temperature=0.5, contrastive_coef=1.0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))  # 3 prototypes
    x = torch.tensor([[2.0, 0.0], [1.0, 2.0], [-3.0, 1.0], [5.0, 5.0], [0.0, 1.0]])
    dropped = torch.tensor([False, False, False, True, False])
    result = router(x, {"cfg_dropped": dropped})
    pairs = _pairs(result)
    s5 = 1 / math.sqrt(5)
    s10 = 1 / math.sqrt(10)
    expected = {(0, 0): 1.0, (1, 1): 2 * s5, (2, 2): 3 * s10, (3, 3): 1.0, (4, 1): 1.0}
    assert set(pairs) == set(expected)
    for key, gate in expected.items():
        assert float(pairs[key].detach()) == pytest.approx(gate, abs=1e-6)
    # Centroids (mean of normalised tokens, renormalised):
    # c0 = (1, 0); c1 = norm((s5, 2 s5) + (0, 1)); c2 = (-3, 1) s10.
    c1 = torch.tensor([s5, 2 * s5 + 1.0])
    c1 = c1 / c1.norm()
    cents = [torch.tensor([1.0, 0.0]), c1, torch.tensor([-3 * s10, s10])]
    protos = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])]
    loss = 0.0
    for i in range(3):
        logits = [float(protos[i] @ c) / 0.5 for c in cents]
        loss += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    assert float(result.losses["contrastive"]) == pytest.approx(loss / 3, rel=1e-5)
    assert result.probs_TE[3].tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("num_dropped", [0, 3, 11])
def test_matches_oracle_forward_and_gradients(k, num_dropped):
    torch.manual_seed(k + num_dropped)
    tokens, dim, experts = 11, 6, 5
    router = ProMoERouter(dim, experts, top_k=k, temperature=0.1, contrastive_coef=0.5)
    x = torch.randn(tokens, dim, requires_grad=True)
    dropped = torch.zeros(tokens, dtype=torch.bool)
    dropped[torch.randperm(tokens)[:num_dropped]] = True
    result = router(x, {"cfg_dropped": dropped})
    x_ref = x.detach().clone().requires_grad_(True)
    protos_ref = router.gate.weight.detach().clone().requires_grad_(True)
    ref = oracles.promoe_pairs(x_ref, protos_ref, dropped.tolist(), k)
    got = _pairs(result)
    assert set(got) == {(t, e) for t, e, _ in ref}
    weights = torch.randn(len(ref))
    out = sum(w * got[(t, e)] for w, (t, e, _) in zip(weights, ref))
    out_ref = sum(w * g for w, (_, _, g) in zip(weights, ref))
    cond_pairs = [(t, e) for t, e, _ in ref if e < experts - 1]
    if cond_pairs:
        out = out + result.losses["contrastive"]
        contrastive_ref = 0.5 * oracles.routing_contrastive(x_ref, protos_ref, cond_pairs, 0.1)
        assert float(result.losses["contrastive"]) == pytest.approx(float(contrastive_ref), rel=1e-5, abs=1e-7)
        out_ref = out_ref + contrastive_ref
    else:
        assert "contrastive" not in result.losses or float(result.losses["contrastive"]) == 0.0
    assert float(out) == pytest.approx(float(out_ref), rel=1e-5, abs=1e-6)
    if not cond_pairs:  # every token went to the unconditional expert with a constant gate: nothing to train
        return
    out.backward()
    out_ref.backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(router.gate.weight.grad, protos_ref.grad, rtol=1e-4, atol=1e-5)


def test_without_side_is_an_error_and_all_false_means_every_token_is_conditional():
    """Issue 18 item 6: a missing cfg_dropped used to mean "all conditional" silently."""
    router = ProMoERouter(4, 3, top_k=1)
    with pytest.raises(ValueError, match="ProMoERouter needs the side input 'cfg_dropped'"):
        router(torch.randn(7, 4))
    result = router(torch.randn(7, 4), {"cfg_dropped": torch.zeros(7, dtype=torch.bool)})
    assert int((result.expert_idx_N == 2).sum()) == 0 and result.token_idx_N.numel() == 7


def test_moe_layer_routes_dropped_samples_to_the_unconditional_expert_and_adds_the_shared_expert():
    moe = MoE(8, 16, num_experts=4, top_k=1, router="promoe", num_shared_experts=1)
    x = torch.randn(3, 5, 8)
    dropped = torch.tensor([False, True, False])
    y, aux = moe(x, side={"cfg_dropped": dropped})
    routing = aux.routing
    sample_N = routing.token_idx_N // 5
    assert torch.equal(routing.expert_idx_N == 3, dropped[sample_N])
    assert aux.tokens_per_expert_E[3] == 5
    assert moe.active_ffn_dim == 2 * 16  # one routed expert + the shared expert
    # The shared expert is always on: zeroing the routed experts leaves exactly the shared FFN's output.
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.zero_()
    y0, _ = moe(x, side={"cfg_dropped": dropped})
    torch.testing.assert_close(y0, moe.shared(x))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="num_experts"):
        get_router("promoe", 8, 1)
    with pytest.raises(ValueError, match="top_k"):
        ProMoERouter(8, 3, top_k=3)
    with pytest.raises(ValueError, match="temperature"):
        ProMoERouter(8, 3, temperature=0.0)
    router = ProMoERouter(8, 3)
    with pytest.raises(ValueError, match="cfg_dropped"):
        router(torch.randn(4, 8), {"cfg_dropped": torch.zeros(3, dtype=torch.bool)})
