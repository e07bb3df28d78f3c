"""The grouped expert GEMMs, alone and as the ``"triton"`` backend of ``expert_ffn``, against the loop oracles:
forward and every gradient, fp32."""

from __future__ import annotations

import pytest
import torch

from tests import oracles
from tests.kernels import loops
from tests.kernels.common import DEVICE, LAYOUTS, TOKENS, TOL, TOP_K, kernel_tier, make_experts

pytestmark = kernel_tier

DIM, FFN_DIM, NUM_EXPERTS = 16, 24, 6


def make_case(token_idx, expert_idx, activation, dim=DIM, ffn_dim=FFN_DIM, num_tokens=None):
    num_tokens = int(token_idx.max()) + 1 if num_tokens is None else num_tokens
    hidden = 2 * ffn_dim if activation == "swiglu" else ffn_dim
    x = torch.randn(num_tokens, dim, requires_grad=True)
    gate = torch.rand(token_idx.shape[0], requires_grad=True)
    w_in = (torch.randn(NUM_EXPERTS, dim, hidden) / dim**0.5).requires_grad_()
    w_out = (torch.randn(NUM_EXPERTS, ffn_dim, dim) / ffn_dim**0.5).requires_grad_()
    return x, token_idx, expert_idx, gate, w_in, w_out


def on_device(case):
    return [t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in case]


def outputs_and_grads(fn, case, activation, wrt=(0, 3, 4, 5)):
    out = fn(*case, activation)
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape).to(out.device)
    params = [case[i] for i in wrt]
    grads = torch.autograd.grad(out, params, dout, allow_unused=True) if out.requires_grad else [None] * len(params)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    return [out.detach().cpu()] + [g.cpu() for g in grads]


def triton_ffn(*args):
    from moezoo.ops import expert_ffn

    return expert_ffn(*args, backend="triton")


def assert_matches_oracle(case, activation, wrt=(0, 3, 4, 5)):
    got = outputs_and_grads(triton_ffn, on_device(case), activation, wrt)
    want = outputs_and_grads(oracles.expert_ffn, case, activation, wrt)
    names = ["out"] + [["x", "token_idx", "expert_idx", "gate", "w_in", "w_out"][i] for i in wrt]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("k", TOP_K)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_expert_ffn_matches_oracle(num_tokens, k, activation):
    token_idx = torch.arange(num_tokens).repeat_interleave(k)
    case = make_case(token_idx, make_experts(num_tokens * k, NUM_EXPERTS, "random"), activation)
    assert_matches_oracle(case, activation)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_uneven_expert_loads(layout, activation):
    token_idx = torch.arange(45).repeat_interleave(2)
    case = make_case(token_idx, make_experts(90, NUM_EXPERTS, layout), activation)
    assert_matches_oracle(case, activation)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_any_pair_list(activation):
    """Pairs in any order, tokens with 0..E pairs (token 0 and the last have none), a token twice on one expert,
    and unaligned dims spanning several tiles."""
    token_idx = torch.randint(1, 39, (70,))
    token_idx[:2] = 5
    expert_idx = make_experts(70, NUM_EXPERTS, "random")
    expert_idx[:2] = 3
    case = make_case(token_idx, expert_idx, activation, dim=70, ffn_dim=72, num_tokens=40)
    assert_matches_oracle(case, activation)


def test_no_pairs():
    empty = torch.zeros(0, dtype=torch.long)
    case = make_case(empty, empty, "gelu", num_tokens=5)
    assert_matches_oracle(case, "gelu")


@pytest.mark.parametrize("wrt", [(0,), (3,), (4, 5), (0, 5)])
def test_partial_gradients(wrt):
    """Only some inputs require grad: the others are skipped and the rest still exact."""
    token_idx = torch.arange(30).repeat_interleave(2)
    case = list(make_case(token_idx, make_experts(60, NUM_EXPERTS, "random"), "swiglu"))
    for i in (0, 3, 4, 5):
        case[i] = case[i].detach().requires_grad_(i in wrt)
    assert_matches_oracle(case, "swiglu", wrt)


def test_no_grad_forward_matches():
    token_idx = torch.arange(20).repeat_interleave(3)
    case = make_case(token_idx, make_experts(60, NUM_EXPERTS, "random"), "gelu")
    with torch.no_grad():
        out = triton_ffn(*on_device(case), "gelu")
        want = oracles.expert_ffn(*case, "gelu")
    torch.testing.assert_close(out.cpu(), want, **TOL)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_first_gemm_intermediates(activation):
    """``expert_in_fwd`` alone: the pre-activation and activation rows of every pair, at the pair's own row."""
    from moezoo.kernels import expert_in_fwd, permute_fwd

    token_idx = torch.randint(0, 50, (150,))
    expert_idx = make_experts(150, NUM_EXPERTS, "one_expert_empty")
    x, _, _, _, w_in, _ = make_case(token_idx, expert_idx, activation, dim=40, num_tokens=50)
    layout = permute_fwd(expert_idx.to(DEVICE), NUM_EXPERTS, 32)
    act, gated = {"gelu": ("gelu", False), "swiglu": ("silu", True)}[activation]
    h, a = expert_in_fwd(x.detach().to(DEVICE), token_idx.to(DEVICE), layout, w_in.detach().to(DEVICE), act, gated)
    want_h, want_a = loops.expert_hidden(x.detach(), token_idx, expert_idx, w_in.detach(), activation)
    torch.testing.assert_close(h.cpu(), want_h, **TOL)
    torch.testing.assert_close(a.cpu(), want_a, **TOL)
    h_none, a_only = expert_in_fwd(
        x.detach().to(DEVICE), token_idx.to(DEVICE), layout, w_in.detach().to(DEVICE), act, gated, store_h=False
    )
    assert h_none is None
    torch.testing.assert_close(a_only.cpu(), want_a, **TOL)
