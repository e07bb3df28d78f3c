"""Speech routers against hand-made cases and naive oracles: shared (Omni) weights really shared, LID posteriors
really gate every layer, the global embedding really enters the router, cross-layer agreement by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from moezoo.layers import MoE, RoutingResult, get_router
from moezoo.layers.speech_routers import (
    GlobalEmbeddingRouter,
    LanguageRouter,
    OmniRouter,
    cross_layer_agreement,
    top1_assignment,
)
from moezoo.models import create_model
from tests import oracles


def _top1_oracle(x_TD, w_ED, moe):
    """Softmax top-1 routing (gate = max prob) then the naive per-pair expert loop."""
    probs = torch.softmax(x_TD.double() @ w_ED.double().t(), dim=-1).float()
    pairs = oracles.topk_pairs(probs.detach(), 1, normalize=False)
    tok = torch.tensor([p[0] for p in pairs])
    exp = torch.tensor([p[1] for p in pairs])
    gate = probs[tok, exp]
    return oracles.expert_ffn(x_TD, tok, exp, gate, moe.experts.w_in, moe.experts.w_out, "gelu")


def test_omni_router_is_one_set_of_weights_used_by_every_layer():
    router = OmniRouter(6, 3)
    layers = [MoE(6, 8, num_experts=3, top_k=1, router=router) for _ in range(3)]
    assert all(m.router is router for m in layers)
    params = {id(p) for m in layers for p in m.router.parameters()}
    assert params == {id(router.gate.weight)}
    xs = [torch.randn(7, 6, requires_grad=True) for _ in layers]
    total = sum(m(x)[0].square().sum() for m, x in zip(layers, xs))
    total.backward()
    shared_grad = router.gate.weight.grad.clone()
    # Oracle: each layer with its own *copy* of the same weights; the shared gradient is the sum of the copies'.
    copies = [torch.nn.Parameter(router.gate.weight.detach().clone()) for _ in layers]
    for m, x, w in zip(layers, xs, copies):
        y = _top1_oracle(x.detach(), w, m)
        torch.testing.assert_close(m(x.detach())[0], y, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
    torch.testing.assert_close(shared_grad, sum(w.grad for w in copies), rtol=1e-4, atol=1e-6)
    # Changing the one weight changes the routing of every layer.
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[2] = 10.0
    x = torch.rand(5, 6) + 0.1
    for m in layers:
        assert m(x)[1].routing.expert_idx_N.tolist() == [2] * 5


def test_moe_conformer_omni_shares_one_router_and_counts_it_once():
    model = create_model("moe_conformer_debug", moe={"router": "omni"})
    routers = [m.router for m in model.modules() if isinstance(m, MoE)]
    assert len(routers) == 4 and all(r is model.shared_router for r in routers)
    switch = create_model("moe_conformer_debug", moe={"router": "topk"})
    n_omni = sum(p.numel() for p in model.parameters())
    n_switch = sum(p.numel() for p in switch.parameters())
    assert n_switch - n_omni == 3 * model.shared_router.gate.weight.numel()


def test_language_router_routes_by_posteriors():
    probs = torch.tensor([[0.7, 0.05, 0.15, 0.1], [0.04, 0.06, 0.3, 0.6], [0.25, 0.5, 0.15, 0.1]])
    router = LanguageRouter(5, 4, top_k=1)
    assert not list(router.parameters())
    res = router(torch.randn(3, 5), {"lid_probs": probs})
    assert res.token_idx_N.tolist() == [0, 1, 2]
    assert res.expert_idx_N.tolist() == [0, 3, 1]
    torch.testing.assert_close(res.gate_N, torch.tensor([0.7, 0.6, 0.5]))
    res2 = LanguageRouter(5, 4, top_k=2)(torch.randn(3, 5), {"lid_probs": probs})
    expected = oracles.topk_pairs(probs, 2, normalize=True)
    got = list(zip(res2.token_idx_N.tolist(), res2.expert_idx_N.tolist(), res2.gate_N.tolist()))
    for (t, e, g), (to, eo, go) in zip(got, expected):
        assert (t, e) == (to, eo) and g == pytest.approx(go, rel=1e-6)


def test_language_router_needs_posteriors_of_the_right_shape():
    router = LanguageRouter(5, 4)
    with pytest.raises(ValueError, match="lid_probs"):
        router(torch.randn(3, 5), None)
    with pytest.raises(ValueError, match="lid_probs must have shape"):
        router(torch.randn(3, 5), {"lid_probs": torch.rand(3, 3)})
    with pytest.raises(ValueError, match="moe.num_experts=4 must equal num_languages=3"):
        create_model("moe_conformer_debug", moe={"router": "language", "num_experts": 4}, num_languages=3)


def test_lid_posteriors_gate_every_moe_layer_of_the_model():
    torch.manual_seed(1)
    model = create_model("moe_conformer_tiny", moe={"router": "language"}, lid_layer=1, dropout=0.0).eval()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 6 and all(m.router is model.shared_router for m in moes)  # blocks 1..3, two FFNs each
    x, lengths = torch.randn(2, 40, 80), torch.tensor([40, 23])
    out, auxes = model.forward_with_aux(x, lengths)
    assert len(auxes) == len(moes)
    probs = torch.softmax(out.lid_logits_BLA.float(), -1)[out.mask_BL]  # real frames only
    for aux in auxes:
        r = aux.routing
        assert r.num_tokens == probs.shape[0]
        assert r.token_idx_N.tolist() == list(range(probs.shape[0]))
        assert r.expert_idx_N.tolist() == probs.argmax(-1).tolist()
        torch.testing.assert_close(r.gate_N, probs.max(-1).values)
    # The gates carry the ASR gradient into the LID head (the shared pre-router).
    out.log_probs_BLV[out.mask_BL][:, 5].sum().backward()
    assert model.lid_head[-1].weight.grad.abs().sum() > 0


def test_global_embedding_router_matches_oracle_and_gradients():
    torch.manual_seed(2)
    router = GlobalEmbeddingRouter(4, 3, embed_dim=2, top_k=1, balance_coef=0.0)
    moe = MoE(4, 6, num_experts=3, top_k=1, router=router)
    x = torch.randn(2, 5, 4, requires_grad=True)
    g = torch.randn(2, 2, requires_grad=True)  # per sample
    y, aux = moe(x, side={"global_embedding": g})
    grads = torch.autograd.grad(y.square().sum(), (x, g, router.gate.weight))
    x2, g2 = x.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    w2 = router.gate.weight.detach().clone().requires_grad_()
    rows = []
    for b in range(2):
        xg = torch.cat([x2[b], g2[b].expand(5, 2)], dim=-1)
        probs = torch.softmax(xg @ w2.t(), dim=-1)
        pairs = oracles.topk_pairs(probs.detach(), 1, normalize=False)
        tok = torch.tensor([p[0] for p in pairs])
        exp = torch.tensor([p[1] for p in pairs])
        rows.append(oracles.expert_ffn(x2[b], tok, exp, probs[tok, exp], moe.experts.w_in, moe.experts.w_out, "gelu"))
    y_ref = torch.stack(rows)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(y_ref.square().sum(), (x2, g2, w2))
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_global_embedding_changes_the_routing_of_identical_frames():
    router = GlobalEmbeddingRouter(3, 2, embed_dim=1, top_k=1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, -5.0]]))
    moe = MoE(3, 4, num_experts=2, top_k=1, router=router)
    x = torch.ones(2, 4, 3)
    _, aux = moe(x, side={"global_embedding": torch.tensor([[1.0], [-1.0]])})
    assert aux.routing.expert_idx_N.tolist() == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="global_embedding"):
        moe(x)
    assert isinstance(get_router("global_embedding", 3, 2, embed_dim=1), GlobalEmbeddingRouter)


def _routing(experts, gates=None):
    experts = torch.tensor(experts)
    t = torch.arange(experts.numel())
    gates = torch.ones(experts.numel()) if gates is None else torch.tensor(gates)
    return RoutingResult(t, experts, gates, experts.numel(), 3)


def test_cross_layer_agreement_by_hand():
    a, b, c = _routing([0, 1, 2, 0]), _routing([0, 1, 1, 0]), _routing([2, 0, 0, 2])
    assert cross_layer_agreement([a, b]) == pytest.approx(0.75)
    assert cross_layer_agreement([a, b, c]) == pytest.approx((0.75 + 0.0) / 2)
    # c is b with experts renamed (0->2, 1->0): matched agreement 1, raw 0.
    assert cross_layer_agreement([b, c], matched=True) == pytest.approx(1.0)
    assert cross_layer_agreement([a]) != cross_layer_agreement([a])  # nan with one layer
    # top-1 of a token with two pairs is its larger gate; a token with no pair is -1.
    two = RoutingResult(torch.tensor([0, 0, 2]), torch.tensor([1, 2, 0]), torch.tensor([0.3, 0.7, 1.0]), 3, 3)
    assert top1_assignment(two).tolist() == [2, -1, 0]
    with pytest.raises(ValueError, match="same tokens"):
        cross_layer_agreement([a, _routing([0, 1])])


def test_routers_survive_deepcopy_and_state_dict_roundtrip():
    model = create_model("moe_conformer_debug", moe={"router": "omni"})
    clone = copy.deepcopy(model)
    routers = {id(m.router) for m in clone.modules() if isinstance(m, MoE)}
    assert len(routers) == 1
    fresh = create_model("moe_conformer_debug", moe={"router": "omni"})
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.shared_router.gate.weight, model.shared_router.gate.weight)
