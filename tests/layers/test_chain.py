"""Chain-of-Experts (``moezoo.layers.ChainOfExperts``): C routed passes over one layer's experts, a router per pass,
against a float64 token-by-token loop oracle (output, losses and the gradients to the input, the experts and every
iteration's router), on the reference and fused CPU backends; its identities (one iteration is the MoE layer), the
statistics, state, compile, and the clear errors and refusals."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import ChainOfExperts, MoE, get_router, update_router_states
from moezoo.parallel import ExpertParallelGroups, shard_experts
from moezoo.stats import count_parameters
from moezoo.surgery import ExpertStats, prune_experts
from tests import oracles_routers as naive

DIM, F, E = 6, 5, 4


def _chain(k=1, iterations=2, inner=True, activation="gelu", bias=False, backend="torch", **kwargs):
    torch.manual_seed(0)
    chain = ChainOfExperts(
        DIM,
        F,
        E,
        k,
        num_iterations=iterations,
        inner_residual=inner,
        activation=activation,
        bias=bias,
        backend=backend,
        **kwargs,
    )
    return chain.double().train()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("iterations,k,inner", [(2, 1, True), (3, 2, True), (2, 2, False), (1, 2, True)])
@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", True)])
def test_chain_matches_the_loop_oracle_with_gradients(backend, iterations, k, inner, activation, bias):
    chain = _chain(k, iterations, inner, activation, bias, backend)
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    y, aux = chain(x)
    ex = chain.experts
    gates = [r.gate.weight.double() for r in chain.routers]
    want_y, want_balance = naive.chain_of_experts(
        x.reshape(-1, DIM), gates, ex.w_in, ex.w_out, activation, k, inner, ex.b_in, ex.b_out
    )
    want_y = want_y.reshape(x.shape)
    # the routers compute in fp32 (every router's rule), the experts in the layer's float64
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux.losses["balance"], want_balance.float(), atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(y)
    params = [x, *chain.parameters()]
    names = ["x", *(n for n, _ in chain.named_parameters())]
    got = torch.autograd.grad((y * weight).sum() + aux.aux_loss, params)
    want = torch.autograd.grad((want_y * weight).sum() + want_balance, params)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert len(names) == 1 + 2 + 2 * bias + iterations  # x, the experts, one gate per iteration
    assert float(aux.tokens_per_expert_E.sum()) == iterations * 10 * k and aux.num_tokens == 10


def test_one_iteration_is_the_moe_layer():
    """Built from the same seed, a chain of one iteration has the MoE layer's parameters and output."""
    torch.manual_seed(3)
    moe = MoE(DIM, F, E, 2, activation="swiglu", num_shared_experts=1)
    torch.manual_seed(3)
    chain = ChainOfExperts(DIM, F, E, 2, num_iterations=1, activation="swiglu", num_shared_experts=1)
    assert chain.state_dict().keys() == moe.state_dict().keys()
    x = torch.randn(3, 4, DIM)
    y_moe, aux_moe = moe(x)
    y_chain, aux_chain = chain(x)
    torch.testing.assert_close(y_chain, y_moe, rtol=0, atol=0)
    torch.testing.assert_close(aux_chain.aux_loss, aux_moe.aux_loss, rtol=0, atol=0)


def test_each_iteration_reroutes_the_refined_token():
    """The second pass routes ``x + MoE_1(x)``, not ``x``: with identical router weights the chain still differs
    from two passes over the input, and each router gets its own gradient."""
    chain = _chain(k=1, iterations=2)
    with torch.no_grad():
        chain.chain_routers[0].gate.weight.copy_(chain.router.gate.weight)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    y, aux = chain(x)
    out1, _ = MoE._forward_sparse(chain, x, None, None, chain.router)
    out2, _ = MoE._forward_sparse(chain, x + out1, None, None, chain.chain_routers[0])
    torch.testing.assert_close(y, out1 + out2)
    (y.square().sum() + aux.aux_loss).backward()
    g1, g2 = chain.router.gate.weight.grad, chain.chain_routers[0].gate.weight.grad
    assert g1 is not None and g2 is not None and not torch.allclose(g1, g2)


def test_padding_is_masked_in_every_iteration():
    chain = _chain(k=2, iterations=3)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    padded = x.clone()
    padded[0, 2:] = 50.0
    y, aux = chain(x, mask)
    y_pad, _ = chain(padded, mask)
    torch.testing.assert_close(y, y_pad)
    assert (y[0, 2:] == 0).all() and aux.num_tokens == 6
    assert float(aux.tokens_per_expert_E.sum()) == 3 * 6 * 2


