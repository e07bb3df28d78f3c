"""CartesianMoE (``moezoo.layers.CartesianMoE``): two routed sub-layers A then B, against a float64 token-by-token
oracle (output, balance losses and the gradients to the input, both sub-layers' experts and routers and the inner
norm) on the reference and fused CPU backends; its invariants (the pure product ``g_B B_j(g_A A_i(x))`` without
residual and norm, top-k's active width and total expert parameters, padding), state, batch independence at
evaluation for every sparse router, the spec and the clear errors."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import ROUTERS, CartesianMoE, MoE, update_router_states
from moezoo.models import create_model
from moezoo.models.spec import MoESpec
from moezoo.stats import count_parameters
from tests import oracles_layer_options as naive
from tests.layers.sides import assert_eval_batch_independent

DIM, F, E = 6, 10, 4


def _layer(k=1, inner=True, norm=True, activation="gelu", bias=False, backend="torch", **kwargs) -> CartesianMoE:
    torch.manual_seed(0)
    layer = CartesianMoE(
        DIM, F, E, k, inner_residual=inner, inner_norm=norm, activation=activation, bias=bias, backend=backend, **kwargs
    )
    if layer.norm is not None:  # a norm that is not the identity, so that its gradients are tested
        with torch.no_grad():
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.uniform_(-0.5, 0.5)
    return layer.double().train()


def _experts(moe: MoE) -> dict:
    ex = moe.experts
    out = {"w_in": ex.w_in, "w_out": ex.w_out, "b_in": ex.b_in, "b_out": ex.b_out}
    if moe.shared is not None:
        out |= {"shared_in": moe.shared.fc_in.weight, "shared_out": moe.shared.fc_out.weight}
    return out


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "k,inner,norm,activation,bias,shared",
    [
        (1, True, True, "gelu", False, 0),
        (2, True, True, "swiglu", True, 0),
        (2, False, False, "gelu", False, 0),
        (1, False, True, "silu", False, 1),
        (E, True, False, "gelu", True, 0),  # every expert of each sub-layer
    ],
)
def test_matches_the_loop_oracle_with_gradients(backend, k, inner, norm, activation, bias, shared):
    layer = _layer(k, inner, norm, activation, bias, backend, num_shared_experts=shared)
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    norm_params = (layer.norm.weight, layer.norm.bias) if layer.norm is not None else None
    want_y, want_balance = naive.cartesian_moe(
        x.reshape(-1, DIM),
        layer.router.gate.weight.double(),
        _experts(layer),
        layer.sub_b.router.gate.weight.double(),
        _experts(layer.sub_b),
        activation,
        k,
        inner,
        norm_params,
    )
    want_y = want_y.reshape(x.shape)
    # the routers compute in fp32 (every router's rule), the experts in the layer's float64
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux.losses["balance"], want_balance.float(), atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(y)
    params = [x, *layer.parameters()]
    names = ["x", *(n for n, _ in layer.named_parameters())]
    got = torch.autograd.grad((y * weight).sum() + aux.aux_loss, params)
    want = torch.autograd.grad((want_y * weight).sum() + want_balance, params)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert name == "x" or g.abs().sum() > 0, f"{name} gets no gradient"
    # A's E counts then B's E, each sub-layer K pairs per token
    assert aux.tokens_per_expert_E.shape == (2 * E,) and aux.num_tokens == 10
    assert float(aux.tokens_per_expert_E[:E].sum()) == float(aux.tokens_per_expert_E[E:].sum()) == 10 * k


def test_without_residual_and_norm_a_top_1_token_gets_the_product_expert():
    """``inner_residual=False, inner_norm=False``, K = 1: ``y_t = g_B B_j(g_A A_i(x_t))`` with ``i`` A's choice for
    ``x_t`` and ``j`` B's choice for ``g_A A_i(x_t)``: the composition of one A and one B expert."""
    layer = _layer(k=1, inner=False, norm=False)
    x = torch.randn(7, DIM, dtype=torch.float64)
    y, aux = layer(x)
    a_routing = aux.routing
    assert a_routing is not None
    for t in range(7):
        (pair,) = (a_routing.token_idx_N == t).nonzero().flatten().tolist()
        i, g_a = int(a_routing.expert_idx_N[pair]), a_routing.gate_N[pair].double()
        ex_a, ex_b = layer.experts, layer.sub_b.experts
        a = g_a * (torch.nn.functional.gelu(x[t] @ ex_a.w_in[i]) @ ex_a.w_out[i])
        probs = torch.softmax((layer.sub_b.router.gate.weight.double() @ a).float(), -1)
        j = int(probs.argmax())
        want = probs[j].double() * (torch.nn.functional.gelu(a @ ex_b.w_in[j]) @ ex_b.w_out[j])
        torch.testing.assert_close(y[t], want, atol=1e-6, rtol=1e-5)


