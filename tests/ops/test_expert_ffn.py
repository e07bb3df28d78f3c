"""Every backend of the routed expert FFN against the naive pair loop, forward and all gradients; the fused
path's custom ops; the pair filter and counts of ``moezoo.ops.indexing``; autocast at the seam."""

from __future__ import annotations

import pytest
import torch

import moezoo.ops.fused as fused
from moezoo.ops import BACKENDS, count_per_expert, expert_ffn, hidden_width, sort_by_expert, true_indices
from tests import oracles

CPU_BACKENDS = ["reference", "torch"]

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def make_case(num_tokens, dim, ffn_dim, num_experts, k, activation, dtype, experts=None):
    hidden = hidden_width(activation, ffn_dim)
    x = torch.randn(num_tokens, dim, dtype=dtype, requires_grad=True)
    token_idx = torch.arange(num_tokens).repeat_interleave(k)
    expert_idx = torch.randint(0, num_experts, (num_tokens * k,)) if experts is None else experts
    gate = torch.rand(token_idx.shape[0], dtype=torch.float32, requires_grad=True)
    w_in = (torch.randn(num_experts, dim, hidden, dtype=dtype) / dim**0.5).requires_grad_()
    w_out = (torch.randn(num_experts, ffn_dim, dim, dtype=dtype) / ffn_dim**0.5).requires_grad_()
    return x, token_idx, expert_idx, gate, w_in, w_out


def run_and_grad(fn, x, token_idx, expert_idx, gate, w_in, w_out, activation):
    out = fn(x, token_idx, expert_idx, gate, w_in, w_out, activation)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), [x, gate, w_in, w_out], allow_unused=True)
    return [out.detach()] + [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, [x, gate, w_in, w_out])]


def assert_matches_oracle(backend, case, activation, dtype):
    got = run_and_grad(BACKENDS[backend], *case, activation)
    want = run_and_grad(oracles.expert_ffn, *case, activation)
    for name, g, w in zip(["out", "dx", "dgate", "dw_in", "dw_out"], got, want):
        tol = TOL[torch.float32] if name == "dgate" else TOL[dtype]
        torch.testing.assert_close(g, w.to(g.dtype), **tol, msg=lambda m, n=name: f"{backend} {n}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("num_tokens,k", [(1, 1), (7, 2), (23, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_oracle(backend, activation, num_tokens, k, dtype):
    case = make_case(num_tokens, 12, 10, 5, k, activation, dtype)
    assert_matches_oracle(backend, case, activation, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "layout",
    ["all_on_one", "first_and_last_empty", "one_empty_middle"],
)
def test_uneven_expert_loads(backend, layout):
    num_tokens, k, num_experts = 9, 2, 6
    n = num_tokens * k
    if layout == "all_on_one":
        experts = torch.full((n,), 3)
    elif layout == "first_and_last_empty":
        experts = torch.randint(1, num_experts - 1, (n,))
    else:
        experts = torch.randint(0, num_experts - 1, (n,))
        experts[experts == 2] = 4
    case = make_case(num_tokens, 8, 6, num_experts, k, "swiglu", torch.float64, experts=experts)
    assert_matches_oracle(backend, case, "swiglu", torch.float64)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_with_tiny_chunks(monkeypatch, activation):
    """Tiny chunks: experts span several chunks and weight gradients accumulate across them."""
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 1)  # 64-row chunks
    case = make_case(100, 8, 6, 3, 3, activation, torch.float64)
    assert_matches_oracle("torch", case, activation, torch.float64)


