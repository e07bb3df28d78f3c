"""Process groups and the differentiable token exchange of expert parallelism.

Legend: N rows sent by this rank, M rows received by this rank, D row width, P ranks of the expert-parallel group.

Ranks are laid out as ``world = replicas x P``: the expert-parallel (EP) group of global rank ``r`` is the block
``[P * (r // P), P * (r // P) + P)``; its replica group holds the ranks with the same position in their block
(they own the same experts and average those experts' gradients). With ``P == world`` every expert lives once.

The exchange uses ``all_to_all_single`` with variable split sizes, the one all-to-all form that both gloo (CPU)
and NCCL support. A collective that fails (a peer crashed, stalled past the group timeout) is re-raised as a
:class:`CollectiveError` naming the rank, the group and the operation, instead of hanging.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default group

DEFAULT_TIMEOUT_S = 300.0


class CollectiveError(RuntimeError):
    """A collective of the expert-parallel exchange failed or timed out (usually: another rank died)."""


@dataclass
class CommStats:
    """Bytes this rank sent to and received from other ranks in the expert-parallel exchange (both passes)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.calls = 0

    def add(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.calls += 1


@dataclass
class ExpertParallelGroups:
    """The process groups of one expert-parallel layout of the world."""

    ep_group: ProcessGroup
    replica_group: ProcessGroup
    ep_size: int
    ep_rank: int
    num_replicas: int
    world_size: int
    timeout_s: float
    stats: CommStats = field(default_factory=CommStats)


def _run(op: str, group: ProcessGroup, fn: Any) -> None:
    try:
        fn()
    except RuntimeError as err:  # gloo and NCCL report timeouts and closed peers as RuntimeError
        rank = dist.get_rank() if dist.is_initialized() else -1
        size = dist.get_world_size(group) if dist.is_initialized() else -1
        raise CollectiveError(
            f"expert-parallel {op} failed on global rank {rank} (group of {size} ranks): {err}. Another rank most "
            "likely failed or stopped mid-step; look for its error above. The collective timeout is the "
            "expert-parallel group's timeout (ExpertParallelStrategy(timeout_s=...) or init_expert_parallel(...))."
        ) from err


def init_expert_parallel(ep_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> ExpertParallelGroups:
    """Create the EP and replica groups of an initialised world; every rank must call this, in the same order."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_expert_parallel needs an initialised torch.distributed process group")
    world = dist.get_world_size()
    rank = dist.get_rank()
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(
            f"expert_parallel_size must be a positive integer dividing the world size {world}, got {ep_size!r}"
        )
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    timeout = datetime.timedelta(seconds=timeout_s)
    num_replicas = world // ep_size
    ep_group = replica_group = None
    for block in range(num_replicas):  # every rank creates every group, in the same order
        ranks = list(range(block * ep_size, (block + 1) * ep_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            ep_group = group
    for position in range(ep_size):
        ranks = list(range(position, world, ep_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            replica_group = group
    return ExpertParallelGroups(
        ep_group=ep_group,
        replica_group=replica_group,
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        num_replicas=num_replicas,
        world_size=world,
        timeout_s=timeout_s,
    )


def all_to_all_rows(
    x_ND: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group: ProcessGroup
) -> Tensor:
    """Send ``input_splits[p]`` consecutive rows to rank ``p``; receive ``output_splits[p]`` rows from it."""
    out_MD = x_ND.new_empty((int(sum(output_splits)), *x_ND.shape[1:]))
    x_ND = x_ND.contiguous()
    _run(
        "all_to_all",
        group,
        lambda: dist.all_to_all_single(out_MD, x_ND, list(output_splits), list(input_splits), group=group),
    )
    return out_MD


def _count_remote(
    stats: CommStats, x_ND: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group: ProcessGroup
) -> None:
    """Add the bytes that crossed to or from other ranks (the rows a rank sends itself do not count)."""
    me = dist.get_rank(group)
    row_bytes = x_ND.element_size() * int(torch.Size(x_ND.shape[1:]).numel())
    sent = (sum(input_splits) - input_splits[me]) * row_bytes
    received = (sum(output_splits) - output_splits[me]) * row_bytes
    stats.add(sent, received)


class _AllToAll(torch.autograd.Function):
    """Differentiable exchange: the backward sends the gradients back along the reversed splits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_ND: Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: ProcessGroup,
        stats: CommStats | None,
    ) -> Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        ctx.stats = stats
        out_MD = all_to_all_rows(x_ND, output_splits, input_splits, group)
        if stats is not None:
            _count_remote(stats, x_ND, output_splits, input_splits, group)
        return out_MD

    @staticmethod
    def backward(ctx: Any, grad_MD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        grad_ND = all_to_all_rows(grad_MD, input_splits, output_splits, ctx.group)
        if ctx.stats is not None:
            _count_remote(ctx.stats, grad_MD, input_splits, output_splits, ctx.group)
        return grad_ND, None, None, None, None


def all_to_all(
    x_ND: Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: ProcessGroup,
    stats: CommStats | None = None,
) -> Tensor:
    """:func:`all_to_all_rows` with autograd: gradients flow back to the ranks that sent the rows."""
    out = _AllToAll.apply(x_ND, list(output_splits), list(input_splits), group, stats)
    assert isinstance(out, Tensor)
    return out


def exchange_counts(send_counts_PX: Tensor, group: ProcessGroup, stats: CommStats | None = None) -> Tensor:
    """Row ``p`` of ``send_counts_PX`` goes to rank ``p``; row ``p`` of the result came from rank ``p``."""
    send = send_counts_PX.contiguous()
    recv = torch.empty_like(send)
    splits = [1] * send.shape[0]
    _run("count exchange", group, lambda: dist.all_to_all_single(recv, send, splits, splits, group=group))
    if stats is not None:
        row_bytes = send[0].numel() * send.element_size()
        stats.add(row_bytes * (send.shape[0] - 1), row_bytes * (recv.shape[0] - 1))
    return recv


def all_reduce_(tensor: Tensor, group: ProcessGroup, op: str = "gradient all-reduce") -> Tensor:
    """In-place SUM all-reduce with the expert-parallel error handling."""
    _run(op, group, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group))
    return tensor


def all_gather_rows(x: Tensor, group: ProcessGroup, op: str = "expert all-gather") -> Tensor:
    """Concatenate every rank's equally shaped ``x`` along dim 0, in rank order of ``group``."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    x = x.contiguous()
    _run(op, group, lambda: dist.all_gather(parts, x, group=group))
    return torch.cat(parts, dim=0)
