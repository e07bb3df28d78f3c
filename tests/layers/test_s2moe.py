"""S2MoE (``moezoo.layers.StochasticMoE``): the clean and the Gaussian-noise-perturbed token through the same router
and experts, mixed by a learned per-token gate, with an InfoNCE loss between the two outputs; against a float64
token-by-token oracle (output, losses, and the gradients to the input, the experts, the router and the path gate) on
the reference and fused CPU backends; its invariants (the plain MoE layer at evaluation, the gate drops out when the
noise vanishes, the loss is per sample and ignores padding), state, batch independence, the spec and the errors."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import ROUTERS, MoE, StochasticMoE, update_router_states
from moezoo.layers.stochastic import group_info_nce
from moezoo.models import create_model
from moezoo.models.spec import MoESpec
from tests import oracles_layer_options as naive
from tests.layers.sides import assert_eval_batch_independent

DIM, F, E = 6, 5, 4


def _layer(k=2, activation="gelu", bias=False, backend="torch", **kwargs) -> StochasticMoE:
    torch.manual_seed(0)
    layer = StochasticMoE(DIM, F, E, k, activation=activation, bias=bias, backend=backend, **kwargs)
    with torch.no_grad():  # a path gate that is not the constant 1/2, so that its gradients are tested
        layer.path_gate.weight.normal_(0.0, 0.5)
        layer.path_gate.bias.fill_(0.3)
    return layer.double().train()


def _experts(moe: MoE) -> dict:
    ex = moe.experts
    return {"w_in": ex.w_in, "w_out": ex.w_out, "b_in": ex.b_in, "b_out": ex.b_out}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "k,activation,bias,noise_std,coef",
    [(2, "gelu", False, 1.0, 0.5), (1, "swiglu", True, 0.3, 0.1), (E, "gelu", False, 2.0, 0.0)],
)
def test_matches_the_loop_oracle_with_gradients(backend, k, activation, bias, noise_std, coef):
    layer = _layer(k, activation, bias, backend, noise_std=noise_std, uncertainty_coef=coef, temperature=0.5)
    x = torch.randn(3, 4, DIM, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y, aux = layer(x)
    torch.manual_seed(7)  # the top-k router draws nothing: the layer's one draw is the noise (same order, same shape)
    eps = torch.randn_like(x)
    groups = [[4 * b + i for i in range(4)] for b in range(3)]  # (B, L, D): the samples are the InfoNCE groups
    want_y, want_loss = naive.s2moe(
        x.reshape(-1, DIM),
        eps.reshape(-1, DIM),
        noise_std,
        layer.router.gate.weight.double(),
        _experts(layer),
        layer.path_gate.weight[0],
        layer.path_gate.bias[0],
        activation,
        k,
        groups,
        coef,
        0.5,
    )
    want_y = want_y.reshape(x.shape)
    assert set(aux.losses) == ({"balance", "uncertainty"} if coef else {"balance"})
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux.aux_loss.double(), want_loss, atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(y)
    params = [x, *layer.parameters()]
    names = ["x", *(n for n, _ in layer.named_parameters())]
    got = torch.autograd.grad((y * weight).sum() + aux.aux_loss, params)
    want = torch.autograd.grad((want_y * weight).sum() + want_loss, params)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert g.abs().sum() > 0, f"{name} gets no gradient"
    # two passes (clean and noisy) over the same experts, K pairs per token each
    assert float(aux.tokens_per_expert_E.sum()) == 2 * 12 * k and aux.num_tokens == 12


def test_evaluation_is_the_moe_layer_with_the_same_parameters():
    """No noise at evaluation (``x' = x``): the output is the MoE layer's for any path gate, in one pass."""
    torch.manual_seed(3)
    plain = MoE(DIM, F, E, 2, activation="swiglu", num_shared_experts=1).eval()
    layer = StochasticMoE(DIM, F, E, 2, activation="swiglu", num_shared_experts=1).eval()
    missing = layer.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["path_gate.bias", "path_gate.weight"]
    with torch.no_grad():
        layer.path_gate.weight.normal_()
    x = torch.randn(2, 5, DIM)
    y, aux = layer(x)
    y_plain, aux_plain = plain(x)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    assert set(aux.losses) == {"balance"} and float(aux.tokens_per_expert_E.sum()) == 2 * 10
    torch.testing.assert_close(layer(x)[0], y, rtol=0, atol=0)  # deterministic


def test_when_the_noise_vanishes_the_gate_drops_out_and_the_loss_is_the_infonce_floor():
    """With ``x' ~= x`` both outputs agree: ``y = MoE(x)`` for any gate, and the InfoNCE of identical outputs is its
    lowest value given the other tokens (each token's positive is itself)."""
    layer = _layer(noise_std=1e-9, uncertainty_coef=1.0).float()
    x = torch.randn(2, 5, DIM)
    y, aux = layer(x)
    y_plain, _ = MoE.forward(layer, x)
    torch.testing.assert_close(y, y_plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        aux.losses["uncertainty"], group_info_nce(y_plain.view(2, 5, DIM), y_plain.view(2, 5, DIM), None, 0.1)
    )


def test_the_uncertainty_loss_is_per_sample_and_ignores_padding():
    torch.manual_seed(4)
    clean, noisy = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    whole = group_info_nce(clean, noisy, None, 0.2)
    each = torch.stack([group_info_nce(clean[i : i + 1], noisy[i : i + 1], None, 0.2) for i in range(3)])
    torch.testing.assert_close(whole, each.mean())  # equal lengths: the mean of the samples' losses
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True] * 5])
    garbage_c, garbage_n = clean.clone(), noisy.clone()
    garbage_c[1, 3:], garbage_n[1, 3:] = 1e3, -1e3
    masked = group_info_nce(garbage_c, garbage_n, mask, 0.2)
    short = group_info_nce(clean[1:2, :3], noisy[1:2, :3], None, 0.2)
    want = (5 * each[0] + 3 * short + 5 * each[2]) / 13  # the mean over the 13 real tokens
    torch.testing.assert_close(masked, want)
    assert float(group_info_nce(clean[:, :1], noisy[:, :1], None, 0.2)) == 0.0  # one token: its own positive only


