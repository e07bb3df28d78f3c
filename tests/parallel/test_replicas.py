"""EP=2 x 2 replicas (4 ranks): every gradient equals the single-process gradient of the mean of the 4 losses."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.cases import CASES, build, loss_of
from tests.parallel.dist_utils import run_ranks
from tests.parallel.workers import replica_inputs, replica_worker

WORLD = 4


@pytest.mark.slow
def test_expert_and_replicated_gradients_with_replicas(tmp_path):
    run_ranks(replica_worker, WORLD, args=(str(tmp_path),), timeout_s=540)  # 4 processes on 2 cores
    moe = build(CASES[0])
    total = 0
    for rank in range(WORLD):
        x, cotangent = replica_inputs(rank)
        total = total + loss_of(moe, x, None, cotangent)[1]
    (total / WORLD).backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["ep_rank"] == rank % 2
        for name, param in moe.named_parameters():
            actual = got["expert_grads"][name] if name.startswith("experts.") else got["grads"][name]
            torch.testing.assert_close(
                actual, param.grad, atol=2e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
            )
