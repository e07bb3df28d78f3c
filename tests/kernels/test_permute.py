"""The block-padded expert layout against the hand-built one."""

from __future__ import annotations

import pytest
import torch

from tests.kernels import loops
from tests.kernels.common import DEVICE, LAYOUTS, TOKENS, TOP_K, kernel_tier, make_experts

pytestmark = kernel_tier


def check_layout(experts: torch.Tensor, num_experts: int, block_m: int) -> None:
    from moezoo.kernels import max_row_blocks, permute_fwd

    layout = permute_fwd(experts.to(DEVICE), num_experts, block_m)
    want = loops.expected_layout(experts.tolist(), num_experts, block_m)
    num_pairs = experts.shape[0]
    blocks = max_row_blocks(num_pairs, num_experts, block_m)
    used = want["block_offsets"][-1]
    assert layout.block_m == block_m
    assert layout.tokens_per_expert_E.tolist() == want["counts"]
    assert layout.block_offsets_E1.tolist() == want["block_offsets"]
    assert layout.block_expert_B.shape == (blocks,)
    assert layout.block_expert_B.tolist() == want["block_expert"] + [-1] * (blocks - used)
    assert layout.sorted_pair_P.shape == (blocks * block_m,)
    assert layout.sorted_pair_P.tolist() == want["sorted_pair"] + [-1] * ((blocks - used) * block_m)
    slot_of_pair = layout.slot_of_pair_N.long().cpu()
    assert torch.equal(layout.sorted_pair_P.long().cpu()[slot_of_pair], torch.arange(num_pairs))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", TOP_K)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_layout_matches_loop(num_tokens, k, layout):
    check_layout(make_experts(num_tokens * k, 6, layout), 6, 32)


@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_block_sizes(block_m):
    check_layout(make_experts(300, 5, "random"), 5, block_m)


def test_single_expert_and_no_pairs():
    check_layout(torch.zeros(37, dtype=torch.long), 1, 16)
    check_layout(torch.zeros(0, dtype=torch.long), 4, 32)


def test_many_experts_many_pair_blocks():
    """Few pairs per expert, two scan chunks (16 pair blocks each at 512 padded experts), int32 expert ids."""
    check_layout(torch.randint(0, 300, (2500,), dtype=torch.int32), 300, 64)


def test_rejects_bad_block_size():
    from moezoo.kernels import permute_fwd

    with pytest.raises(ValueError, match="block_m"):
        permute_fwd(torch.zeros(4, dtype=torch.long, device=DEVICE), 2, 24)
