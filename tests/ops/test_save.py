"""What the fused CPU path's forward keeps for backward: ``save="h"`` (the pre-activations only; the backward
re-gathers the inputs and recomputes the activation) and ``save="all"`` (also the gathered inputs, the activation
output before the gate and, for gated forms, act(gate)), each with both ways of running the expert GEMMs, against
the naive pair loop of ``tests/oracles.py``: the output and the gradients of x, gate, w_in, w_out, b_in and b_out.
Every ``torch.empty``/``empty_like``/``new_empty`` is pre-filled with garbage (``tests/kernels/conftest.py``), so a
kept row or workspace left unwritten fails. Also: ``"all"`` keeps more bytes than ``"h"``, the custom ops' fake
implementations agree with the real ones, and the rule that chooses (``choose_save``)."""

from __future__ import annotations

import pytest
import torch

import moezoo.ops.fused as fused
from moezoo.ops import BACKENDS, expert_ffn
from tests import oracles
from tests.kernels.conftest import garbage_outputs  # noqa: F401  (autouse: garbage-filled allocations)
from tests.ops.test_bias_activations import outputs_and_grads
from tests.ops.test_grouped_mm import make_case

SAVES = ["h", "all"]
GEMMS = ["loop", "grouped_mm"]
NAMES = ["out", "dx", "dgate", "dw_in", "dw_out", "db_in", "db_out"]
# torch._grouped_mm takes no float64: the grouped runs are fp32 against the float64 oracle of the same values
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def as_float64(case):
    return tuple(t if t is None or not t.is_floating_point() else t.detach().double().requires_grad_() for t in case)


def assert_matches_oracle(save, gemm, case, activation):
    dtype = case[0].dtype
    got = outputs_and_grads(lambda *a: fused.expert_ffn_fused(*a, gemm=gemm, save=save), case, activation)
    want = outputs_and_grads(oracles.expert_ffn, as_float64(case), activation)
    assert len(got) == len(want)
    for name, g, w in zip(NAMES, got, want):
        tol = TOL[torch.float32] if name == "dgate" else TOL[dtype]  # the gate is fp32
        torch.testing.assert_close(
            g, w.to(g.dtype), **tol, msg=lambda m, n=name: f"{save} {gemm} {activation} {n}: {m}"
        )


def case_for(gemm, activation, bias, experts, num_tokens, k):
    return make_case(
        activation, bias, experts, num_tokens, k, dtype=torch.float32 if gemm == "grouped_mm" else torch.float64
    )


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu", "geglu"])
def test_save_modes_match_the_oracle(save, gemm, activation, bias):
    """One chunk: with grouped_mm the ``whole`` case (h is the grouped product itself)."""
    experts = torch.randint(0, 4, (13 * 2,))  # the last of 5 experts gets no pairs
    assert_matches_oracle(save, gemm, case_for(gemm, activation, bias, experts, 13, 2), activation)


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False), ("reglu", True)])
def test_save_modes_with_experts_cut_by_chunks(monkeypatch, save, gemm, activation, bias):
    """64-row chunks: the kept full-length tensors are written chunk by chunk, experts span several chunks and an
    empty expert sits between two chunks' experts."""
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 1)
    experts = torch.cat([torch.zeros(70), torch.full((30,), 1), torch.full((60,), 3), torch.full((50,), 4)]).long()
    experts = experts[torch.randperm(experts.numel())]
    assert_matches_oracle(save, gemm, case_for(gemm, activation, bias, experts, 105, 2), activation)


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("layout", ["all_on_one", "one_token_k1"])
def test_save_modes_on_edge_layouts(save, layout):
    num_tokens, k = {"all_on_one": (17, 3), "one_token_k1": (1, 1)}[layout]
    experts = torch.full((num_tokens * k,), 3) if layout == "all_on_one" else torch.randint(0, 5, (num_tokens * k,))
    assert_matches_oracle(save, "loop", case_for("loop", "swiglu", True, experts, num_tokens, k), "swiglu")


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("wanted", ["x", "gate", "w_in", "w_out"])
def test_save_modes_with_one_gradient_asked_for(save, wanted):
    """Only one input requires grad: the backward skips the other gradients (and, with ``"all"``, scales the
    output gradients by the gate only where it needs to)."""
    case = case_for("loop", "swiglu", True, torch.randint(0, 5, (26,)), 13, 2)
    names = ["x", "token", "expert", "gate", "w_in", "w_out", "b_in", "b_out"]
    plain = ("token", "expert")
    case = tuple(t if t is None or n in plain else t.detach().requires_grad_(n == wanted) for n, t in zip(names, case))
    index = names.index(wanted)
    got = torch.autograd.grad(fused.expert_ffn_fused(*case[:6], "swiglu", *case[6:], save=save).sum(), case[index])
    want = torch.autograd.grad(oracles.expert_ffn(*case[:6], "swiglu", *case[6:]).sum(), case[index])
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float64])


