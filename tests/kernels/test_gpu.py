"""The Triton backend compiled on a CUDA device: the interpreter tier's grid at realistic sizes in fp32 and bf16,
``opcheck`` of every custom op, ``torch.compile(fullgraph=True)`` of a MoE layer, and tensors beyond 2**31
elements. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests import oracles
from tests.kernels.common import LAYOUTS, TOKENS, TOP_K, make_experts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DIM, FFN_DIM, NUM_EXPERTS = 1024, 704, 8
# fp32 runs with IEEE dots (allow_tf32 is off by default); the bound covers fp32 reordering over D and over
# the rows of an expert in the weight gradients. bf16 is compared by relative Frobenius error against an fp32
# oracle on the same bf16-rounded inputs: intermediates are rounded to bf16 (2**-8) between the two GEMMs.
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
BF16_REL = 2e-2


def _case(num_tokens, k, layout, activation, dtype, dim=DIM, ffn_dim=FFN_DIM):
    hidden = 2 * ffn_dim if activation == "swiglu" else ffn_dim
    gen = dict(device="cuda", dtype=dtype)
    x = torch.randn(num_tokens, dim, **gen)
    token_idx = torch.arange(num_tokens, device="cuda").repeat_interleave(k)
    expert_idx = make_experts(num_tokens * k, NUM_EXPERTS, layout).cuda()
    gate = torch.rand(num_tokens * k, device="cuda")
    w_in = torch.randn(NUM_EXPERTS, dim, hidden, **gen) / dim**0.5
    w_out = torch.randn(NUM_EXPERTS, ffn_dim, dim, **gen) / ffn_dim**0.5
    return x, token_idx, expert_idx, gate, w_in, w_out


def _run(fn, case, activation, dtype):
    x, token_idx, expert_idx, gate, w_in, w_out = (t.clone() for t in case)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w_in, w_out)]
    leaves.insert(1, gate.requires_grad_())  # gates stay fp32, as routers produce them
    out = fn(leaves[0], token_idx, expert_idx, leaves[1], leaves[2], leaves[3], activation)
    dout = torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    return [out.detach().float()] + [g.float() for g in grads]


def _triton(*args):
    from moezoo.ops import expert_ffn

    return expert_ffn(*args, backend="triton")


def _compare(case, activation, dtype):
    got = _run(_triton, case, activation, dtype)
    want = _run(oracles.expert_ffn, case, activation, torch.float32)
    for name, g, w in zip(["out", "dx", "dgate", "dw_in", "dw_out"], got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")
        else:
            rel = float((g - w).norm() / w.norm().clamp_min(1e-12))
            assert rel < BF16_REL, f"{name}: relative error {rel:.3e} >= {BF16_REL}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("k", TOP_K)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_grid_against_oracle(num_tokens, k, activation, dtype):
    case = _case(num_tokens, k, "random", activation, torch.float32)
    case = (case[0].to(dtype), *case[1:4], case[4].to(dtype), case[5].to(dtype))
    _compare(case, activation, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_uneven_loads_against_oracle(layout, dtype):
    case = _case(96, 2, layout, "swiglu", dtype)
    _compare(case, "swiglu", dtype)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_large_batch_against_torch_backend(activation):
    """T=8192, K=2 in fp32 against the fused PyTorch path (the loop oracle is too slow at this size)."""
    from moezoo.ops import BACKENDS

    case = _case(8192, 2, "random", activation, torch.float32, dim=512, ffn_dim=384)
    got = _run(_triton, case, activation, torch.float32)
    want = _run(BACKENDS["torch"], case, activation, torch.float32)
    for name, g, w in zip(["out", "dx", "dgate", "dw_in", "dw_out"], got, want):
        torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op(dtype):
    import moezoo.ops.triton_backend as tb

    case = _case(200, 2, "one_expert_empty", "swiglu", dtype, dim=256, ffn_dim=128)
    x, token_idx, expert_idx, gate, w_in, w_out = case
    block_m = tb.choose_block_m(token_idx.shape[0], NUM_EXPERTS)
    torch.library.opcheck(tb.permute_op, (expert_idx, NUM_EXPERTS, block_m))
    layout = tb.permute_op(expert_idx, NUM_EXPERTS, block_m)
    leaves = [t.clone().requires_grad_() for t in (x, gate, w_in, w_out)]
    fwd_args = (leaves[0], token_idx, expert_idx, *leaves[1:], None, None, *layout[:4], "swiglu", block_m, True)
    torch.library.opcheck(tb.expert_ffn_fwd_op, fwd_args, atol=1e-2, rtol=1e-2)
    _, h = tb.expert_ffn_fwd_op(*fwd_args)
    bwd_args = (torch.randn_like(x), x, token_idx, gate, w_in, w_out, expert_idx, None, h.detach(), *layout[:4])
    bwd_args = (*bwd_args, "swiglu", block_m, True, True, True, True, False, False)
    torch.library.opcheck(tb.expert_ffn_bwd_op, bwd_args, atol=1e-2, rtol=1e-2)


def test_moe_compiles_fullgraph():
    """``MoE(..., backend="triton")`` under inductor with ``fullgraph=True``, forward and backward, against eager."""
    from moezoo.layers import MoE

    torch._dynamo.reset()
    moe = MoE(256, 128, num_experts=8, top_k=2, activation="swiglu", backend="triton", check_finite=False).cuda()
    x = torch.randn(4, 64, 256, device="cuda", requires_grad=True)
    y, aux = torch.compile(moe, fullgraph=True)(x)
    (dx,) = torch.autograd.grad(y.square().sum() + aux.aux_loss, x)
    y_ref, aux_ref = moe(x)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum() + aux_ref.aux_loss, x)
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    torch.testing.assert_close(dx, dx_ref, **FP32_TOL)


def test_beyond_int32_offsets():
    """x, out and dx hold more than 2**31 elements: rows past 2**31 / D are gathered and scattered correctly."""
    from moezoo.ops import expert_ffn

    num_tokens, dim, ffn_dim, num_experts = (1 << 20) + 3, 2048, 64, 4
    assert num_tokens * dim > 2**31
    x = torch.randn(num_tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    token_idx = torch.arange(num_tokens, device="cuda")
    expert_idx = token_idx % num_experts
    gate = torch.rand(num_tokens, device="cuda", requires_grad=True)
    w_in = (torch.randn(num_experts, dim, ffn_dim, device="cuda") / dim**0.5).bfloat16().requires_grad_()
    w_out = (torch.randn(num_experts, ffn_dim, dim, device="cuda") / ffn_dim**0.5).bfloat16().requires_grad_()
    out = expert_ffn(x, token_idx, expert_idx, gate, w_in, w_out, "gelu", backend="triton")
    dout = torch.ones_like(out)
    dx, dgate = torch.autograd.grad(out, [x, gate], dout)
    rows = torch.tensor([0, 1, num_tokens // 2, num_tokens - 5, num_tokens - 2, num_tokens - 1], device="cuda")
    for t in rows.tolist():
        e = t % num_experts
        x_t = x[t].detach().float().requires_grad_()
        g_t = gate[t].detach().clone().requires_grad_()
        y_t = g_t * oracles.expert_forward(x_t, w_in[e].detach().float(), w_out[e].detach().float(), "gelu")
        want_dx, want_dgate = torch.autograd.grad(y_t, [x_t, g_t], dout[t].float())
        for name, g, w in [("out", out[t], y_t), ("dx", dx[t], want_dx), ("dgate", dgate[t], want_dgate)]:
            rel = float((g.detach().float() - w.detach()).norm() / w.detach().norm().clamp_min(1e-12))
            assert rel < BF16_REL, f"row {t} {name}: relative error {rel:.3e}"
