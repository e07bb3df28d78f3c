"""Expert parallelism over ``torch.distributed``: experts sharded over a process group, tokens exchanged with
``all_to_all_single`` (gloo and NCCL), gradients through the exchange. The Lightning strategy that composes it
with data parallelism is ``moezoo.tasks.parallel.ExpertParallelStrategy``.
"""

from moezoo.parallel.comm import (
    CollectiveError,
    CommStats,
    ExpertParallelGroups,
    all_to_all,
    exchange_counts,
    init_expert_parallel,
)
from moezoo.parallel.experts import (
    ExpertParallelExperts,
    broadcast_experts,
    clip_grad_norm_,
    common_expert_parallel_size,
    expert_parameter_names,
    full_optimizer_state,
    full_state_dict,
    num_parameters,
    reduce_expert_grads,
    routing_scope,
    shard_experts,
    shard_optimizer_state,
    sync_router_observations,
)

__all__ = [
    "CollectiveError",
    "CommStats",
    "ExpertParallelExperts",
    "ExpertParallelGroups",
    "all_to_all",
    "broadcast_experts",
    "clip_grad_norm_",
    "common_expert_parallel_size",
    "exchange_counts",
    "expert_parameter_names",
    "full_optimizer_state",
    "full_state_dict",
    "init_expert_parallel",
    "num_parameters",
    "reduce_expert_grads",
    "routing_scope",
    "shard_experts",
    "shard_optimizer_state",
    "sync_router_observations",
]