@pytest.mark.parametrize("num_tokens,k", [(1, 1), (7, 3), (40, 2)])
def test_fused_uneven_loads(num_tokens, k):
    experts = torch.randint(1, 4, (num_tokens * k,))  # experts 0, 4 and 5 empty
    experts[: num_tokens // 2] = 2  # one expert heavily loaded
    case = make_case(num_tokens, 8, 6, 6, k, "swiglu", torch.float64, experts=experts)
    assert_matches_oracle("torch", case, "swiglu", torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_variable_pairs_per_token(backend):
    """Pairs need not be T*K: tokens with 0..E experts (expert choice, ReLU routing, dropping)."""
    token_idx = torch.tensor([0, 0, 0, 2, 4, 4])
    experts = torch.tensor([0, 1, 2, 1, 2, 0])
    x, _, _, _, w_in, w_out = make_case(5, 8, 6, 3, 1, "gelu", torch.float64)
    gate = torch.rand(6, requires_grad=True)
    case = (x, token_idx, experts, gate, w_in, w_out)
    assert_matches_oracle(backend, case, "gelu", torch.float64)
    out = BACKENDS[backend](*case, "gelu")
    assert torch.equal(out[1], torch.zeros(8, dtype=torch.float64))  # unrouted tokens get exactly zero


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_pairs(backend):
    x, _, _, _, w_in, w_out = make_case(4, 8, 6, 3, 1, "gelu", torch.float32)
    empty = torch.zeros(0, dtype=torch.long)
    gate = torch.zeros(0, requires_grad=True)
    out = BACKENDS[backend](x, empty, empty, gate, w_in, w_out, "gelu")
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(w_in.grad, torch.zeros_like(w_in))


def test_stride_zero_gradient():
    """``out.sum().backward()`` hands backward an expanded (stride-0) gradient."""
    case = make_case(6, 8, 6, 3, 2, "gelu", torch.float64)
    BACKENDS["torch"](*case, "gelu").sum().backward()
    x = case[0]
    want = torch.autograd.grad(oracles.expert_ffn(*case, "gelu").sum(), x)[0]
    torch.testing.assert_close(x.grad, want)


def test_unknown_backend_and_activation():
    case = make_case(3, 4, 4, 2, 1, "gelu", torch.float32)
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        expert_ffn(*case, backend="nope")
    with pytest.raises(ValueError, match="activation='relu6'"):
        expert_ffn(*case, activation="relu6")


def test_permute_unpermute_identity():
    expert_idx = torch.randint(0, 7, (50,))
    token_idx = torch.arange(50)
    perm = sort_by_expert(token_idx, expert_idx, 7)
    sorted_experts = expert_idx[perm.order_N]
    assert torch.all(sorted_experts[1:] >= sorted_experts[:-1])
    inverse = torch.empty_like(perm.order_N)
    inverse[perm.order_N] = torch.arange(50)
    assert torch.equal(perm.token_sorted_N[inverse], token_idx)
    assert perm.counts == torch.bincount(expert_idx, minlength=7).tolist()
    assert perm.offsets_E1[-1] == 50


@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", False), ("relu", True), ("geglu", True)])
def test_fused_custom_ops_pass_opcheck(activation, bias):
    """Fake implementations, schemas and the autograd registration of the fused path's two custom ops."""
    x, token_idx, expert_idx, gate, w_in, w_out = make_case(9, 8, 6, 4, 2, activation, torch.float32)
    b_in = torch.randn(4, w_in.shape[2], requires_grad=True) if bias else None
    b_out = torch.randn(4, 8, requires_grad=True) if bias else None
    args = (x, token_idx, expert_idx, gate, w_in, w_out, b_in, b_out, activation, True)
    torch.library.opcheck(fused.fused_expert_ffn_op, args)
    detached = (None if t is None else t.detach() for t in args[:8])
    torch.library.opcheck(fused.fused_expert_ffn_op, (*detached, activation, False))
    out, h, order, *_ = fused.fused_expert_ffn_op(*args)
    saved = (x.detach(), token_idx, expert_idx, gate.detach(), w_in.detach(), w_out.detach())
    saved = (*saved, None if b_out is None else b_out.detach(), h, order, activation)
    dout = torch.randn_like(out)
    torch.library.opcheck(fused.fused_expert_ffn_bwd_op, (dout, *saved, True, True, True, True, bias, bias))
    torch.library.opcheck(fused.fused_expert_ffn_bwd_op, (dout, *saved, False, True, False, True, False, bias))


def test_fused_without_saved_h_refuses_backward():
    x, token_idx, expert_idx, gate, w_in, w_out = make_case(5, 8, 6, 3, 1, "gelu", torch.float32)
    out, h, *_ = fused.fused_expert_ffn_op(x, token_idx, expert_idx, gate, w_in, w_out, None, None, "gelu", False)
    assert h.shape == (0, 6)
    with pytest.raises(RuntimeError, match="save_h=False"):
        out.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_runs_the_experts_in_the_autocast_dtype(backend):
    """Under CPU autocast the seam casts inputs and weights once; fp32 and bf16 inputs both work."""
    case = make_case(6, 8, 6, 3, 2, "swiglu", torch.float32)
    want = BACKENDS[backend](*(t.detach() for t in case), "swiglu")
    for x in (case[0], case[0].bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = expert_ffn(x, *case[1:], "swiglu", backend=backend)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want.detach(), atol=5e-2, rtol=5e-2)  # bf16 GEMMs
        out.float().sum().backward()
        assert case[2].grad is None and case[4].grad is not None and case[4].grad.dtype == torch.float32
        case[4].grad = None


def test_true_indices_and_counts():
    mask = torch.tensor([False, True, True, False, True])
    assert true_indices(mask).tolist() == [1, 2, 4]
    assert true_indices(torch.zeros(0, dtype=torch.bool)).tolist() == []
    with pytest.raises(ValueError, match="1-D bool tensor"):
        true_indices(mask.long())
    expert_idx = torch.tensor([3, 0, 3, 3, 1])
    assert count_per_expert(expert_idx, 5).tolist() == [1, 1, 0, 3, 0]
    assert count_per_expert(expert_idx[:0], 2).tolist() == [0, 0]
