"""Fused routing (score, biased top-k, renormalisation, counts) and its backward against the loop oracle."""

from __future__ import annotations

import pytest
import torch

from tests import oracles
from tests.kernels import loops
from tests.kernels.common import DEVICE, TOKENS, TOL, TOP_K, kernel_tier

pytestmark = kernel_tier

# (score, with bias, normalize, scale): TopKRouter with and without renormalisation, SigmoidLossFreeRouter.
VARIANTS = {
    "softmax_normalized": ("softmax", False, True, 1.0),
    "softmax_plain": ("softmax", False, False, 1.0),
    "sigmoid_bias_scaled": ("sigmoid", True, True, 2.5),
    "sigmoid_plain": ("sigmoid", True, False, 1.0),
}


def run_case(num_tokens: int, num_experts: int, k: int, variant: str) -> None:
    from moezoo.kernels import routing_bwd, routing_fwd

    score, with_bias, normalize, scale = VARIANTS[variant]
    logits = torch.randn(num_tokens, num_experts) * 2
    bias = torch.randn(num_experts) * 0.5 if with_bias else None
    idx, weight, counts = routing_fwd(
        logits.to(DEVICE), k, score, bias.to(DEVICE) if bias is not None else None, normalize, scale
    )
    leaf = logits.clone().requires_grad_()
    want_idx, want_weight = loops.route(leaf, k, score, bias, normalize, scale)
    assert idx.dtype == torch.int64 and idx.shape == (num_tokens, k)
    assert idx.cpu().tolist() == want_idx
    torch.testing.assert_close(weight.cpu(), want_weight.detach(), **TOL)
    want_counts = [sum(row.count(e) for row in want_idx) for e in range(num_experts)]
    assert counts.cpu().tolist() == want_counts
    dweight = torch.randn(num_tokens, k)
    (want_dlogits,) = torch.autograd.grad(want_weight, leaf, dweight) if num_tokens else (torch.zeros_like(leaf),)
    dlogits = routing_bwd(dweight.to(DEVICE), logits.to(DEVICE), idx, score, normalize, scale)
    torch.testing.assert_close(dlogits.cpu(), want_dlogits, **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", TOP_K)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_routing_matches_loop(num_tokens, k, variant):
    run_case(num_tokens, 6, k, variant)


@pytest.mark.parametrize("num_experts,k", [(1, 1), (64, 6), (33, 4)])
def test_routing_expert_counts(num_experts, k):
    run_case(37, num_experts, k, "softmax_normalized")
    run_case(37, num_experts, k, "sigmoid_bias_scaled")


def test_routing_agrees_with_shared_topk_oracle():
    """The softmax variant picks what ``tests/oracles.topk_pairs`` picks."""
    from moezoo.kernels import routing_fwd

    logits = torch.randn(50, 8)
    idx, weight, _ = routing_fwd(logits.to(DEVICE), 3, "softmax", None, True, 1.0)
    pairs = oracles.topk_pairs(torch.softmax(logits, -1), 3, normalize=True)
    assert [e for _, e, _ in pairs] == idx.reshape(-1).tolist()
    torch.testing.assert_close(weight.reshape(-1).cpu(), torch.tensor([w for _, _, w in pairs]), **TOL)


def test_routing_rejects_bad_arguments():
    from moezoo.kernels import routing_fwd

    logits = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        routing_fwd(logits, 4)
    with pytest.raises(ValueError, match="score"):
        routing_fwd(logits, 2, score="relu")