def test_padding_gets_no_output_and_no_loss():
    layer = _layer(k=2)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    padded = x.clone()
    padded[0, 2:] = 50.0
    torch.manual_seed(5)
    y, aux = layer(x, mask)
    torch.manual_seed(5)
    y_pad, aux_pad = layer(padded, mask)
    torch.testing.assert_close(y, y_pad)
    torch.testing.assert_close(aux.aux_loss, aux_pad.aux_loss)
    assert (y[0, 2:] == 0).all() and aux.num_tokens == 6


def test_state_round_trips_and_the_router_state_updates():
    torch.manual_seed(6)
    layer = StochasticMoE(DIM, F, E, 1, router="sigmoid_lossfree").train()
    x = torch.randn(3, 5, DIM)
    y, aux = layer(x)
    (y.square().sum() + aux.aux_loss).backward()
    assert float(layer.router.pending_load.sum()) == 2 * 15  # both passes observed
    update_router_states(layer)
    with torch.no_grad():
        layer.path_gate.weight.normal_()
    fresh = StochasticMoE(DIM, F, E, 1, router="sigmoid_lossfree")
    fresh.load_state_dict(layer.state_dict())
    for name, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    torch.testing.assert_close(fresh.eval()(x)[0], layer.eval()(x)[0], rtol=0, atol=0)


SPARSE = [n for n in sorted(ROUTERS) if ROUTERS[n].kind == "sparse" and not ROUTERS[n].carries_state]


@pytest.mark.parametrize("name", SPARSE)
def test_eval_output_of_an_item_does_not_depend_on_its_batchmates(name):
    torch.manual_seed(0)
    layer = StochasticMoE(8, 16, 4, 2, router=name, backend="reference").eval()
    assert_eval_batch_independent(layer, dim=8)


def test_spec_builds_it_and_names_bad_settings():
    moe = {"num_experts": 4, "top_k": 2, "layer": "s2moe", "layer_kwargs": {"noise_std": 0.5}}
    model = create_model("moe_vit_debug", moe=moe)
    layers = [m for m in model.modules() if isinstance(m, StochasticMoE)]
    assert layers and all(m.noise_std == 0.5 for m in layers)
    with pytest.raises(TypeError, match="layer 's2moe' does not accept \\['inner_norm'\\]"):
        MoESpec(layer="s2moe", layer_kwargs={"inner_norm": True})
    with pytest.raises(ValueError, match="needs a sparse router built per layer"):
        MoESpec(layer="s2moe", router="smear")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"noise_std": 0.0}, ValueError, "noise_std must be a finite number > 0, got 0.0"),
        ({"noise_scale_std": -1.0}, ValueError, "noise_scale_std must be a finite number >= 0"),
        ({"uncertainty_coef": "1"}, TypeError, "uncertainty_coef must be a finite number >= 0"),
        ({"temperature": 0}, ValueError, "temperature must be a finite number > 0, got 0"),
        ({"router": "soft"}, ValueError, "router must be a sparse router that carries no state"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        StochasticMoE(DIM, F, E, 1, **kwargs)


def test_multiplicative_noise_is_drawn_after_the_additive_noise():
    layer = _layer(noise_std=0.5, noise_scale_std=0.2)
    x = torch.randn(3, DIM, dtype=torch.float64)
    torch.manual_seed(8)
    got = layer.perturb(x)
    torch.manual_seed(8)
    eps_add, eps_mul = torch.randn_like(x), torch.randn_like(x)
    rms = x.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(got, x * (1 + 0.2 * eps_mul) + 0.5 * rms * eps_add)


def test_compiles_fullgraph_and_matches_eager():
    layer = _layer(k=2).float()
    x = torch.randn(2, 5, DIM, requires_grad=True)
    torch.manual_seed(9)
    y, aux = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum() + aux.aux_loss, x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(9)
    y_c, aux_c = compiled(x)
    (gx_c,) = torch.autograd.grad(y_c.square().sum() + aux_c.aux_loss, x)
    torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_c, gx, atol=1e-5, rtol=1e-4)


def test_expert_parallelism_refuses_it():
    from moezoo.parallel import ExpertParallelGroups, shard_experts

    groups = ExpertParallelGroups(None, None, ep_size=2, ep_rank=0, num_replicas=1, world_size=2, timeout_s=1.0)
    with pytest.raises(ValueError, match="is a StochasticMoE \\(S2MoE: a clean and a noisy routed pass"):
        shard_experts(torch.nn.Sequential(StochasticMoE(DIM, F, E, 1)), groups)
