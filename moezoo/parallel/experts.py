"""Expert parallelism: the experts of each MoE layer sharded over an expert-parallel process group.

Legend: T tokens, D model dim, F expert hidden, H = F (GELU) or 2F (SwiGLU), E experts, L = E / P local experts,
P ranks of the expert-parallel group, N routed pairs of this rank, M rows this rank receives.

Forward of one layer on every rank of the group (:class:`ExpertParallelExperts`):

1. the router runs locally on this rank's tokens (the :class:`~moezoo.layers.MoE` layer is unchanged);
2. pairs are sorted by expert, so they are contiguous by owning rank (rank ``p`` owns experts
   ``[p * L, (p + 1) * L)``), and the ``(P, L)`` pair counts are exchanged;
3. the input rows travel to their owners with ``all_to_all_single`` (variable splits);
4. each rank runs its L local experts on what it received with :func:`moezoo.ops.expert_ffn` (grouped);
5. the outputs travel back along the reversed splits and are combined with the gates, locally.

Both exchanges are autograd functions, so gradients reach the inputs and the router on the sending rank and
the expert weights on the owning rank. With ``P == 1`` nothing is replaced: the layer is the single-process one.

Routing is always computed on each rank's own tokens, exactly as under plain data parallelism. Routers whose
decision is per token (top-k without capacity, sigmoid loss-free, ReLU) give the same result however the batch
is split; routers whose decision depends on the batch (expert choice, Sinkhorn in training, top-k with a
capacity factor) decide over each rank's local batch, which :func:`shard_experts` says with a warning. Soft MoE
works: its groups are sequences, which never straddle ranks, and each expert's slots are sent to its owner.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moezoo.layers.chain import ChainOfExperts
from moezoo.layers.experts import GroupedExperts
from moezoo.layers.moe import MoE
from moezoo.layers.routers import Router
from moezoo.layers.stochastic import StochasticMoE
from moezoo.ops import expert_ffn
from moezoo.parallel.comm import (
    ExpertParallelGroups,
    all_gather_rows,
    all_reduce_,
    all_to_all,
    exchange_counts,
)

EXPERT_PARAMS = ("w_in", "w_out")


class ExpertParallelExperts(nn.Module):
    """This rank's ``L = E / P`` experts of a :class:`GroupedExperts`, with the exchange around them.

    Drop-in for ``MoE.experts``: same ``forward`` and ``forward_dense`` contracts, same parameter names. Its
    ``state_dict`` holds the local shard; :func:`full_state_dict` gathers the full expert set, and loading
    accepts either the local shard or the full ``(E, ...)`` tensors (this rank's slice is taken).
    """

    def __init__(self, experts: GroupedExperts, groups: ExpertParallelGroups) -> None:
        super().__init__()
        num_experts, size = experts.num_experts, groups.ep_size
        if getattr(experts, "b_in", None) is not None:
            raise ValueError("expert parallelism does not shard expert biases yet: build the MoE with bias=False")
        if num_experts % size:
            raise ValueError(
                f"expert_parallel_size={size} must divide the number of experts of every MoE layer; "
                f"a layer has num_experts={num_experts}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // size
        self.expert_offset = groups.ep_rank * self.num_local_experts
        self.dim = experts.dim
        self.ffn_dim = experts.ffn_dim
        self.activation = experts.activation
        self.groups = groups
        local = slice(self.expert_offset, self.expert_offset + self.num_local_experts)
        self.w_in = nn.Parameter(experts.w_in.detach()[local].clone(), requires_grad=experts.w_in.requires_grad)
        self.w_out = nn.Parameter(experts.w_out.detach()[local].clone(), requires_grad=experts.w_out.requires_grad)

    def extra_repr(self) -> str:
        return (
            f"experts {self.expert_offset}..{self.expert_offset + self.num_local_experts - 1} of {self.num_experts}"
            f" (rank {self.groups.ep_rank} of {self.groups.ep_size})"
        )

    def forward(
        self, x_TD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, gate_N: Tensor, backend: str | None = None
    ) -> Tensor:
        """``out[t] = sum over pairs of gate * expert(x[t])`` with the experts spread over the group."""
        size, local = self.groups.ep_size, self.num_local_experts
        group, stats = self.groups.ep_group, self.groups.stats
        order_N = torch.argsort(expert_idx_N, stable=True)
        send_PL = torch.bincount(expert_idx_N, minlength=self.num_experts).view(size, local)
        recv_PL = exchange_counts(send_PL, group, stats)
        splits = torch.stack([send_PL.sum(1), recv_PL.sum(1)]).tolist()  # one host sync for both
        send_splits, recv_splits = splits[0], splits[1]
        token_sorted_N = token_idx_N.index_select(0, order_N)
        x_recv_MD = all_to_all(x_TD.index_select(0, token_sorted_N), recv_splits, send_splits, group, stats)
        num_rows = x_recv_MD.shape[0]
        local_expert_M = (
            torch.arange(local, device=x_TD.device)
            .repeat(size)
            .repeat_interleave(recv_PL.reshape(-1), output_size=num_rows)
        )
        rows_M = torch.arange(num_rows, device=x_TD.device)
        ones_M = torch.ones(num_rows, device=x_TD.device, dtype=torch.float32)
        y_recv_MD = expert_ffn(
            x_recv_MD, rows_M, local_expert_M, ones_M, self.w_in, self.w_out, self.activation, backend=backend
        )
        y_back_ND = all_to_all(y_recv_MD, send_splits, recv_splits, group, stats)
        gate_sorted_N1 = gate_N.index_select(0, order_N).to(y_back_ND.dtype).unsqueeze(-1)
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_sorted_N, y_back_ND * gate_sorted_N1)

    def forward_dense(self, x_EMD: Tensor) -> Tensor:
        """Soft MoE slots ``(E, M, D) -> (E, M, D)``: each expert's rows are processed by its owner."""
        num_experts, rows, dim = x_EMD.shape
        x_TD = x_EMD.reshape(-1, dim)
        idx = torch.arange(x_TD.shape[0], device=x_EMD.device)
        expert_idx = torch.arange(num_experts, device=x_EMD.device).repeat_interleave(rows)
        gate = torch.ones(x_TD.shape[0], device=x_EMD.device, dtype=torch.float32)
        return self.forward(x_TD, idx, expert_idx, gate).reshape(num_experts, rows, dim)

    def full_weight(self, name: str) -> Tensor:
        """The full ``(E, ...)`` tensor of ``w_in`` or ``w_out``, gathered over the group (a collective)."""
        param = getattr(self, name)
        return all_gather_rows(param.detach(), self.groups.ep_group)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in EXPERT_PARAMS:
            key = prefix + name
            value = state_dict.get(key)
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == self.num_experts:
                state_dict[key] = value[self.expert_offset : self.expert_offset + self.num_local_experts]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def routing_scope(router: Router) -> str:
    """What a router's decision depends on: ``"token"``, ``"sequence"`` (Soft MoE) or ``"local_batch"``."""
    if router.kind == "soft":
        return "sequence"
    if router.depends_on_batch(training=True):  # capacity, expert choice, the balanced assignment in training
        return "local_batch"
    return str(getattr(router, "routing_scope", "token"))


def moe_layers(module: nn.Module) -> Iterator[tuple[str, MoE]]:
    for name, sub in module.named_modules():
        if isinstance(sub, MoE):
            yield name, sub


def expert_modules(module: nn.Module) -> Iterator[tuple[str, ExpertParallelExperts]]:
    for name, sub in module.named_modules():
        if isinstance(sub, ExpertParallelExperts):
            yield name, sub


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Fully qualified names of the sharded expert parameters (what data parallelism must not all-reduce)."""
    return [f"{name}.{p}" if name else p for name, _ in expert_modules(module) for p in EXPERT_PARAMS]


def common_expert_parallel_size(module: nn.Module, world_size: int) -> int:
    """The largest EP size dividing the world and every MoE layer's expert count (1 without MoE layers)."""
    size = world_size
    for _, moe in moe_layers(module):
        size = int(torch.gcd(torch.tensor(size), torch.tensor(moe.num_experts)))
    return size


def broadcast_experts(module: nn.Module, src: int = 0) -> None:
    """Copy every unsharded expert weight from global rank ``src`` (so shards come from one initialisation)."""
    for _, moe in moe_layers(module):
        if isinstance(moe.experts, GroupedExperts):
            for name in EXPERT_PARAMS:
                dist.broadcast(getattr(moe.experts, name).data, src=src)


def shard_experts(module: nn.Module, groups: ExpertParallelGroups) -> list[str]:
    """Replace the experts of every MoE layer in ``module`` by this rank's shard; return the layers' names.

    Idempotent (already sharded layers are kept). With ``groups.ep_size == 1`` nothing changes.
    """
    if groups.ep_size == 1:
        return []
    sharded, batch_dependent = [], []
    for name, moe in moe_layers(module):
        router = moe.router
        if not isinstance(router, Router) or router.kind not in ("sparse", "soft"):
            raise TypeError(
                f"MoE layer {name!r} has a router of kind {getattr(router, 'kind', None)!r}; expert parallelism "
                "supports routers that return (token, expert, gate) pairs ('sparse') and Soft MoE ('soft')"
            )
        if isinstance(moe, ChainOfExperts):
            raise ValueError(
                f"MoE layer {name!r} is a ChainOfExperts ({moe.num_iterations} routed passes over its experts); "
                "expert parallelism supports one routed pass per layer"
            )
        if isinstance(moe, StochasticMoE):
            raise ValueError(
                f"MoE layer {name!r} is a StochasticMoE (S2MoE: a clean and a noisy routed pass over its experts in "
                "training); expert parallelism supports one routed pass per layer"
            )
        if router.reads_experts:
            raise ValueError(
                f"MoE layer {name!r} has a router that reads every expert's weights ({type(router).__name__}); "
                "expert parallelism keeps only this rank's experts, so such a router cannot run sharded"
            )
        if router.carries_state:
            raise ValueError(
                f"MoE layer {name!r} has a router that passes state between layers ({type(router).__name__}, one GRU "
                "shared by every layer); expert parallelism does not support it (not implemented or tested with a "
                "recurrence across layers)"
            )
        if isinstance(moe.experts, ExpertParallelExperts):
            continue
        if not isinstance(moe.experts, GroupedExperts):
            raise TypeError(f"MoE layer {name!r} has experts of type {type(moe.experts).__name__}, not GroupedExperts")
        if routing_scope(router) == "local_batch":
            batch_dependent.append(f"{name} ({type(router).__name__})")
        moe.experts = ExpertParallelExperts(moe.experts, groups)  # type: ignore[assignment]
        sharded.append(name)
    if batch_dependent:
        warnings.warn(
            "these MoE layers route with a batch-dependent rule, computed on each rank's local batch (as under "
            f"plain data parallelism), not on the global batch: {', '.join(batch_dependent)}",
            stacklevel=2,
        )
    return sharded


def full_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every sharded expert weight gathered to the full ``(E, ...)`` tensor.

    A collective: every rank must call it. The result loads into a single-process model or into any sharding.
    """
    state = module.state_dict()
    for name, experts in expert_modules(module):
        for p in EXPERT_PARAMS:
            state[f"{name}.{p}" if name else p] = experts.full_weight(p)
    return state


def _optimizer_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """Parameter id -> its index in ``optimizer.state_dict()`` (sequential over the param groups)."""
    index: dict[int, int] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            index.setdefault(id(param), len(index))
    return index


def _expert_params(module: nn.Module) -> Iterator[tuple[ExpertParallelExperts, nn.Parameter]]:
    for _, experts in expert_modules(module):
        for p in EXPERT_PARAMS:
            yield experts, getattr(experts, p)


def full_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with per-parameter states of sharded experts gathered to full size (collective)."""
    state = optimizer.state_dict()
    per_param = dict(state["state"])
    index = _optimizer_index(optimizer)
    for experts, param in _expert_params(module):
        idx = index.get(id(param))
        if idx is None or idx not in per_param:
            continue
        entry = dict(per_param[idx])
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.shape == param.shape:
                entry[key] = all_gather_rows(value, experts.groups.ep_group, op="optimizer-state all-gather")
        per_param[idx] = entry
    return {**state, "state": per_param}


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
    """A full-size optimizer state (from any number of processes) cut down to this rank's expert shards."""
    per_param = dict(state["state"])
    index = _optimizer_index(optimizer)
    for experts, param in _expert_params(module):
        idx = index.get(id(param))
        if idx is None or idx not in per_param:
            continue
        lo, hi = experts.expert_offset, experts.expert_offset + experts.num_local_experts
        entry = dict(per_param[idx])
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == experts.num_experts:
                entry[key] = value[lo:hi].clone()
        per_param[idx] = entry
    return {**state, "state": per_param}


def reduce_expert_grads(module: nn.Module, groups: ExpertParallelGroups) -> None:
    """Finish the expert gradients after backward, matching data parallelism's average over all ranks.

    The exchange already summed every EP rank's contribution on the owner; replicas of the same shard add theirs
    (one all-reduce over the replica group, only when there are replicas), then all is divided by the world size,
    as DDP does for the other parameters.
    """
    params = [param for _, param in _expert_params(module) if param.requires_grad]
    if not params:
        return
    grads = []
    for param in params:
        if param.grad is None:  # every rank must take part in the all-reduce
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    if groups.num_replicas > 1:
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        all_reduce_(flat, groups.replica_group)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
    if groups.world_size > 1:
        for grad in grads:
            grad.div_(groups.world_size)


def sync_router_observations(module: nn.Module) -> None:
    """Sum every router's pending observations (buffers named ``pending_*``) over all ranks (a collective).

    Routers accumulate load statistics during the forward and apply them in ``update_state``; summing them first
    makes every rank apply the same update from the global batch.
    """
    seen: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, Router) and id(sub) not in seen:
            seen.add(id(sub))
            for name, buffer in sub.named_buffers(recurse=False):
                if name.startswith("pending_"):
                    all_reduce_(buffer, None, op="router statistics all-reduce")


