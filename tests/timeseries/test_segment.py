"""The Seg-MoE router and layer against a naive per-segment oracle: assignment, shared gate, padding, gradients."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import MoE, get_router
from moezoo.layers.segment import SegmentFeedForward, SegmentMoE, SegmentRouter, from_segments, to_segments
from tests import oracles


def _oracle(layer: SegmentMoE, x):
    shared = None
    if layer.shared is not None:
        gate = layer.shared_gate.weight[0] if layer.shared_gate is not None else None
        shared = (layer.shared.fc_in.weight.t(), layer.shared.fc_out.weight.t(), gate)
    return oracles.segment_moe(
        x,
        layer.segment_size,
        layer.router.gate.weight,
        layer.experts.w_in,
        layer.experts.w_out,
        layer.experts.activation,
        top_k=layer.top_k,
        shared=shared,
    )


@pytest.mark.parametrize("segment_size", [1, 3, 5])
@pytest.mark.parametrize("length", [1, 7])
@pytest.mark.parametrize("shared", [False, True])
def test_segment_moe_matches_oracle_forward_and_gradients(segment_size, length, shared):
    torch.manual_seed(segment_size * 100 + length)
    layer = SegmentMoE(
        6,
        8,
        num_experts=4,
        top_k=1,
        segment_size=segment_size,
        num_shared_experts=int(shared),
        shared_expert_gate=shared,
    ).double()
    x = torch.randn(3, length, 6, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, chosen = _oracle(layer, x_ref)
    # The router computes in fp32 by design (the experts here in fp64): fp32 tolerances on everything it gates.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-7)
    num_segments = -(-length // segment_size)
    # Assignment: one pair per segment, to the oracle's expert.
    routing = aux.routing
    assert routing.num_tokens == 3 * num_segments == aux.num_tokens
    assert routing.token_idx_N.tolist() == list(range(3 * num_segments))
    assert routing.expert_idx_N.tolist() == [c[0] for seq in chosen for c in seq]
    # Gradients w.r.t. the input and every parameter (router gate included: it scales the segment's output).
    grad_out = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * grad_out).sum(), [x, *params])
    grads_ref = torch.autograd.grad((y_ref * grad_out).sum(), [x_ref, *params], allow_unused=True)
    for name, g, g_ref in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, grads_ref):
        g_ref = torch.zeros_like(g) if g_ref is None else g_ref
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7, msg=f"gradient of {name}")
    assert (
        layer.router.gate.weight.requires_grad
        and grads[1 + [n for n, _ in layer.named_parameters()].index("router.gate.weight")].abs().sum() > 0
    )


def test_gate_scales_every_token_of_the_segment_and_padding_is_cut():
    torch.manual_seed(0)
    layer = SegmentMoE(4, 8, num_experts=3, top_k=1, segment_size=3).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    y, aux = layer(x)
    routing = aux.routing
    x_seg = to_segments(x, 3)  # (2, 3, 12): the last segment holds token 6 and two zero tokens
    assert x_seg.shape == (2, 3, 12) and torch.equal(x_seg[:, -1, 4:], torch.zeros(2, 8, dtype=x.dtype))
    rows = x_seg.reshape(-1, 12)
    for s in range(rows.shape[0]):
        e = int(routing.expert_idx_N[s])
        gate = routing.gate_N[s]
        expert = oracles.expert_forward(rows[s], layer.experts.w_in[e], layer.experts.w_out[e], "gelu")
        b, seg = divmod(s, 3)
        for i in range(3):
            t = seg * 3 + i
            if t < 7:  # the same gate and the same expert output (its slice) for every token in the segment
                torch.testing.assert_close(y[b, t], gate.to(x.dtype) * expert[i * 4 : (i + 1) * 4])
    assert y.shape == x.shape


def test_padding_tokens_do_not_change_real_outputs():
    torch.manual_seed(0)
    layer = SegmentMoE(4, 8, num_experts=3, segment_size=4).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    explicit = torch.cat([x, torch.zeros(2, 2, 4, dtype=x.dtype)], dim=1)
    y, _ = layer(x)
    y_explicit, _ = layer(explicit)
    torch.testing.assert_close(y, y_explicit[:, :6])


def test_segment_size_one_is_token_wise_moe():
    torch.manual_seed(0)
    seg = SegmentMoE(8, 16, num_experts=4, top_k=1, segment_size=1)
    tok = MoE(8, 16, num_experts=4, top_k=1)
    tok.load_state_dict(seg.state_dict())
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(seg(x)[0], tok(x)[0])


def test_top2_segments_match_oracle():
    torch.manual_seed(3)
    layer = SegmentMoE(5, 6, num_experts=4, top_k=2, segment_size=2).double()
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], _oracle(layer, x)[0])


def test_mask_zeroes_masked_tokens_and_skips_empty_segments():
    torch.manual_seed(0)
    layer = SegmentMoE(4, 8, num_experts=2, segment_size=2).double()
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False, False]])
    y, aux = layer(x, mask=mask)
    assert torch.equal(y[0, 3:], torch.zeros(3, 4, dtype=x.dtype))
    x_masked = x.clone()
    x_masked[0, 3] = 0.0
    torch.testing.assert_close(y[0, :3], layer(x_masked[:, :4])[0][0, :3])
    assert sorted(aux.routing.token_idx_N.tolist()) == [0, 1]  # the third segment has no real token
    assert aux.num_tokens == 2 and float(aux.dropped_frac) == 0.0  # padding is not counted as dropped


def test_router_is_registered_and_segment_views_roundtrip():
    router = get_router("segment", 12, 4, segment_size=3)
    assert isinstance(router, SegmentRouter) and router.token_dim == 4 and router.top_k == 1
    x = torch.randn(2, 5, 7, 4)
    assert torch.equal(from_segments(to_segments(x, 3), 3, 7), x)


def test_balance_loss_is_reported_and_counts_segments():
    layer = SegmentMoE(4, 8, num_experts=4, segment_size=2, router_kwargs={"balance_coef": 0.1})
    _, aux = layer(torch.randn(3, 10, 4))
    assert "balance" in aux.losses and aux.losses["balance"] > 0
    assert float(aux.tokens_per_expert_E.sum()) == 15


def test_dense_segment_ffn_matches_segment_view():
    torch.manual_seed(0)
    ffn = SegmentFeedForward(4, 10, segment_size=3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    seg = to_segments(x, 3)
    ref = torch.stack(
        [
            torch.stack(
                [oracles.expert_forward(r, ffn.ffn.fc_in.weight.t(), ffn.ffn.fc_out.weight.t(), "gelu") for r in s]
            )
            for s in seg
        ]
    )
    torch.testing.assert_close(ffn(x), from_segments(ref, 3, 5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"segment_size": 0}, "segment_size"),
        ({"segment_size": 2.5}, "segment_size"),
        ({"dim": 0}, "dim"),
        ({"num_experts": 0}, "num_experts"),
        ({"top_k": 5}, "top_k"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"dim": 4, "ffn_dim": 8, "num_experts": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        SegmentMoE(**args)


def test_bad_input_shapes():
    layer = SegmentMoE(4, 8, segment_size=2)
    with pytest.raises(ValueError, match="D=4"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 5, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="segment_size"):
        get_router("segment", 10, 4, segment_size=3)
