"""Calibration statistics of the experts of every sparse ``MoE`` of a model, over a data loader.

Per layer (:class:`ExpertStats`), accumulated over every routed pair ``n`` (token ``t``, expert ``e``, gate ``g``):

- ``count_E``: routed pairs per expert (``frequency`` = count / tokens);
- ``reap_sum_E``: ``sum g_n * ||expert_e(x_t)||``: REAP's router-weighted expert activation norm, averaged over
  the expert's pairs by ``reap`` (Lasby et al., "REAP: router-weighted expert activation pruning");
- ``gate_sum_E``: summed gates; ``coact_EE``: how often two experts serve the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moezoo.layers import MoE
from moezoo.layers.segment import SegmentMoE, to_segments


@dataclass
class ExpertStats:
    num_experts: int
    tokens: int
    count_E: Tensor
    gate_sum_E: Tensor
    reap_sum_E: Tensor
    coact_EE: Tensor

    @classmethod
    def empty(cls, num_experts: int) -> ExpertStats:
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64)
        return cls(num_experts, 0, z(num_experts), z(num_experts), z(num_experts), z(num_experts, num_experts))

    @property
    def frequency(self) -> Tensor:
        return self.count_E / max(self.tokens, 1)

    @property
    def reap(self) -> Tensor:
        return self.reap_sum_E / self.count_E.clamp(min=1)

    def scores(self, criterion: str) -> Tensor:
        if criterion == "reap":
            return self.reap
        if criterion == "frequency":
            return self.frequency
        raise ValueError(f"criterion={criterion!r} is unknown; choose 'reap' or 'frequency'")


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _routed_view(moe: MoE, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The rows the layer routes: a :class:`SegmentMoE` routes segments (its input in the segment view, as its
    forward builds it), any other MoE its tokens."""
    if not isinstance(moe, SegmentMoE):
        return x, mask
    if mask is None:
        return to_segments(x, moe.segment_size), None
    x = x * mask.unsqueeze(-1).to(x.dtype)
    return to_segments(x, moe.segment_size), to_segments(mask.unsqueeze(-1), moe.segment_size).any(-1)


@torch.no_grad()
def _observe(moe: MoE, stats: ExpertStats, x: Tensor, mask: Tensor | None, output: tuple) -> None:
    aux = output[1]
    routing = getattr(aux, "routing", None)
    if routing is None:
        raise ValueError("calibrate needs a sparse router (pairs); Soft MoE layers have no per-expert routing")
    x, mask = _routed_view(moe, x, mask)
    x_TD = x.reshape(-1, moe.dim)
    if mask is not None:
        x_TD = x_TD[mask.reshape(-1)]
    token_N, expert_N, gate_N = routing.token_idx_N, routing.expert_idx_N, routing.gate_N
    pairs = token_N.shape[0]
    rows = torch.arange(pairs, device=x_TD.device)
    ones = torch.ones(pairs, device=x_TD.device, dtype=torch.float32)
    y_ND = moe.experts(x_TD.index_select(0, token_N), rows, expert_N, ones, backend=moe.backend)
    norms = y_ND.float().norm(dim=-1).double().cpu()
    e_cpu, g_cpu, t_cpu = expert_N.cpu(), gate_N.detach().double().cpu(), token_N.cpu()
    stats.tokens += x_TD.shape[0]
    stats.count_E.index_add_(0, e_cpu, torch.ones(pairs, dtype=torch.float64))
    stats.gate_sum_E.index_add_(0, e_cpu, g_cpu)
    stats.reap_sum_E.index_add_(0, e_cpu, g_cpu * norms)
    onehot = torch.zeros(x_TD.shape[0], moe.num_experts, dtype=torch.float64)
    onehot[t_cpu, e_cpu] = 1.0
    stats.coact_EE += onehot.t() @ onehot


def calibrate(
    model: nn.Module,
    loader: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> dict[str, ExpertStats]:
    """Run ``model`` (in eval mode, without gradients) over ``loader`` and return the statistics of every sparse
    ``MoE``, by module path. ``forward(model, batch)`` runs one batch (default: ``model(batch)``,
    ``model(batch[0])`` for tuples and lists, ``model(**batch)`` for dicts)."""
    run = forward or _default_forward
    layers = {path: m for path, m in model.named_modules() if isinstance(m, MoE)}
    if not layers:
        raise ValueError("calibrate found no moezoo.MoE layer in the model")
    stats = {path: ExpertStats.empty(m.num_experts) for path, m in layers.items()}
    handles = []
    for path, moe in layers.items():

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, path: str = path) -> None:
            x = args[0] if args else kwargs["x"]
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            _observe(layers[path], stats[path], x, mask, output)

        handles.append(moe.register_forward_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats
