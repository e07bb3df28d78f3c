"""Expert parallelism composed with Lightning's data parallelism: :class:`ExpertParallelStrategy`.

Select it in any task config (or on the command line)::

    trainer:
      devices: 2            # processes per node (GPUs, or CPU processes with accelerator: cpu)
      num_nodes: 1
      strategy:
        class_path: moezoo.tasks.parallel.ExpertParallelStrategy
        init_args:
          expert_parallel_size: 2   # null: the largest size dividing the world and every layer's expert count

The world of ``devices * num_nodes`` processes is laid out as ``replicas x expert_parallel_size``. Every
non-expert parameter is replicated and averaged by DDP over the whole world; the experts of each MoE layer are
sharded over an expert-parallel group (:mod:`moezoo.parallel`) and their gradients are averaged only over the
ranks holding the same shard. Checkpoints always hold the full expert set (weights and optimizer state), so a
checkpoint written with any number of processes loads with any other, and in a plain single-process model.
"""

from __future__ import annotations

import atexit
import datetime
from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from moezoo.parallel import (
    ExpertParallelGroups,
    common_expert_parallel_size,
    expert_parameter_names,
    full_optimizer_state,
    full_state_dict,
    init_expert_parallel,
    reduce_expert_grads,
    shard_experts,
    shard_optimizer_state,
    sync_router_observations,
)
from moezoo.parallel.comm import DEFAULT_TIMEOUT_S
from moezoo.parallel.experts import broadcast_experts, clip_grad_norm_, expert_modules


class ExpertParallelStrategy(DDPStrategy):
    """DDP over the non-expert parameters + expert parallelism over the MoE experts.

    Args:
        expert_parallel_size: ranks sharing one copy of the experts (must divide the world size and every MoE
            layer's expert count); ``None`` takes the largest size that does; ``1`` is plain DDP.
        timeout_s: timeout of every collective (DDP's and the expert exchange's): a rank that dies or stalls
            mid-step ends the run with an error after at most this long instead of hanging.
        process_group_backend: ``"gloo"`` or ``"nccl"``; ``None`` picks NCCL on CUDA, gloo on the CPU.
        find_unused_parameters: passed to DDP.
    """

    strategy_name = "expert_parallel"

    def __init__(
        self,
        expert_parallel_size: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        process_group_backend: str | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        if expert_parallel_size is not None and (not isinstance(expert_parallel_size, int) or expert_parallel_size < 1):
            raise ValueError(f"expert_parallel_size must be a positive integer or None, got {expert_parallel_size!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            find_unused_parameters=find_unused_parameters,
        )
        self.expert_parallel_size = expert_parallel_size
        self.timeout_s = timeout_s
        self.groups: ExpertParallelGroups | None = None

    # -- setup ---------------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        """After the process group exists: build the EP groups, shard the experts, hide them from DDP."""
        super().setup_environment()
        _destroy_at_exit()
        module = self.lightning_module
        assert module is not None
        world = self.world_size
        size = self.expert_parallel_size or common_expert_parallel_size(module, world)
        if world % size:
            raise ValueError(
                f"expert_parallel_size={size} must divide the number of processes {world} (devices x num_nodes)"
            )
        if self.groups is None or self.groups.ep_size != size:
            self.groups = init_expert_parallel(size, timeout_s=self.timeout_s)
        if size > 1:
            broadcast_experts(module)  # every shard comes from global rank 0's initialisation
            shard_experts(module, self.groups)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, expert_parameter_names(module))

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if self._sharded:
            # a gradient norm over sharded experts must count every shard once, on every rank alike
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]

    @property
    def _sharded(self) -> bool:
        module = self.lightning_module
        return module is not None and any(True for _ in expert_modules(module))

    # -- training --------------------------------------------------------------------------------------
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        """Run the closure (forward + backward), then finish the expert gradients and the router statistics."""

        def closure_then_reduce() -> Any:
            result = closure()
            self._after_backward()
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    def _after_backward(self) -> None:
        module = self.lightning_module
        assert module is not None and self.groups is not None
        if self._sharded:
            reduce_expert_grads(module, self.groups)
        if self.world_size > 1:
            sync_router_observations(module)

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: float | int) -> None:
        module = self.lightning_module
        assert module is not None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_grad_norm_(module, params, float(clip_val))

    # -- checkpoints -----------------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full expert set, gathered from the shards (every rank calls this when a checkpoint is saved)."""
        module = self.lightning_module
        assert module is not None
        return full_state_dict(module)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        module = self.lightning_module
        assert module is not None
        return full_optimizer_state(optimizer, module)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        module = self.lightning_module
        assert module is not None
        states = [
            shard_optimizer_state(state, optimizer, module)
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"])
        ]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})


_DESTROY_REGISTERED: list[bool] = []


def _destroy_at_exit() -> None:
    """Destroy the process groups before interpreter shutdown (Lightning does it for NCCL only): gloo's worker
    threads otherwise outlive the interpreter and can abort a finished run with SIGABRT at exit."""
    if not _DESTROY_REGISTERED:
        atexit.register(_destroy_dist_connection)
        _DESTROY_REGISTERED.append(True)
