"""``moe_dit``: shapes, adaLN-Zero start, dense twin at equal active width, routers, bad input."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import MoE
from moezoo.models import create_model, list_models
from moezoo.models.dit import MoEDiT


def _inputs(batch=3, size=8):
    return torch.randn(batch, 1, size, size), torch.rand(batch) * 1000, torch.tensor([0, 5, 10])[:batch]


def test_family_is_registered_with_debug_tiny_small():
    assert {"moe_dit_debug", "moe_dit_tiny", "moe_dit_small"} <= set(list_models("moe_dit_*"))


ROUTER_CASES = [
    ("promoe", dict(num_experts=5, top_k=1, num_shared_experts=1)),
    ("topk", {}),
    ("expert_choice", {}),
    ("sinkhorn", dict(top_k=1)),
]


@pytest.mark.parametrize("router,kwargs", ROUTER_CASES)
def test_forward_shapes_and_aux_per_moe_block(router, kwargs):
    model = create_model("moe_dit_debug", moe={"router": router, **kwargs})
    x, t, y = _inputs()
    out, auxes = model.forward_with_aux(x, t, y)
    assert out.shape == x.shape
    assert len(auxes) == sum(isinstance(m, MoE) for m in model.modules()) == 2
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the final layer starts at zero
    out.sum().backward()


def test_promoe_dit_sends_null_label_tokens_to_the_unconditional_expert():
    model = create_model("moe_dit_debug", moe=dict(router="promoe", num_experts=5, top_k=1, num_shared_experts=1))
    x, t, y = _inputs()
    _, auxes = model.forward_with_aux(x, t, y)
    tokens = 16
    for aux in auxes:
        sample = aux.routing.token_idx_N // tokens
        assert torch.equal(aux.routing.expert_idx_N == 4, y[sample] == 10)


def _ffn_params(model: MoEDiT) -> tuple[int, int]:
    """(dense FFN params a token uses, of which in MoE blocks) counted per block."""
    total = 0
    for block in model.blocks:
        ffn = block.ffn
        if isinstance(ffn, MoE):
            per_expert = sum(p.numel() for p in ffn.experts.parameters()) // ffn.num_experts
            shared = sum(p.numel() for p in ffn.shared.parameters()) if ffn.shared is not None else 0
            total += ffn.top_k * per_expert + shared
        else:
            total += sum(p.numel() for p in ffn.parameters())
    return total, 0


@pytest.mark.parametrize("kwargs", [dict(router="topk", top_k=2),
                                    dict(router="promoe", num_experts=5, top_k=1, num_shared_experts=1)])  # fmt: skip
def test_dense_twin_has_the_same_active_ffn_width(kwargs):
    moe = create_model("moe_dit_tiny", moe=kwargs)
    dense = create_model("moe_dit_tiny", moe={**kwargs, "dense": True})
    for b_moe, b_dense in zip(moe.blocks, dense.blocks):
        if isinstance(b_moe.ffn, MoE):
            assert b_dense.ffn.hidden_dim == b_moe.ffn.active_ffn_dim == 2 * 192
    # Weight matrices per token agree (expert FFNs carry biases in neither or both: compare matrix sizes).
    assert abs(_ffn_params(moe)[0] - _ffn_params(dense)[0]) <= 4 * 2 * 192 + 96 * 4


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="img_size=28 must be divisible by patch_size=5"):
        create_model("moe_dit_tiny", patch_size=5)
    model = create_model("moe_dit_debug")
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match=r"class ids y must be in \[0, 10\)"):
        model(x, t, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="class ids"):
        model(x, t, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(3, 1, 6, 6), t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="y must be an integer"):
        model(x, t, torch.zeros(3))