def test_padding_is_masked_in_both_sub_layers():
    layer = _layer(k=2)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    padded = x.clone()
    padded[0, 2:] = 50.0
    y, aux = layer(x, mask)
    y_pad, _ = layer(padded, mask)
    torch.testing.assert_close(y, y_pad)
    assert (y[0, 2:] == 0).all() and aux.num_tokens == 6
    assert float(aux.tokens_per_expert_E.sum()) == 2 * 6 * 2


def test_active_width_and_parameters_equal_top_k_of_the_full_width():
    """Sub-layers of F/2-wide experts: K per sub-layer is top-k's active width K*F and top-k's expert parameters."""
    torch.manual_seed(1)
    layer = CartesianMoE(DIM, F, 8, 2, num_shared_experts=1)
    plain = MoE(DIM, F, 8, 2, num_shared_experts=1)
    assert layer.active_ffn_dim == plain.active_ffn_dim == 2 * F + F
    expert_params = sum(p.numel() for m in (layer, layer.sub_b) for p in m.experts.parameters())
    assert expert_params == sum(p.numel() for p in plain.experts.parameters())
    counts, plain_counts = count_parameters(layer), count_parameters(plain)
    extra = layer.sub_b.router.gate.weight.numel() + 2 * DIM  # B's gate and the inner norm
    assert counts.total - plain_counts.total == extra and counts.active - plain_counts.active == extra


def test_state_round_trips_and_each_sub_layer_updates_its_router_state():
    torch.manual_seed(2)
    layer = CartesianMoE(DIM, F, E, 1, router="sigmoid_lossfree").train()
    x = torch.randn(3, 5, DIM)
    y, aux = layer(x)
    (y.square().sum() + aux.aux_loss).backward()
    update_router_states(layer)
    assert layer.router.expert_bias.abs().sum() > 0 and layer.sub_b.router.expert_bias.abs().sum() > 0
    fresh = CartesianMoE(DIM, F, E, 1, router="sigmoid_lossfree")
    fresh.load_state_dict(layer.state_dict())
    assert "sub_b.router.expert_bias" in layer.state_dict()
    torch.testing.assert_close(fresh.eval()(x)[0], layer.eval()(x)[0], rtol=0, atol=0)


SPARSE = [n for n in sorted(ROUTERS) if ROUTERS[n].kind == "sparse" and not ROUTERS[n].carries_state]


@pytest.mark.parametrize("name", SPARSE)
def test_eval_output_of_an_item_does_not_depend_on_its_batchmates(name):
    torch.manual_seed(0)
    layer = CartesianMoE(8, 16, 4, 2, router=name, backend="reference").eval()
    assert_eval_batch_independent(layer, dim=8)


def test_spec_builds_it_and_names_bad_settings():
    moe = {"num_experts": 4, "top_k": 1, "layer": "cartesian", "layer_kwargs": {"inner_norm": False}}
    model = create_model("moe_vit_debug", moe=moe)
    layers = [m for m in model.modules() if isinstance(m, CartesianMoE)]
    assert layers and all(m.norm is None for m in layers)
    with pytest.raises(TypeError, match="layer 'cartesian' does not accept \\['noise_std'\\]"):
        MoESpec(layer="cartesian", layer_kwargs={"noise_std": 1.0})
    with pytest.raises(ValueError, match="moe.layer must be 'moe' or one of \\['cartesian', 's2moe'"):
        MoESpec(layer="product")
    with pytest.raises(ValueError, match="needs a sparse router built per layer"):
        MoESpec(layer="cartesian", router="soft")
    with pytest.raises(ValueError, match="needs a sparse router built per layer"):
        MoESpec(layer="cartesian", num_iterations=2)
    with pytest.raises(ValueError, match="refuses router 'recurrent'"):
        MoESpec(layer="cartesian", router="recurrent")
    with pytest.raises(ValueError, match="needs a layer option"):
        MoESpec(layer_kwargs={"inner_norm": False})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"ffn_dim": 9}, ValueError, "it must be even, got 9"),
        ({"inner_norm": 1}, TypeError, "inner_norm must be True or False"),
        ({"inner_residual": None}, TypeError, "inner_residual must be True or False"),
        ({"router": "soft"}, ValueError, "router must be a sparse router that carries no state"),
        ({"router": "recurrent"}, ValueError, "router must be a sparse router that carries no state"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = {"dim": DIM, "ffn_dim": F, "num_experts": E, "top_k": 1, **kwargs}
    with pytest.raises(error, match=match):
        CartesianMoE(**args)


def test_compiles_fullgraph_and_matches_eager():
    layer = _layer(k=2).float()
    x = torch.randn(2, 5, DIM, requires_grad=True)
    y, aux = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum() + aux.aux_loss, x)
    torch._dynamo.reset()
    y_c, aux_c = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    (gx_c,) = torch.autograd.grad(y_c.square().sum() + aux_c.aux_loss, x)
    torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_c, gx, atol=1e-5, rtol=1e-4)
