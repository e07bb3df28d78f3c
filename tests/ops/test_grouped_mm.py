"""The fused CPU path's two ways of running the expert GEMMs (``gemm="loop"``: one ``mm`` per expert segment;
``gemm="grouped_mm"``: one ``torch._grouped_mm`` per chunk and GEMM role) against the naive pair loop of
``tests/oracles.py``: the output and the gradients of x, gate, w_in, w_out, b_in and b_out, for every activation,
with and without biases, with empty experts, K=1, no pairs, and experts cut by chunks. Every ``torch.empty``/
``empty_like``/``new_empty`` is pre-filled with garbage (``tests/kernels/conftest.py``), so a workspace or gradient
row left unwritten fails. Also the rule that chooses between them (``choose_gemm``) and the backend names that fix
the choice."""

from __future__ import annotations

import pytest
import torch

import moezoo.ops.fused as fused
from moezoo.layers import MoE
from moezoo.ops import ACTIVATIONS, BACKENDS, expert_ffn, hidden_width
from tests import oracles
from tests.kernels.conftest import garbage_outputs  # noqa: F401  (autouse: garbage-filled allocations)
from tests.ops.test_bias_activations import outputs_and_grads

GEMMS = ["loop", "grouped_mm"]
NAMES = ["out", "dx", "dgate", "dw_in", "dw_out", "db_in", "db_out"]
TOL = dict(atol=2e-5, rtol=1e-4)  # fp32: torch._grouped_mm takes no float64


def make_case(activation, bias, experts, num_tokens, k, dim=12, ffn_dim=8, num_experts=5, dtype=torch.float32):
    """Widths are multiples of 4 fp32 elements (16 bytes), as ``torch._grouped_mm`` needs."""
    hidden = hidden_width(activation, ffn_dim)
    x = torch.randn(num_tokens, dim, dtype=dtype, requires_grad=True)
    token_idx = torch.arange(num_tokens).repeat_interleave(k)
    gate = torch.rand(num_tokens * k, requires_grad=True)
    w_in = (torch.randn(num_experts, dim, hidden, dtype=dtype) / dim**0.5).requires_grad_()
    w_out = (torch.randn(num_experts, ffn_dim, dim, dtype=dtype) / ffn_dim**0.5).requires_grad_()
    b_in = torch.randn(num_experts, hidden, dtype=dtype, requires_grad=True) if bias else None
    b_out = torch.randn(num_experts, dim, dtype=dtype, requires_grad=True) if bias else None
    return x, token_idx, experts, gate, w_in, w_out, b_in, b_out


def assert_matches_oracle(gemm, case, activation):
    got = outputs_and_grads(lambda *a: fused.expert_ffn_fused(*a, gemm=gemm), case, activation)
    want = outputs_and_grads(oracles.expert_ffn, case, activation)
    assert len(got) == len(want)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, n=name: f"{gemm} {activation} {n}: {m}")


@pytest.fixture
def count_grouped_mm(monkeypatch):
    """Counts the calls of ``torch._grouped_mm`` (so a test knows which way ran)."""
    calls = []
    real = torch._grouped_mm

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    return calls


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_and_bias(gemm, activation, bias, count_grouped_mm):
    experts = torch.randint(0, 4, (13 * 2,))  # the last of 5 experts gets no pairs
    assert_matches_oracle(gemm, make_case(activation, bias, experts, 13, 2), activation)
    assert bool(count_grouped_mm) == (gemm == "grouped_mm")


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("layout", ["all_on_one", "first_and_last_empty", "one_empty_middle", "k1", "one_token_k1"])
def test_empty_experts_and_k1(gemm, layout):
    num_tokens, k = (1, 1) if layout == "one_token_k1" else (17, 1 if layout == "k1" else 3)
    n = num_tokens * k
    if layout == "all_on_one":
        experts = torch.full((n,), 3)
    elif layout == "first_and_last_empty":
        experts = torch.randint(1, 4, (n,))
    elif layout == "one_empty_middle":
        experts = torch.randint(0, 4, (n,))
        experts[experts == 2] = 4
    else:
        experts = torch.randint(0, 5, (n,))
    assert_matches_oracle(gemm, make_case("swiglu", True, experts, num_tokens, k), "swiglu")


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", True), ("reglu", True)])
def test_experts_cut_by_chunks(monkeypatch, gemm, activation, bias):
    """64-row chunks: experts span several chunks (weight and bias gradients accumulate over them), one chunk
    starts inside an expert, and an empty expert sits between two chunks' experts."""
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 1)
    experts = torch.cat([torch.zeros(70), torch.full((30,), 1), torch.full((60,), 3), torch.full((50,), 4)]).long()
    experts = experts[torch.randperm(experts.numel())]
    case = make_case(activation, bias, experts, 105, 2)
    assert_matches_oracle(gemm, case, activation)


@pytest.mark.parametrize("save", ["h", "all"])
@pytest.mark.parametrize("gemm", GEMMS)
def test_no_pairs(gemm, save):
    """No routed pair: every gradient is zero, whatever the GEMMs and whatever the forward keeps for backward."""
    case = make_case("swiglu", True, torch.zeros(0, dtype=torch.long), 4, 0)
    got = outputs_and_grads(lambda *a: fused.expert_ffn_fused(*a, gemm=gemm, save=save), case, "swiglu")
    for name, g in zip(NAMES, got):
        assert torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", True)])
