"""Functions run in spawned ranks by the tests (top level, so that ``spawn`` can import them)."""

from __future__ import annotations

import datetime
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from moezoo.layers import MoE
from moezoo.parallel import (
    CollectiveError,
    clip_grad_norm_,
    full_optimizer_state,
    full_state_dict,
    init_expert_parallel,
    num_parameters,
    shard_experts,
)
from moezoo.parallel.comm import all_gather_rows
from moezoo.parallel.experts import ExpertParallelExperts
from tests.parallel.cases import CASES, build, inputs, loss_of
from tests.parallel.dist_utils import dist_env

CLIP_NORM = 0.5


def _init(rank: int, world: int, port: int) -> None:
    dist_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _grads(moe: MoE) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Non-expert gradients of this rank, and the full expert gradients gathered over the group."""
    local, experts = {}, {}
    for name, param in moe.named_parameters():
        if name.startswith("experts.") and isinstance(moe.experts, ExpertParallelExperts):
            experts[name] = all_gather_rows(param.grad, moe.experts.groups.ep_group)
        elif param.grad is not None:
            local[name] = param.grad.clone()
    return local, experts


def layer_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every case of ``cases.py`` as an EP=world layer; results saved for the oracle in the parent."""
    _init(rank, world, port)
    groups = init_expert_parallel(world, timeout_s=60)
    results: dict[str, dict] = {}
    for case in CASES:
        moe = build(case)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sharded = shard_experts(moe, groups)
        x, mask, cotangent = inputs(case, rank)
        x.requires_grad_(True)
        y, loss = loss_of(moe, x, mask, cotangent)
        loss.backward()
        grads, expert_grads = _grads(moe)
        results[case.name] = dict(
            y=y.detach(),
            x_grad=x.grad,
            grads=grads,
            expert_grads=expert_grads,
            sharded=sharded,
            warned=[str(w.message) for w in caught],
            local_expert_shape=tuple(moe.experts.w_in.shape),
            num_parameters=num_parameters(moe),
            state={k: v.clone() for k, v in full_state_dict(moe).items()},
        )
        if case is CASES[0]:
            optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-2)
            optimizer.step()
            results[case.name]["optimizer"] = full_optimizer_state(optimizer, moe)
            # a full checkpoint loads into a differently initialised sharded layer
            torch.manual_seed(7)
            other = MoE(moe.dim, 8, **case.moe_kwargs)
            shard_experts(other, groups)
            other.load_state_dict(build(case).state_dict())
            reference = build(case)
            shard_experts(reference, groups)
            with torch.no_grad():
                results[case.name]["reload_equal"] = bool(torch.equal(other(x.detach())[0], reference(x.detach())[0]))
            clipped = build(case)
            shard_experts(clipped, groups)
            loss_of(clipped, x.detach(), mask, cotangent)[1].backward()
            total = clip_grad_norm_(clipped, list(clipped.parameters()), max_norm=CLIP_NORM)
            clipped_grads, clipped_expert_grads = _grads(clipped)
            results[case.name]["clip"] = dict(total=total, grads=clipped_grads, expert_grads=clipped_expert_grads)
    # EP size 1: nothing is replaced, the forward is the single-process one bit for bit
    single = init_expert_parallel(1, timeout_s=60)
    moe = build(CASES[0])
    results["ep1"] = dict(sharded=shard_experts(moe, single), y=moe(inputs(CASES[0], rank)[0])[0].detach())
    results["stats"] = dict(bytes_sent=groups.stats.bytes_sent, calls=groups.stats.calls)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def failure_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 stalls in one step, then dies in the next; rank 0 must get a CollectiveError each time, not hang."""
    _init(rank, world, port)
    stalled = init_expert_parallel(world, timeout_s=3)
    crashed = init_expert_parallel(world, timeout_s=3)
    case = CASES[0]
    moe_a, moe_b = build(case), build(case)
    shard_experts(moe_a, stalled)
    shard_experts(moe_b, crashed)
    x = inputs(case, rank)[0]
    moe_a(x)  # a healthy step first
    report = Path(out_dir) / f"rank{rank}.txt"
    if rank == 1:
        time.sleep(5)  # stalls past rank 0's 3 s collective timeout
        dist.barrier()
        report.write_text("crashing\n")
        sys.stdout.flush()
        os._exit(3)  # dies mid-step, without a word to its peers
    lines = []
    for moe in (moe_a, moe_b):
        start = time.monotonic()
        try:
            moe(x)[0].sum().backward()
            lines.append("no error")
        except CollectiveError as err:
            lines.append(f"{time.monotonic() - start:.1f}s {err}")
            if moe is moe_b:
                report.write_text("\n".join(lines) + "\n")
                raise  # as in a real run: the error ends this rank too
        if moe is moe_a:
            dist.barrier()
    report.write_text("\n".join(lines) + "\n")


def replica_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """EP=2 inside a world of 4: two replicas of each expert shard; gradients finished as under DDP."""
    from moezoo.parallel import reduce_expert_grads

    _init(rank, world, port)
    groups = init_expert_parallel(2, timeout_s=60)
    case = CASES[0]
    moe = build(case)
    shard_experts(moe, groups)
    x, cotangent = replica_inputs(rank)
    _, loss = loss_of(moe, x, None, cotangent)
    loss.backward()
    reduce_expert_grads(moe, groups)
    for name, param in moe.named_parameters():  # what DDP does to the replicated parameters
        if not name.startswith("experts.") and param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world
    grads, expert_grads = _grads(moe)
    torch.save(dict(grads=grads, expert_grads=expert_grads, ep_rank=groups.ep_rank), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def replica_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(77 + rank)
    return torch.randn(9, 12, generator=generator), torch.randn(9, 12, generator=generator)
