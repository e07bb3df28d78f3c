"""The ``"triton"`` backend's wiring: registration and backend choice, errors, custom-op checks (fake
implementations and autograd via ``torch.library.opcheck``), and ``torch.compile(fullgraph=True)`` of a MoE layer."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.common import DEVICE, TOL, kernel_tier, make_experts

pytestmark = kernel_tier


@pytest.fixture(scope="module")
def tb():
    import moezoo.ops.triton_backend as triton_backend

    return triton_backend


def test_registered_and_chosen_by_device(tb):
    from moezoo.ops import BACKENDS, default_backend, resolve_backend

    assert BACKENDS["triton"] is tb.expert_ffn_triton
    assert default_backend(torch.zeros(1)) == "torch"
    assert resolve_backend("triton", torch.zeros(1)) == "triton"
    if torch.cuda.is_available():
        assert default_backend(torch.zeros(1, device="cuda")) == "triton"


@pytest.mark.parametrize("late", [False, True])
def test_cpu_without_interpreter_is_a_clear_error(tb, monkeypatch, late):
    """The one device check (``moezoo.kernels.check_device``) says why and what to do, before anything launches."""
    import moezoo.kernels.config as config
    from moezoo.ops import expert_ffn

    monkeypatch.setattr(config, "INTERPRET", False)
    if late:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        want = r"cannot run on cpu tensors: TRITON_INTERPRET=1 was set after moezoo.kernels was imported"
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        want = r"cannot run on cpu tensors: .*CUDA.*TRITON_INTERPRET=1.*backend='torch'"
    x = torch.randn(3, 16)
    pairs = torch.arange(3)
    with pytest.raises(RuntimeError, match=want):
        expert_ffn(x, pairs, pairs % 2, torch.rand(3), torch.randn(2, 16, 8), torch.randn(2, 8, 16), backend="triton")


def test_bad_shapes_name_the_problem(tb):
    x = torch.randn(3, 16, device=DEVICE)
    pairs = torch.arange(3, device=DEVICE)
    gate = torch.rand(3, device=DEVICE)
    w_out = torch.randn(2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="activation='swiglu'"):
        tb.expert_ffn_triton(x, pairs, pairs % 2, gate, torch.randn(2, 16, 8, device=DEVICE), w_out, "swiglu")
    with pytest.raises(ValueError, match="equal length"):
        tb.expert_ffn_triton(x, pairs, pairs[:2], gate, torch.randn(2, 16, 8, device=DEVICE), w_out, "gelu")


def _ffn_inputs(tb, activation="swiglu", num_tokens=20, k=2):
    hidden = 48 if activation in ("swiglu", "geglu", "reglu") else 24
    token_idx = torch.arange(num_tokens).repeat_interleave(k).to(DEVICE)
    expert_idx = make_experts(num_tokens * k, 4, "one_expert_empty").to(DEVICE)
    x = torch.randn(num_tokens, 16, device=DEVICE, requires_grad=True)
    gate = torch.rand(num_tokens * k, device=DEVICE, requires_grad=True)
    w_in = torch.randn(4, 16, hidden, device=DEVICE, requires_grad=True)
    w_out = torch.randn(4, 24, 16, device=DEVICE, requires_grad=True)
    return token_idx, expert_idx, x, gate, w_in, w_out


@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", False), ("gelu_tanh", True)])
def test_opcheck_expert_ffn(tb, activation, bias):
    token_idx, expert_idx, x, gate, w_in, w_out = _ffn_inputs(tb, activation)
    b_in = torch.randn(4, w_in.shape[2], device=DEVICE, requires_grad=True) if bias else None
    b_out = torch.randn(4, 16, device=DEVICE, requires_grad=True) if bias else None
    block_m = tb.choose_block_m(token_idx.shape[0], 4)
    layout = tb.permute_op(expert_idx, 4, block_m)
    torch.library.opcheck(tb.permute_op, (expert_idx, 4, block_m))
    args = (x, token_idx, expert_idx, gate, w_in, w_out, b_in, b_out, *layout[:4], activation, block_m, True)
    torch.library.opcheck(tb.expert_ffn_fwd_op, args)
    out, h = tb.expert_ffn_fwd_op(*args)
    dout = torch.randn_like(out)
    leaves = (x.detach(), token_idx, gate.detach(), w_in.detach(), w_out.detach(), expert_idx)
    bwd_args = (dout, *leaves, None if b_out is None else b_out.detach(), h.detach(), *layout[:4])
    flags = (True, True, True, True, bias, bias)
    torch.library.opcheck(tb.expert_ffn_bwd_op, (*bwd_args, activation, block_m, *flags))
    flags = (False, True, False, True, False, bias)
    torch.library.opcheck(tb.expert_ffn_bwd_op, (*bwd_args, activation, block_m, *flags))


def _moe(activation):
    from moezoo.layers import MoE

    return MoE(16, 24, num_experts=4, top_k=2, activation=activation, backend="triton", check_finite=False).to(DEVICE)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_layer_matches_torch_backend(activation):
    """Every MoE layer takes the Triton path with no code change beyond the backend name."""
    moe = _moe(activation)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    y, _ = moe(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *moe.parameters()])
    moe.backend = "torch"
    y_ref, _ = moe(x)
    want = torch.autograd.grad(y_ref.square().sum(), [x, *moe.parameters()])
    torch.testing.assert_close(y, y_ref, **TOL)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, **TOL)


def test_expert_ffn_compiles_without_graph_breaks(tb):
    """``expert_ffn`` on the Triton backend traces into one graph, forward and backward (aot_eager on the CPU)."""
    from moezoo.ops import expert_ffn

    token_idx, expert_idx, x, gate, w_in, w_out = _ffn_inputs(tb)

    def step(x, gate, w_in, w_out):
        out = expert_ffn(x, token_idx, expert_idx, gate, w_in, w_out, "swiglu", backend="triton")
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, gate, w_in, w_out)
    grads = torch.autograd.grad(loss, [x, gate, w_in, w_out])
    want_loss = step(x, gate, w_in, w_out)
    want = torch.autograd.grad(want_loss, [x, gate, w_in, w_out])
    torch.testing.assert_close(loss, want_loss, **TOL)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("routing", ["topk", "capacity_and_mask"])
def test_moe_layer_compiles_fullgraph(routing):
    """``MoE(..., backend="triton")`` traces as one graph (aot_eager on the CPU), forward and backward; with capacity
    dropping and a padding mask the pair count is data-dependent and the custom ops' fakes must carry it."""
    from moezoo.layers import MoE

    torch._dynamo.reset()
    kwargs = {"capacity_factor": 0.5} if routing != "topk" else {}
    moe = MoE(16, 24, num_experts=4, top_k=2, activation="swiglu", backend="triton", router_kwargs=kwargs).to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    mask = (torch.arange(9, device=DEVICE) < torch.tensor([[5], [9]], device=DEVICE)) if routing != "topk" else None
    y, aux = torch.compile(moe, fullgraph=True, backend="aot_eager")(x, mask=mask)
    (dx,) = torch.autograd.grad(y.square().sum() + aux.aux_loss, x)
    y_ref, aux_ref = moe(x, mask=mask)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum() + aux_ref.aux_loss, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    assert aux.num_tokens == aux_ref.num_tokens
