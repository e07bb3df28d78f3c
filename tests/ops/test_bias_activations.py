"""Every activation (plain and gated) with and without expert biases, on every backend (the reference, the fused
CPU custom ops and the Triton kernels under the interpreter) against the naive pair loop of ``tests/oracles.py``:
the output and the gradients of x, gate, w_in, w_out, b_in and b_out."""

from __future__ import annotations

import pytest
import torch

import moezoo.kernels as kernels
from moezoo.ops import ACTIVATIONS, expert_ffn, hidden_width
from moezoo.ops.activations import act_backward, act_forward, act_forward_parts, is_gated
from tests import oracles

TRITON = pytest.param(
    "triton",
    marks=[
        pytest.mark.interpreter,
        pytest.mark.skipif(
            not (kernels.HAS_TRITON and (kernels.INTERPRET or torch.cuda.is_available())),
            reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
        ),
    ],
)
BACKENDS = ["reference", "torch", TRITON]
NAMES = ["out", "dx", "dgate", "dw_in", "dw_out", "db_in", "db_out"]


def make_case(activation, bias, dtype, num_tokens=13, dim=12, ffn_dim=10, num_experts=4, k=2):
    hidden = hidden_width(activation, ffn_dim)
    x = torch.randn(num_tokens, dim, dtype=dtype, requires_grad=True)
    token_idx = torch.arange(num_tokens).repeat_interleave(k)
    expert_idx = torch.randint(0, num_experts - 1, (num_tokens * k,))  # the last expert gets no pairs
    gate = torch.rand(num_tokens * k, dtype=torch.float32, requires_grad=True)
    w_in = (torch.randn(num_experts, dim, hidden, dtype=dtype) / dim**0.5).requires_grad_()
    w_out = (torch.randn(num_experts, ffn_dim, dim, dtype=dtype) / ffn_dim**0.5).requires_grad_()
    b_in = torch.randn(num_experts, hidden, dtype=dtype, requires_grad=True) if bias else None
    b_out = torch.randn(num_experts, dim, dtype=dtype, requires_grad=True) if bias else None
    return x, token_idx, expert_idx, gate, w_in, w_out, b_in, b_out


def outputs_and_grads(fn, case, activation):
    x, token_idx, expert_idx, gate, w_in, w_out, b_in, b_out = case
    out = fn(x, token_idx, expert_idx, gate, w_in, w_out, activation, b_in, b_out)
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    params = [t for t in (x, gate, w_in, w_out, b_in, b_out) if t is not None]
    grads = torch.autograd.grad(out, params, dout)
    return [out.detach().cpu()] + [g.cpu() for g in grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backend_matches_oracle(backend, activation, bias):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    case = make_case(activation, bias, dtype)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    on_device = [t if t is None else t.detach().to(device).requires_grad_(t.requires_grad) for t in case]
    got = outputs_and_grads(
        lambda *a: expert_ffn(*a[:7], backend=backend, b_in_EH=a[7], b_out_ED=a[8]), on_device, activation
    )
    want = outputs_and_grads(oracles.expert_ffn, case, activation)
    assert len(got) == len(want) == (7 if bias else 5)
    for name, g, w in zip(NAMES, got, want):
        t = dict(atol=1e-5, rtol=1e-4) if name == "dgate" else tol
        torch.testing.assert_close(g, w.to(g.dtype), **t, msg=lambda m, n=name: f"{backend} {activation} {n}: {m}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_hand_written_derivative_matches_autograd(activation):
    """``act_backward`` (the fused path's derivative) against autograd of ``act_forward``, away from relu's kink."""
    h = torch.randn(20, 16, dtype=torch.float64)
    h = torch.where(h.abs() < 1e-3, 0.5, h).requires_grad_()
    da = torch.randn(20, 8 if activation in ("swiglu", "geglu", "reglu") else 16, dtype=torch.float64)
    (want,) = torch.autograd.grad(act_forward(h, activation), h, da)
    torch.testing.assert_close(act_backward(da, h.detach(), activation), want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_out_buffers(activation):
    """The fused path's ``out=`` forms (buffers pre-filled with NaN) write the same values as the plain forms, into
    the given buffers; ``act_backward`` without ``act_gate`` recomputes it."""
    h = torch.randn(20, 16, dtype=torch.float64)
    h = torch.where(h.abs() < 1e-3, 0.5, h)
    width = 8 if is_gated(activation) else 16
    da = torch.randn(20, width, dtype=torch.float64)

    def garbage(*shape: int) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=torch.float64)

    want_gate, want_a = act_forward_parts(h, activation)
    out = garbage(20, width)
    assert act_forward(h, activation, out=out) is out
    torch.testing.assert_close(out, want_a)
    out, gate_out = garbage(20, width), garbage(20, width) if is_gated(activation) else None
    got_gate, got_a = act_forward_parts(h, activation, out=out, gate_out=gate_out)
    assert got_a is out and got_gate is gate_out
    torch.testing.assert_close(got_a, want_a)
    torch.testing.assert_close(got_gate, want_gate)
    want_dh = act_backward(da, h, activation)
    for act_gate in (None, got_gate):
        dh = garbage(20, 16)
        assert act_backward(da, h, activation, act_gate, out=dh) is dh
        torch.testing.assert_close(dh, want_dh)


def test_bias_shapes_are_checked():
    x, token_idx, expert_idx, gate, w_in, w_out, _, _ = make_case("gelu", False, torch.float32)
    with pytest.raises(ValueError, match="b_in_EH must have shape"):
        expert_ffn(x, token_idx, expert_idx, gate, w_in, w_out, "gelu", b_in_EH=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="b_out_ED must have shape"):
        expert_ffn(x, token_idx, expert_idx, gate, w_in, w_out, "gelu", b_out_ED=torch.zeros(3, 12))


def test_unknown_activation_is_rejected():
    x, token_idx, expert_idx, gate, w_in, w_out, _, _ = make_case("gelu", False, torch.float32)
    with pytest.raises(ValueError, match="activation='tanh' is not supported"):
        expert_ffn(x, token_idx, expert_idx, gate, w_in, w_out, "tanh")