def saved_bytes(fn):
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_all_saves_more_than_h(activation):
    """``"all"`` keeps the gathered inputs (N, D), the activation (N, F) and, gated, act(gate) (N, F) on top."""
    case = make_case(activation, True, torch.randint(0, 5, (40 * 2,)), 40, 2)
    run = lambda save: saved_bytes(lambda: fused.expert_ffn_fused(*case[:6], activation, *case[6:], save=save))
    rows, dim, ffn_dim = 80, case[0].shape[1], case[5].shape[1]
    extra = rows * (dim + ffn_dim * (2 if activation == "swiglu" else 1)) * 4
    assert run("all") == run("h") + extra


def test_without_grad_nothing_is_kept():
    case = make_case("swiglu", True, torch.randint(0, 5, (12,)), 6, 2)
    plain = tuple(None if t is None else t.detach() for t in case)
    outs = fused.fused_expert_ffn_op(*plain, "swiglu", False, "loop", "all")
    assert [tuple(t.shape) for t in outs[1:2] + outs[3:]] == [(0, 16), (0, 12), (0, 8), (0, 8)]


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", True)])
def test_custom_ops_pass_opcheck_with_save_all(gemm, activation, bias):
    """Fake implementations (the kept tensors' shapes follow the input shapes), schemas and autograd."""
    case = make_case(activation, bias, torch.randint(0, 4, (18,)), 9, 2)
    x, token_idx, expert_idx, gate, w_in, w_out, b_in, b_out = case
    args = (x, token_idx, expert_idx, gate, w_in, w_out, b_in, b_out, activation, True, gemm, "all")
    torch.library.opcheck(fused.fused_expert_ffn_op, args)
    out, h, order, *kept = fused.fused_expert_ffn_op(*args)
    assert (
        kept[0].shape == (18, 12)
        and kept[1].shape == (18, 8)
        and kept[2].shape == (18 if activation == "swiglu" else 0, 8)
    )
    saved = (x.detach(), token_idx, expert_idx, gate.detach(), w_in.detach(), w_out.detach())
    saved = (*saved, None if b_out is None else b_out.detach(), h, order, activation)
    for flags in ((True, True, True, True, bias, bias), (False, True, False, True, False, bias)):
        torch.library.opcheck(fused.fused_expert_ffn_bwd_op, (torch.randn_like(out), *saved, *flags, gemm, *kept))


def test_check_save_and_the_rule():
    with pytest.raises(ValueError, match=r"save='everything' is unknown; choose one of \('auto', 'h', 'all'\)"):
        fused.expert_ffn_fused(*make_case("gelu", False, torch.zeros(2).long(), 2, 1)[:6], "gelu", save="everything")
    assert fused.choose_save("h") == "h"
    assert fused.choose_save("all") == "all"
    assert fused.choose_save("auto") == "h"  # "all" lost at every measured shape


@pytest.mark.parametrize("backend,save", [("torch_save_h", "h"), ("torch_save_all", "all")])
def test_backend_names_fix_the_save(monkeypatch, backend, save):
    seen = []
    real = fused.choose_save
    monkeypatch.setattr(fused, "choose_save", lambda s, *a: seen.append(real(s, *a)) or real(s, *a))
    case = make_case("swiglu", False, torch.randint(0, 5, (8,)), 8, 1)
    out = expert_ffn(*case[:6], "swiglu", backend=backend)
    torch.testing.assert_close(out.detach(), oracles.expert_ffn(*case[:6], "swiglu").detach(), **TOL[torch.float32])
    assert backend in BACKENDS and seen and set(seen) == {save}