def test_custom_ops_pass_opcheck_on_grouped_mm(activation, bias):
    case = make_case(activation, bias, torch.randint(0, 4, (18,)), 9, 2)
    x, token_idx, expert_idx, gate, w_in, w_out, b_in, b_out = case
    args = (x, token_idx, expert_idx, gate, w_in, w_out, b_in, b_out, activation, True, "grouped_mm")
    torch.library.opcheck(fused.fused_expert_ffn_op, args)
    out, h, order, *_ = fused.fused_expert_ffn_op(*args)
    saved = (x.detach(), token_idx, expert_idx, gate.detach(), w_in.detach(), w_out.detach())
    saved = (*saved, None if b_out is None else b_out.detach(), h, order, activation)
    flags = (True, True, True, True, bias, bias)
    torch.library.opcheck(fused.fused_expert_ffn_bwd_op, (torch.randn_like(out), *saved, *flags, "grouped_mm"))


def test_bfloat16_grouped_mm_matches_the_loop():
    """bf16 GEMMs (the autocast dtype): 8-element widths are 16 bytes."""
    case = make_case("swiglu", True, torch.randint(0, 4, (26,)), 13, 2, dim=16, ffn_dim=8, dtype=torch.bfloat16)
    got = outputs_and_grads(lambda *a: fused.expert_ffn_fused(*a, gemm="grouped_mm"), case, "swiglu")
    want = outputs_and_grads(lambda *a: fused.expert_ffn_fused(*a, gemm="loop"), case, "swiglu")
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=5e-2, rtol=5e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_choose_gemm_rule():
    few = fused.GROUPED_MM_MAX_ROWS_PER_EXPERT
    assert fused.choose_gemm("auto", [few, 0, few], True) == "grouped_mm"  # empty experts do not count
    assert fused.choose_gemm("auto", [few + 1, 0, few + 1], True) == "loop"
    assert fused.choose_gemm("auto", [1, 1], False) == "loop"
    assert fused.choose_gemm("auto", [0, 0], True) == "loop"
    assert fused.choose_gemm("loop", [1, 1], True) == "loop"
    assert fused.choose_gemm("grouped_mm", [10**6], True) == "grouped_mm"
    with pytest.raises(ValueError, match="gemm='grouped_mm' needs float32"):
        fused.choose_gemm("grouped_mm", [1], False)
    with pytest.raises(ValueError, match="gemm='bmm' is unknown"):
        fused.expert_ffn_fused(*make_case("gelu", False, torch.zeros(2).long(), 2, 1)[:6], "gelu", gemm="bmm")


def test_grouped_mm_supported():
    w = torch.randn(3, 8, 12)
    assert fused.grouped_mm_supported(torch.float32, (8, 12), w, w.transpose(1, 2))
    assert not fused.grouped_mm_supported(torch.float64, (8, 12), w.double())  # no float64 on the CPU
    assert not fused.grouped_mm_supported(torch.float32, (6, 12), w)  # 24-byte rows
    assert not fused.grouped_mm_supported(torch.bfloat16, (12, 8), w.bfloat16())  # 24-byte rows in bf16
    assert not fused.grouped_mm_supported(torch.float32, (8, 12), torch.randn(3, 8, 13)[..., :12])  # row stride
    assert not fused.grouped_mm_supported(torch.float32, (8, 12), torch.randn(3 * 96 + 1)[1:].view(3, 8, 12))


def test_auto_falls_back_to_the_loop_where_grouped_mm_cannot_run(count_grouped_mm):
    """float64, or widths that are not multiples of 16 bytes: ``auto`` runs the loop even for few rows."""
    for dtype, dim in ((torch.float64, 12), (torch.float32, 6)):
        case = make_case("gelu", False, torch.randint(0, 5, (6,)), 6, 1, dim=dim, ffn_dim=4, dtype=dtype)
        outputs_and_grads(fused.expert_ffn_fused, case, "gelu")
    assert not count_grouped_mm


@pytest.mark.parametrize("backend,grouped", [("torch_loop", False), ("torch_grouped_mm", True), ("torch", True)])
def test_backend_names_fix_the_choice(backend, grouped, count_grouped_mm):
    """``torch_loop``/``torch_grouped_mm`` fix the choice; ``torch`` (auto) takes grouped_mm for few rows per
    expert; on the layer as on the seam."""
    case = make_case("swiglu", False, torch.randint(0, 5, (8,)), 8, 1)
    want = oracles.expert_ffn(*case[:6], "swiglu")
    torch.testing.assert_close(expert_ffn(*case[:6], "swiglu", backend=backend).detach(), want.detach(), **TOL)
    assert bool(count_grouped_mm) == grouped
    assert backend in BACKENDS
    moe = MoE(16, 8, num_experts=4, top_k=2, activation="geglu", backend=backend)
    moe(torch.randn(5, 16))[0].sum().backward()
    assert moe.experts.w_in.grad is not None


def test_allocations_here_are_garbage():
    """The imported autouse fixture is active in this module (else the tests above could pass on zeroed memory)."""
    assert torch.empty(3).isnan().all() and torch.zeros(1).new_empty(2).isnan().all()