def clip_grad_norm_(module: nn.Module, params: list[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over ``params`` where sharded expert gradients count once (collective).

    The norm adds every replicated gradient (the same on every rank after data parallelism's all-reduce) to the
    sum over the expert-parallel group of each shard's squared norm, so every rank computes the same total and
    scales by the same factor. Returns the total norm before clipping.
    """
    expert_ids = {id(p) for _, experts in expert_modules(module) for p in experts.parameters()}
    groups = [experts.groups for _, experts in expert_modules(module)]
    with_grad = [p for p in params if p.grad is not None]
    device = with_grad[0].device if with_grad else torch.device("cpu")
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    for p in with_grad:
        assert p.grad is not None
        squared = p.grad.detach().float().pow(2).sum()
        if id(p) in expert_ids:
            sharded = sharded + squared
        else:
            replicated = replicated + squared
    if groups:
        all_reduce_(sharded, groups[0].ep_group, op="gradient-norm all-reduce")
    total = (replicated + sharded).sqrt()
    scale = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    for p in with_grad:
        assert p.grad is not None
        p.grad.mul_(scale.to(p.grad.dtype))
    return total


def num_parameters(module: nn.Module) -> int:
    """Parameter count of the whole model, every sharded expert counted at its full size (no collective)."""
    from moezoo.stats import count_parameters

    return count_parameters(module).total
