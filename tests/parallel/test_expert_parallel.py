"""An EP=2 MoE layer on 2 gloo ranks equals the single-process layer: outputs and every gradient (fp32)."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import MoE
from moezoo.parallel import ExpertParallelGroups, routing_scope, shard_experts
from tests.parallel.cases import CASES, WORLD, build, inputs, loss_of
from tests.parallel.dist_utils import run_ranks
from tests.parallel.workers import CLIP_NORM, layer_worker

ATOL, RTOL = 2e-6, 1e-5  # fp32: the two paths sum the same terms in a different order


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_layer")
    run_ranks(layer_worker, WORLD, args=(str(out),), timeout_s=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _oracle(case):
    """The single-process layer on each rank's tokens; expert gradients are summed over the ranks' losses."""
    per_rank, expert_grads = [], {}
    for rank in range(WORLD):
        moe = build(case)
        x, mask, cotangent = inputs(case, rank)
        x.requires_grad_(True)
        y, loss = loss_of(moe, x, mask, cotangent)
        loss.backward()
        grads = {}
        for name, param in moe.named_parameters():
            if name.startswith("experts."):
                expert_grads[name] = expert_grads.get(name, 0) + param.grad
            elif param.grad is not None:
                grads[name] = param.grad
        per_rank.append(dict(y=y.detach(), x_grad=x.grad, grads=grads))
    return per_rank, expert_grads


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ep2_layer_equals_single_process(rank_results, case):
    oracle, oracle_expert_grads = _oracle(case)
    for rank in range(WORLD):
        got = rank_results[rank][case.name]
        assert got["sharded"] == [""], "the layer itself was not sharded"
        num_experts = build(case).num_experts
        assert got["local_expert_shape"][0] == num_experts // WORLD
        assert got["num_parameters"] == sum(p.numel() for p in build(case).parameters())
        _close(got["y"], oracle[rank]["y"], f"rank {rank} output")
        _close(got["x_grad"], oracle[rank]["x_grad"], f"rank {rank} input gradient")
        assert got["grads"].keys() == oracle[rank]["grads"].keys()
        for name, grad in oracle[rank]["grads"].items():
            _close(got["grads"][name], grad, f"rank {rank} gradient of {name}")
        assert got["expert_grads"].keys() == oracle_expert_grads.keys()
        for name, grad in oracle_expert_grads.items():
            _close(got["expert_grads"][name], grad, f"rank {rank} expert gradient {name}")
        reference = build(case)
        assert got["state"].keys() == reference.state_dict().keys()
        for key, value in reference.named_parameters():  # buffers hold this rank's routing statistics
            assert torch.equal(got["state"][key], value.detach()), f"full_state_dict differs at {key}"


def test_steered_cases_really_leave_experts_empty():
    """The premises of two cases: an expert gets no token from rank 1; rank 1's experts get no token at all."""
    case = CASES[0]
    routing = build(case).router(inputs(case, 1)[0])
    assert 0 not in routing.expert_idx_N.tolist() and 0 in build(case).router(inputs(case, 0)[0]).expert_idx_N
    case = next(c for c in CASES if c.steer == "rank0_experts_only")
    for rank in range(WORLD):
        assert routing_scope(build(case).router) == "token"
        assert int(build(case).router(inputs(case, rank)[0]).expert_idx_N.max()) < 2


def test_batch_dependent_routers_warn(rank_results):
    for case in CASES:
        warned = rank_results[0][case.name]["warned"]
        scope = routing_scope(build(case).router)
        assert bool(warned) == (scope == "local_batch"), (case.name, warned)
        if warned:
            assert "local batch" in warned[0]


def test_optimizer_state_and_checkpoint_are_full_size(rank_results):
    case = CASES[0]
    _, expert_grads = _oracle(case)
    moe = build(case)
    for name, param in moe.named_parameters():
        param.grad = expert_grads.get(name, torch.zeros_like(param))
    optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    optimizer.step()
    names = [name for name, _ in moe.named_parameters()]
    expected = optimizer.state_dict()["state"]
    for rank in range(WORLD):
        got = rank_results[rank][case.name]
        assert got["reload_equal"], "a full state dict did not load into a sharded layer"
        for idx, name in enumerate(names):
            if name.startswith("experts."):
                for key in ("exp_avg", "exp_avg_sq"):
                    _close(got["optimizer"]["state"][idx][key], expected[idx][key], f"AdamW {key} of {name}")


def test_ep1_is_the_single_process_layer(rank_results):
    for rank in range(WORLD):
        got = rank_results[rank]["ep1"]
        assert got["sharded"] == []
        assert torch.equal(got["y"], build(CASES[0])(inputs(CASES[0], rank)[0])[0].detach())
    assert rank_results[0]["stats"]["bytes_sent"] > 0


def test_ep_size_one_groups_change_nothing():
    moe = build(CASES[0])
    before = moe.experts
    groups = ExpertParallelGroups(None, None, ep_size=1, ep_rank=0, num_replicas=1, world_size=1, timeout_s=1.0)
    assert shard_experts(moe, groups) == [] and moe.experts is before


def test_ep_size_must_divide_num_experts():
    moe = MoE(8, 8, num_experts=3, top_k=1)
    groups = ExpertParallelGroups(None, None, ep_size=2, ep_rank=0, num_replicas=1, world_size=2, timeout_s=1.0)
    with pytest.raises(ValueError, match="expert_parallel_size=2 must divide"):
        shard_experts(moe, groups)


def test_gradient_norm_clipping_counts_each_expert_once(rank_results):
    case = CASES[0]
    oracle, expert_grads = _oracle(case)
    expert_sq = sum(float(g.pow(2).sum()) for g in expert_grads.values())
    scales = []
    for rank in range(WORLD):
        clip = rank_results[rank][case.name]["clip"]
        total = (sum(float(g.pow(2).sum()) for g in oracle[rank]["grads"].values()) + expert_sq) ** 0.5
        assert total > CLIP_NORM
        torch.testing.assert_close(float(clip["total"]), total, rtol=1e-5, atol=0.0)
        scales.append(CLIP_NORM / (total + 1e-6))
        for name, grad in oracle[rank]["grads"].items():
            _close(clip["grads"][name], grad * scales[rank], f"rank {rank} clipped {name}")
    # here the router gradients (and so the scales) differ per rank; under DDP they are equal on every rank
    local = build(case).num_experts // WORLD
    for name, grad in expert_grads.items():
        expected = torch.cat([grad[r * local : (r + 1) * local] * scales[r] for r in range(WORLD)])
        _close(rank_results[0][case.name]["clip"]["expert_grads"][name], expected, f"clipped {name}")
