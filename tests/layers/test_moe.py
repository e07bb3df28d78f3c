"""The MoE layer: every router x backend against the oracle, Soft MoE, masks, shared experts, bad input."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import FeedForward, MoE, TopKRouter, update_router_states
from moezoo.layers.losses import routing_entropy
from moezoo.layers.moe import all_finite
from tests import oracles

SPARSE_ROUTERS = ["topk", "sigmoid_lossfree", "expert_choice", "sinkhorn", "relu"]
BACKENDS = ["reference", "torch"]


def oracle_moe(moe: MoE, x, routing):
    x_TD = x.reshape(-1, moe.dim)
    out = oracles.expert_ffn(
        x_TD,
        routing.token_idx_N,
        routing.expert_idx_N,
        routing.gate_N,
        moe.experts.w_in,
        moe.experts.w_out,
        moe.experts.activation,
    )
    if moe.shared is not None:
        out = out + torch.stack(
            [
                oracles.expert_forward(
                    row, moe.shared.fc_in.weight.t(), moe.shared.fc_out.weight.t(), moe.experts.activation
                )
                for row in x_TD
            ]
        )
    return out.reshape(x.shape)


@pytest.mark.parametrize("router", SPARSE_ROUTERS + ["topk_capacity", "topk_null"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_matches_oracle(router, backend, activation):
    kwargs = {}
    name = router
    if router == "topk_capacity":
        name, kwargs = "topk", {"capacity_factor": 0.75, "drop_policy": "batch_priority"}
    elif router == "topk_null":
        name, kwargs = "topk", {"num_null_experts": 2}
    torch.manual_seed(1)
    moe = (
        MoE(
            12,
            10,
            num_experts=4,
            top_k=2,
            router=name,
            router_kwargs=kwargs,
            activation=activation,
            num_shared_experts=1,
            backend=backend,
        )
        .double()
        .train()
    )
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 7, 12, dtype=torch.float64)

    captured = {}
    original_forward = moe.router.forward

    def capture(*args, **kw):
        captured["routing"] = original_forward(*args, **kw)
        return captured["routing"]

    moe.router.forward = capture
    y, aux = moe(x)
    params = [x] + list(moe.parameters())
    got = torch.autograd.grad((y * weight).sum(), params, allow_unused=True, retain_graph=True)
    want_y = oracle_moe(moe, x, captured["routing"])
    want = torch.autograd.grad((want_y * weight).sum(), params, allow_unused=True)
    torch.testing.assert_close(y, want_y, atol=1e-9, rtol=1e-8)
    for (pname, _), g, w in zip([("x", x)] + list(moe.named_parameters()), got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0, pname
            continue
        # router weights see fp32 gates: compare at fp32 precision
        tol = dict(atol=1e-5, rtol=1e-4) if "router" in pname else dict(atol=1e-9, rtol=1e-8)
        torch.testing.assert_close(g, w, **tol, msg=lambda m, p=pname: f"{p}: {m}")
    assert aux.tokens_per_expert_E.sum() == captured["routing"].expert_idx_N.numel()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_soft_moe_matches_oracle(activation):
    moe = MoE(
        8, 6, num_experts=3, top_k=1, router="soft", router_kwargs={"slots_per_expert": 2}, activation=activation
    ).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    y, aux = moe(x)
    want = oracles.soft_moe(
        x,
        moe.router.gate.weight.double(),
        moe.router.scale.double(),
        2,
        moe.experts.w_in,
        moe.experts.w_out,
        activation,
    )
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)  # router logits are computed in fp32
    (gx,) = torch.autograd.grad(y.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, wx, atol=1e-5, rtol=1e-4)
    assert float(aux.expert_load_cv) == 0.0


def test_soft_moe_mask_excludes_padding():
    moe = MoE(8, 6, num_experts=2, top_k=1, router="soft", router_kwargs={"slots_per_expert": 2})
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, True, False, False]])
    y, _ = moe(x, mask=mask)
    x2 = x.clone()
    x2[0, 4:] = 100.0  # padding content must not matter
    y2, _ = moe(x2, mask=mask)
    torch.testing.assert_close(y[0, :4], y2[0, :4])
    assert torch.equal(y[0, 4:], torch.zeros(2, 8))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_expert_moe_equals_dense_ffn(activation, backend):
    moe = MoE(8, 16, num_experts=1, top_k=1, router="topk", activation=activation, backend=backend)
    dense = FeedForward(8, 16, activation)
    with torch.no_grad():
        dense.fc_in.weight.copy_(moe.experts.w_in[0].t())
        dense.fc_out.weight.copy_(moe.experts.w_out[0].t())
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(moe(x)[0], dense(x))


def test_dropless_equals_infinite_capacity():
    torch.manual_seed(3)
    dropless = MoE(8, 8, num_experts=4, top_k=2)
    capped = MoE(8, 8, num_experts=4, top_k=2, router_kwargs={"capacity_factor": 4.0})
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(30, 8)
    torch.testing.assert_close(dropless(x)[0], capped(x)[0])
    assert float(capped(x)[1].dropped_frac) == 0.0


def test_dropped_tokens_get_zero_output():
    moe = MoE(8, 8, num_experts=4, top_k=1, router_kwargs={"capacity_factor": 0.25})
    x = torch.randn(40, 8)
    y, aux = moe(x)
    routed = torch.zeros(40, dtype=torch.bool)
    routed[aux.routing.token_idx_N] = True
    assert (~routed).any()
    assert torch.equal(y[~routed], torch.zeros_like(y[~routed]))
    torch.testing.assert_close(aux.dropped_frac, (~routed).float().mean())


def test_mask_tokens_are_not_routed_or_counted():
    moe = MoE(8, 8, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    y, aux = moe(x, mask=mask)
    assert aux.num_tokens == 7 and int(aux.tokens_per_expert_E.sum()) == 14
    assert torch.equal(y[1, 2:], torch.zeros(3, 8))
    y_valid, _ = moe(x[1, :2])
    torch.testing.assert_close(y[1, :2], y_valid)


def test_shared_router_and_state_updates_once():
    router = TopKRouter(8, 4, top_k=2)
    layers = [MoE(8, 8, num_experts=4, top_k=2, router=router) for _ in range(3)]
    assert all(layer.router is router for layer in layers)
    container = torch.nn.ModuleList(layers)
    assert sum(p.numel() for p in container.parameters()) == router.gate.weight.numel() + 3 * sum(
        p.numel() for p in layers[0].experts.parameters()
    )
    from moezoo.layers import SigmoidLossFreeRouter

    lossfree = SigmoidLossFreeRouter(8, 4, top_k=2, bias_update_rate=0.5)
    stack = torch.nn.ModuleList(MoE(8, 8, num_experts=4, top_k=2, router=lossfree) for _ in range(2)).train()
    x = torch.randn(10, 8)
    for layer in stack:
        layer(x)
    assert float(lossfree.pending_load.sum()) == 2 * 10 * 2
    update_router_states(stack)
    assert float(lossfree.expert_bias.abs().max()) in (0.0, 0.5)  # one step of +-rate, applied once


def test_per_sample_side_inputs_expand_to_tokens():
    seen = {}

    class Spy(TopKRouter):
        def forward(self, x_TD, side=None):
            seen.update(side or {})
            return super().forward(x_TD, side)

    moe = MoE(8, 8, num_experts=4, top_k=1, router=Spy(8, 4, top_k=1))
    labels = torch.tensor([3, 7])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    moe(torch.randn(2, 3, 8), mask=mask, side={"label": labels})
    assert seen["label"].tolist() == [3, 3, 7, 7, 7]


def test_fine_grained_experts_and_dense_twin_width():
    moe = MoE(8, 16, num_experts=4, top_k=2, granularity=2, num_shared_experts=1)
    assert moe.num_experts == 8 and moe.top_k == 4 and moe.expert_dim == 8
    assert moe.active_ffn_dim == 4 * 8 + 16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=5), "top_k must be an integer in \\[1, num_experts=4\\]"),
        (dict(router="nope"), "router='nope' is unknown"),
        (dict(router_kwargs={"capacity_factor": 0}), "capacity_factor must be a finite number > 0"),
        (dict(granularity=3), "granularity must be a positive integer dividing ffn_dim=8"),
        (dict(activation="tanh"), "activation='tanh'"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 8, **{"num_experts": 4, **kwargs})


def test_bad_input():
    moe = MoE(8, 8, num_experts=4)
    with pytest.raises(ValueError, match="last dimension dim=8"):
        moe(torch.randn(3, 7))
    with pytest.raises(ValueError, match="NaN or inf"):
        moe(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(ValueError, match="NaN or inf"):
        moe(torch.full((2, 8), float("inf")))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    x = torch.randn(37, 19).to(dtype)
    assert all_finite(x)
    for flat in (0, 5, 300, x.numel() - 1):
        y = x.clone()
        y.view(-1)[flat] = bad
        assert not all_finite(y), (flat, bad)
    assert all_finite(x[:0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_finite_when_the_sum_overflows(dtype):
    """Large finite values whose sum is inf are finite (the sum is only a fast path); a bad value is still found."""
    big = torch.full((5, 3), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    assert all_finite(-big) and all_finite(torch.cat([big, -big]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = big.clone()
        y[2, 1] = bad
        assert not all_finite(y), bad


def test_routing_entropy_with_and_without_gradients():
    probs = torch.softmax(torch.randn(7, 5) * 30, dim=-1)  # some probabilities below the 1e-12 clamp
    want = -sum(float(p) * torch.tensor(float(p)).clamp_min(1e-12).log().item() for p in probs.flatten()) / 7
    leaf = probs.clone().requires_grad_()
    with_grad = routing_entropy(leaf)
    with torch.no_grad():
        no_grad = routing_entropy(leaf)
    assert torch.equal(with_grad.detach(), no_grad) and torch.equal(routing_entropy(probs), no_grad)
    assert no_grad.item() == pytest.approx(want, rel=1e-5)
    with_grad.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf, probs)  # the input is never written


def test_layer_accepts_what_the_router_accepts():
    """Null experts raise the top-k bound; the layer leaves that bound to the router."""
    moe = MoE(8, 8, num_experts=4, top_k=6, router_kwargs={"num_null_experts": 2})
    y, aux = moe(torch.randn(5, 8))
    assert y.shape == (5, 8) and int(aux.tokens_per_expert_E.sum()) <= 5 * 6
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts \\+ num_null_experts=6\\]"):
        MoE(8, 8, num_experts=4, top_k=7, router_kwargs={"num_null_experts": 2})
    with pytest.raises(ValueError, match="top_k must be an integer in \\[1, num_experts=4\\], got 99"):
        MoE(8, 8, num_experts=4, top_k=99, router="soft")
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0.*got inf"):
        MoE(8, 8, num_experts=4, router_kwargs={"capacity_factor": float("inf")})
    with pytest.raises(TypeError, match="router_kwargs must not hold top_k"):
        MoE(8, 8, num_experts=4, router_kwargs={"top_k": 2})
    with pytest.raises(TypeError, match="router must be a registered router name or a Router instance"):
        MoE(8, 8, num_experts=4, router=torch.nn.Linear(8, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_other_than_the_layers_names_both(backend, dtype):
    moe = MoE(8, 8, num_experts=4, backend=backend)
    with pytest.raises(TypeError, match=f"x has dtype {dtype} but the layer's parameters are torch.float32"):
        moe(torch.randn(3, 8).to(dtype))
    with pytest.raises(TypeError, match="x must be a floating-point tensor .* got torch.int64"):
        moe(torch.ones(3, 8, dtype=torch.long))
    soft = MoE(8, 8, num_experts=4, router="soft")
    with pytest.raises(TypeError, match=f"x has dtype {dtype}"):
        soft(torch.randn(2, 3, 8).to(dtype))


@pytest.mark.parametrize("router", ["topk", "soft"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_fp32_layer(router, backend):
    """Under CPU autocast a bf16 input (what an autocast Linear returns) or an fp32 one is accepted."""
    moe = MoE(8, 8, num_experts=4, router=router, backend=backend, num_shared_experts=1)
    x = torch.randn(2, 5, 8)
    want, _ = moe(x)
    for inp in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = moe(inp)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want, atol=5e-2, rtol=5e-2)
        (y.float().sum() + aux.aux_loss).backward()
        assert moe.experts.w_in.grad is not None and moe.experts.w_in.grad.dtype == torch.float32


@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 8), (0, 3, 8)])
def test_soft_moe_on_empty_token_axis(shape):
    moe = MoE(8, 6, num_experts=3, top_k=1, router="soft", router_kwargs={"slots_per_expert": 2})
    x = torch.randn(*shape, requires_grad=True)
    y, aux = moe(x)
    assert y.shape == x.shape and aux.num_tokens == 0 and float(aux.router_entropy) == 0.0
    y.sum().backward()
    mask = torch.zeros(shape[:-1], dtype=torch.bool)
    assert moe(x, mask=mask)[0].shape == x.shape


@pytest.mark.parametrize("router", SPARSE_ROUTERS + ["soft"])
def test_all_tokens_masked(router):
    """A batch of padding only: no pair, zero output, finite statistics and losses."""
    moe = MoE(8, 6, num_experts=4, top_k=2, router=router, router_kwargs={"z_loss_coef": 1e-3}).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    y, aux = moe(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(y)) and aux.num_tokens == 0
    for value in (aux.aux_loss, aux.dropped_frac, aux.router_entropy, aux.expert_load_cv):
        assert torch.isfinite(value).all()
    (y.sum() + aux.aux_loss).backward()


def test_layer_dispatches_on_router_kind():
    """A router of kind "soft" takes the Soft MoE path, whatever its class is called."""
    from moezoo.layers import SoftMoERouter

    calls = []

    class MySoft(SoftMoERouter):
        def forward(self, x_GLD, mask_GL=None):
            calls.append(tuple(x_GLD.shape))
            return super().forward(x_GLD, mask_GL)

    moe = MoE(8, 6, num_experts=2, top_k=1, router=MySoft(8, 2))
    moe(torch.randn(3, 4, 8))
    assert calls == [(3, 4, 8)]


# -- side inputs (issue 18 item 6) --------------------------------------------------------------------------------


def _side_layer(router: str, **kwargs):
    return MoE(16, 32, 4, 1, router=router, router_kwargs=kwargs, backend="reference")


@pytest.mark.parametrize("side", [None, {}, {"cfg_drop": torch.zeros(2, dtype=torch.bool)}])
def test_a_missing_or_misspelled_side_input_is_an_error_naming_it(side):
    moe = _side_layer("promoe")
    with pytest.raises(ValueError, match=r"ProMoERouter needs the side inputs \['cfg_dropped'\]; missing"):
        moe(torch.randn(2, 5, 16), side=side)
    with pytest.raises(ValueError, match="ProMoERouter needs the side input 'cfg_dropped'"):
        moe.router(torch.randn(3, 16), side)  # the router itself too


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_side_inputs_are_rejected_naming_the_input(bad):
    moe = _side_layer("global_embedding", embed_dim=3)
    embedding = torch.randn(2, 3)
    embedding[1, 2] = bad
    with pytest.raises(ValueError, match="side input 'global_embedding' contains NaN or inf values"):
        moe(torch.randn(2, 5, 16), side={"global_embedding": embedding})


def test_a_per_sample_embedding_as_wide_as_the_sequence_is_per_sample():
    """(B, G) with G == L used to be read as per-token (B, L) scalars."""
    torch.manual_seed(0)
    moe = _side_layer("global_embedding", embed_dim=5).eval()
    x, embedding = torch.randn(2, 5, 16), torch.randn(2, 5)
    y, _ = moe(x, side={"global_embedding": embedding})
    y_tok, _ = moe(x, side={"global_embedding": embedding[:, None, :].expand(2, 5, 5)})  # the same, per token
    torch.testing.assert_close(y, y_tok)
    with pytest.raises(ValueError, match=r"side input 'global_embedding' has shape \(2, 5\); it must be per sample"):
        _side_layer("global_embedding", embed_dim=5)(torch.randn(3, 5, 16), side={"global_embedding": embedding})
