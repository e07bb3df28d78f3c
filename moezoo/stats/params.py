"""Parameter counts: total, active per token, and per component. The one implementation in moezoo.

What "active per token" means, for each kind of layer (the parameters a token's output depends on):

- **Dense parts** (embeddings, attention, norms, heads, dense FFNs, a dense twin's FFN): every parameter.
- **A sparse MoE layer** (:class:`~moezoo.layers.MoE` with a router that returns pairs: ``topk``,
  ``sigmoid_lossfree``, ``expert_choice``, ``sinkhorn``, ``relu``, ``promoe``, the speech routers, ``segment``):
  its router, its shared experts (and their gate), and ``top_k / num_experts`` of its routed experts. ``top_k`` is
  the layer's nominal number of experts per token: exact for top-k token choice; the average for expert choice
  (each expert takes ``top_k * T / E`` tokens) and ReLU routing (its target sparsity); an upper bound where
  capacity drops tokens or AdaMoE's null experts take some of the ``top_k`` slots.
- **Chain-of-Experts** (:class:`~moezoo.layers.ChainOfExperts`): as a sparse MoE with ``min(1, C * top_k /
  num_experts)`` of its routed experts (K experts in each of its C passes) and every iteration's router.
- **Soft MoE**: every parameter. Each output token is a convex combination of all slots and every expert
  processes some slot, so every expert's weights reach every token. (Its *compute* per token matches ``top_k``
  experts; its parameters per token do not.)
- **Seg-MoE** (:class:`~moezoo.layers.segment.SegmentMoE`): as a sparse MoE whose "tokens" are segments of w
  tokens. Every token of a segment goes through the whole selected segment expert, so the count per token equals
  the count per segment (the expert's FLOPs per token are 1/w of its weights).
- **A whole-model blend** (a module with ``blends_expert_outputs = True``, YOLO-MoE's per-scale router): every
  expert network runs on every input, so everything is active; the blend router counts as a router.
- **Expert-parallel shards** (experts with ``num_local_experts``): counted at full size, every expert once.

A module shared by several layers (the Omni-router) is counted once, as :meth:`torch.nn.Module.parameters` does.
Fractional active counts are summed in floating point and rounded once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moezoo.layers.chain import ChainOfExperts
from moezoo.layers.moe import MoE
from moezoo.layers.routers import SoftMoERouter

COMPONENTS = ("dense", "routers", "routed_experts", "shared_experts")


@dataclass(frozen=True)
class ComponentCount:
    total: int
    active: int


@dataclass(frozen=True)
class ParameterCounts:
    """Total and active-per-token parameter counts, and the same split by component (:data:`COMPONENTS`)."""

    total: int
    active: int
    components: dict[str, ComponentCount] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        """``{"total": ..., "active": ...}``: the form model cards and benchmark rows record."""
        return {"total": self.total, "active": self.active}


def _shard_scale(experts: nn.Module) -> int:
    """How many copies of this rank's expert shard make the full expert set (1 when not sharded)."""
    local = getattr(experts, "num_local_experts", None)
    return int(experts.num_experts) // int(local) if local else 1  # type: ignore[arg-type]


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Total and active-per-token parameters of ``model`` (see the module docstring for each layer kind)."""
    # id(parameter) -> (component, active fraction, full-size multiplier)
    role: dict[int, tuple[str, float, int]] = {}
    for module in model.modules():
        if isinstance(module, MoE):
            # a ChainOfExperts routes K experts in each of its C passes: up to C * K distinct experts per token
            passes = module.num_iterations if isinstance(module, ChainOfExperts) else 1
            fraction = (
                1.0
                if isinstance(module.router, SoftMoERouter)
                else min(1.0, passes * module.top_k / module.num_experts)
            )
            scale = _shard_scale(module.experts)
            for p in module.experts.parameters():
                role[id(p)] = ("routed_experts", fraction, scale)
            for sub in (module.shared, module.shared_gate):
                for p in sub.parameters() if sub is not None else ():
                    role[id(p)] = ("shared_experts", 1.0, 1)
            routers = module.routers if isinstance(module, ChainOfExperts) else [module.router]
            for p in (p for router in routers for p in router.parameters()):
                role[id(p)] = ("routers", 1.0, 1)
        elif getattr(module, "blends_expert_outputs", False):
            for p in module.parameters():
                role.setdefault(id(p), ("routers", 1.0, 1))
    totals = dict.fromkeys(COMPONENTS, 0)
    inactive = dict.fromkeys(COMPONENTS, 0.0)
    for p in model.parameters():
        component, fraction, scale = role.get(id(p), ("dense", 1.0, 1))
        numel = p.numel() * scale
        totals[component] += numel
        inactive[component] += numel * (1.0 - fraction)
    total = sum(totals.values())
    components = {c: ComponentCount(totals[c], int(round(totals[c] - inactive[c]))) for c in COMPONENTS}
    return ParameterCounts(total, int(round(total - sum(inactive.values()))), components)
