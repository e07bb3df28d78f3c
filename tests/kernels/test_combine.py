"""The gate-weighted combine (scatter-add to token order) and its backward against the loop oracle."""

from __future__ import annotations

import pytest
import torch

from tests.kernels import loops
from tests.kernels.common import DEVICE, TOKENS, TOL, TOP_K, kernel_tier

pytestmark = kernel_tier


def run_case(token_idx: torch.Tensor, num_tokens: int, dim: int) -> None:
    from moezoo.kernels import combine_bwd, combine_fwd

    num_pairs = token_idx.shape[0]
    y = torch.randn(num_pairs, dim, requires_grad=True)
    gate = torch.rand(num_pairs, requires_grad=True)
    out = combine_fwd(y.detach().to(DEVICE), gate.detach().to(DEVICE), token_idx.to(DEVICE), num_tokens)
    want = loops.combine(y, gate, token_idx, num_tokens)
    torch.testing.assert_close(out.cpu(), want.detach(), **TOL)
    dout = torch.randn(num_tokens, dim)
    if num_pairs:
        want_dy, want_dgate = torch.autograd.grad(want, [y, gate], dout)
    else:
        want_dy, want_dgate = torch.zeros_like(y), torch.zeros_like(gate)
    dy, dgate = combine_bwd(dout.to(DEVICE), y.detach().to(DEVICE), gate.detach().to(DEVICE), token_idx.to(DEVICE))
    torch.testing.assert_close(dy.cpu(), want_dy, **TOL)
    torch.testing.assert_close(dgate.cpu(), want_dgate, **TOL)
    only_dgate = combine_bwd(
        dout.to(DEVICE), y.detach().to(DEVICE), gate.detach().to(DEVICE), token_idx.to(DEVICE), compute_dy=False
    )
    assert only_dgate[0] is None
    torch.testing.assert_close(only_dgate[1].cpu(), want_dgate, **TOL)


@pytest.mark.parametrize("k", TOP_K)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_combine_top_k_pairs(num_tokens, k):
    """T*K pairs, shuffled: every token receives k rows."""
    token_idx = torch.arange(num_tokens).repeat_interleave(k)
    run_case(token_idx[torch.randperm(token_idx.shape[0])], num_tokens, 24)


@pytest.mark.parametrize("num_tokens", TOKENS)
def test_combine_any_pair_list(num_tokens):
    """Tokens owning 0..many pairs, repeated tokens within one tile, a model dim above one tile."""
    run_case(torch.randint(0, num_tokens, (2 * num_tokens + 3,)), num_tokens, 300)


def test_combine_no_pairs():
    run_case(torch.zeros(0, dtype=torch.long), 5, 16)