@pytest.mark.parametrize("router,kwargs", [("aoe", {}), ("compete", {"compete_prob": 1.0}), ("sigmoid_lossfree", {})])
def test_any_sparse_router_chains_and_every_router_updates_its_state(router, kwargs):
    torch.manual_seed(1)
    chain = ChainOfExperts(DIM, F, E, 1, num_iterations=2, router=router, router_kwargs=kwargs).train()
    assert all(type(r) is type(chain.router) for r in chain.routers) and len(set(map(id, chain.routers))) == 2
    x = torch.randn(2, 5, DIM)
    y, aux = chain(x)
    (y.square().sum() + aux.aux_loss).backward()
    before = [{n: b.clone() for n, b in r.named_buffers()} for r in chain.routers]
    update_router_states(chain)
    for r, old in zip(chain.routers, before):
        for name, value in r.named_buffers():
            if name in ("expert_bias", "step"):
                assert not torch.equal(value, old[name]), name


def test_statistics_state_and_active_compute():
    torch.manual_seed(2)
    chain = ChainOfExperts(DIM, F, 8, 1, num_iterations=2, num_shared_experts=1).train()
    assert chain.active_ffn_dim == 2 * (1 * F + F)
    counts = count_parameters(chain)
    experts = sum(p.numel() for p in chain.experts.parameters())
    shared = sum(p.numel() for p in chain.shared.parameters())
    routers = sum(p.numel() for r in chain.routers for p in r.parameters())
    assert counts.total == experts + shared + routers
    assert counts.active == round(experts * 2 / 8) + shared + routers
    fresh = ChainOfExperts(DIM, F, 8, 1, num_iterations=2, num_shared_experts=1)
    fresh.load_state_dict(chain.state_dict())
    x = torch.randn(2, 3, DIM)
    torch.testing.assert_close(fresh.eval()(x)[0], chain.eval()(x)[0], rtol=0, atol=0)


def test_compiles_fullgraph_and_matches_eager():
    chain = _chain(k=2, iterations=2).float()
    x = torch.randn(2, 5, DIM, requires_grad=True)
    y, aux = chain(x)
    (gx,) = torch.autograd.grad((y.square().sum() + aux.aux_loss), x)
    torch._dynamo.reset()
    y_c, aux_c = torch.compile(chain, fullgraph=True, backend="aot_eager")(x)
    (gx_c,) = torch.autograd.grad((y_c.square().sum() + aux_c.aux_loss), x)
    torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_c, gx, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_iterations": 0}, ValueError, "num_iterations must be an integer >= 1, got 0"),
        ({"num_iterations": 2.0}, TypeError, "num_iterations must be an integer >= 1"),
        ({"inner_residual": "yes"}, TypeError, "inner_residual must be True or False"),
        ({"router": "soft"}, ValueError, "router must be a sparse router, got 'soft'"),
        ({"router": "smear"}, ValueError, "router must be a sparse router, got 'smear'"),
        ({"router": get_router("topk", DIM, E)}, TypeError, "router must be a registered router name, got TopKRouter"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        ChainOfExperts(DIM, F, E, 1, **kwargs)


def test_expert_parallelism_and_pruning_refuse_a_chain():
    chain = ChainOfExperts(DIM, F, E, 1, num_iterations=2)
    groups = ExpertParallelGroups(None, None, ep_size=2, ep_rank=0, num_replicas=1, world_size=2, timeout_s=1.0)
    with pytest.raises(ValueError, match="is a ChainOfExperts \\(2 routed passes over its experts\\)"):
        shard_experts(torch.nn.Sequential(chain), groups)
    with pytest.raises(ValueError, match="these layers are ChainOfExperts: \\['0'\\]"):
        prune_experts(torch.nn.Sequential(chain), 2, stats={"0": ExpertStats.empty(E)})


def test_the_first_pass_is_the_layer_forward_with_its_checks_and_warnings():
    """Input checks and the evaluation warning of a batch-dependent rule come from MoE.forward (the first pass);
    a batch-dependent router (expert choice) chains like any other."""
    chain = ChainOfExperts(DIM, F, E, 1, num_iterations=2, router="expert_choice", router_kwargs={"eval_rule": "batch"})
    x = torch.randn(2, 5, DIM)
    y, aux = chain.train()(x)
    # each expert takes ceil(10 tokens x 1 / 4 experts) = 3 tokens in each of the 2 passes
    assert y.shape == x.shape and aux.tokens_per_expert_E.tolist() == [6.0] * 4
    with pytest.warns(UserWarning, match="keeps its batch-dependent routing rule at evaluation"):
        chain.eval()(x)
    with pytest.raises(ValueError, match="x must have last dimension dim=6"):
        chain(torch.randn(2, 5, DIM + 1))
