"""Shrinking the experts of trained MoEs: pruning (REAP or frequency) and merging (frequency-weighted).

Both keep the layer an ordinary :class:`moezoo.MoE` with fewer experts: the expert weights, the router's gate rows
(and per-expert buffers) of the kept experts are sliced, so the router's softmax runs over the remaining experts
only, which is the renormalisation: with renormalised top-k gates, removing experts no token chose leaves every
output unchanged. A merged expert keeps the router row of its most frequent member (MC-SMoE's dominant expert).

The report's ``kept`` / ``groups`` replay the same structure on a freshly built model (then ``load_state_dict``
restores the weights): that is how a pruned or merged model is saved and reloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moezoo.layers import MoE
from moezoo.layers.chain import ChainOfExperts
from moezoo.surgery.calibrate import ExpertStats

ROUTER_EXPERT_ROWS = ("gate.weight", "noise_gate.weight")
ROUTER_EXPERT_BUFFERS = ("expert_bias", "pending_load")
MERGE_METHODS = ("frequency_weighted", "average")


@dataclass
class SurgeryLayer:
    path: str
    experts_before: int
    experts_after: int
    kept: list[int]
    groups: list[list[int]] | None
    params_before: int
    params_after: int


@dataclass
class SurgeryReport:
    layers: list[SurgeryLayer]
    params_before: int
    params_after: int

    @property
    def kept(self) -> dict[str, list[int]]:
        return {layer.path: layer.kept for layer in self.layers}

    @property
    def groups(self) -> dict[str, list[list[int]]]:
        return {layer.path: layer.groups for layer in self.layers if layer.groups is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sparse_moes(model: nn.Module, plan: object, what: str) -> dict[str, MoE]:
    """The model's MoE layers by path; a ``plan`` mapping (argument ``what``) may name only those."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, MoE)}
    if not layers:
        raise ValueError("the model has no moezoo.MoE layer")
    if isinstance(plan, Mapping):
        unknown = sorted(set(plan) - set(layers))
        if unknown:
            raise ValueError(f"{what} names layers that are not MoE layers of the model: {unknown}")
    chains = [path for path, m in layers.items() if isinstance(m, ChainOfExperts)]
    if chains:
        raise ValueError(f"pruning and merging slice one router per layer; these layers are ChainOfExperts: {chains}")
    soft = [path for path, m in layers.items() if m.router.kind != "sparse"]
    if soft:
        raise ValueError(f"pruning and merging need sparse routers; these layers are Soft MoE or SMEAR: {soft}")
    return layers


def keep_experts(moe: MoE, keep: Sequence[int]) -> None:
    """Slice ``moe`` (experts and router) to the experts ``keep``, in that order."""
    old = moe.num_experts
    idx = list(keep)
    if not idx or len(set(idx)) != len(idx) or any(not 0 <= i < old for i in idx):
        raise ValueError(f"keep must list distinct expert indices in [0, {old}), got {idx}")
    router = moe.router
    top_k = getattr(router, "top_k", moe.top_k)
    capacity = len(idx) + getattr(router, "num_null_experts", 0)
    if top_k > capacity:
        raise ValueError(f"keeping {len(idx)} experts leaves fewer than the router's top_k={top_k}")
    index = torch.tensor(idx, dtype=torch.long)
    rows = torch.cat([index, torch.arange(old, router.num_logits)])
    for name, p in list(router.named_parameters()):
        if name in ROUTER_EXPERT_ROWS:
            owner = router.get_submodule(name.rpartition(".")[0])
            owner.weight = nn.Parameter(p.detach()[rows.to(p.device)].clone(), requires_grad=p.requires_grad)
            if isinstance(owner, nn.Linear):
                owner.out_features = len(rows)
        elif p.dim() > 0 and old in p.shape:
            raise ValueError(
                f"router {type(router).__name__} has a per-expert parameter {name!r} that pruning cannot slice"
            )
    for name, b in list(router.named_buffers()):
        if name in ROUTER_EXPERT_BUFFERS:
            setattr(router, name, b[index.to(b.device)].clone())
    router.num_experts = len(idx)
    experts = moe.experts
    for name in ("w_in", "w_out", "b_in", "b_out"):
        p = getattr(experts, name)
        if p is not None:
            setattr(experts, name, nn.Parameter(p.detach()[index.to(p.device)].clone(), requires_grad=p.requires_grad))
    experts.num_experts = len(idx)
    moe.num_experts = len(idx)


def _select(scores: Tensor, n: int) -> list[int]:
    order = sorted(range(scores.numel()), key=lambda e: (-float(scores[e]), e))
    return sorted(order[:n])


def _resolve_count(keep: int | float, num_experts: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int, a fraction in (0, 1] or a mapping of paths to indices, got {keep!r}")
    n = keep if isinstance(keep, int) else round(keep * num_experts)
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise ValueError(f"keep={keep} as a fraction must lie in (0, 1]")
    if not 1 <= n <= num_experts:
        raise ValueError(f"keep={keep!r} must leave between 1 and {num_experts} experts")
    return n


def _need_stats(stats: Mapping[str, ExpertStats] | None, path: str, what: str) -> ExpertStats:
    if stats is None or path not in stats:
        raise ValueError(f"{what} needs calibration statistics for layer {path!r}: pass stats=calibrate(model, loader)")
    return stats[path]


def prune_experts(
    model: nn.Module,
    keep: int | float | Mapping[str, Sequence[int]],
    criterion: str = "reap",
    stats: Mapping[str, ExpertStats] | None = None,
) -> SurgeryReport:
    """Drop experts from every sparse ``MoE`` of ``model`` (in place).

    ``keep``: experts kept per layer (an int, or a fraction of each layer's experts), chosen by ``criterion``
    (``"reap"``: highest router-weighted output norm; ``"frequency"``: most routed) from ``stats``
    (:func:`~moezoo.surgery.calibrate`); or a mapping ``path -> expert indices`` (no statistics needed).
    """
    if criterion not in ("reap", "frequency"):
        raise ValueError(f"criterion={criterion!r} is unknown; choose 'reap' or 'frequency'")
    layers = _sparse_moes(model, keep, "keep")
    before_total = _count(model)
    entries = []
    for path, moe in layers.items():
        if isinstance(keep, Mapping):
            if path not in keep:
                continue
            idx = list(keep[path])
        else:
            n = _resolve_count(keep, moe.num_experts)
            idx = _select(_need_stats(stats, path, "prune_experts").scores(criterion), n)
        before, experts_before = _count(moe), moe.num_experts
        keep_experts(moe, idx)
        entries.append(SurgeryLayer(path, experts_before, moe.num_experts, idx, None, before, _count(moe)))
    return SurgeryReport(entries, before_total, _count(model))


def _cluster(moe: MoE, stats: ExpertStats, n: int) -> list[list[int]]:
    """``n`` groups: the most frequent experts as centres, every other expert joins the centre whose flattened
    weights are most cosine-similar."""
    centres = _select(stats.frequency, n)
    flat = torch.cat([moe.experts.w_in.detach().flatten(1), moe.experts.w_out.detach().flatten(1)], dim=1).float()
    flat = nn.functional.normalize(flat, dim=1)
    groups = {c: [c] for c in centres}
    for e in range(moe.num_experts):
        if e not in groups:
            sims = flat[centres] @ flat[e]
            groups[centres[int(sims.argmax())]].append(e)
    return [sorted(g) for g in groups.values()]


def merge_experts(
    model: nn.Module,
    groups: int | Mapping[str, Sequence[Sequence[int]]],
    method: str = "frequency_weighted",
    stats: Mapping[str, ExpertStats] | None = None,
) -> SurgeryReport:
    """Merge groups of experts of every sparse ``MoE`` (in place) into one expert each.

    ``groups``: the number of experts after merging (groups formed around the most frequent experts by weight
    similarity, needs ``stats``), or a mapping ``path -> partition`` of the layer's experts into groups.
    ``method``: ``"frequency_weighted"`` (weights averaged with the calibration frequencies; uniform where a
    group was never routed or without stats) or ``"average"``. The merged expert takes the router row of the
    group's most frequent member (its lowest index without stats).
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {MERGE_METHODS}")
    layers = _sparse_moes(model, groups, "groups")
    before_total = _count(model)
    entries = []
    for path, moe in layers.items():
        layer_stats = stats.get(path) if stats is not None else None
        if isinstance(groups, Mapping):
            if path not in groups:
                continue
            partition = [list(g) for g in groups[path]]
            flat = sorted(e for g in partition for e in g)
            if flat != list(range(moe.num_experts)) or any(not g for g in partition):
                raise ValueError(
                    f"groups[{path!r}] must partition the experts 0..{moe.num_experts - 1} into non-empty groups, "
                    f"got {partition}"
                )
        else:
            n = _resolve_count(groups, moe.num_experts)
            partition = _cluster(moe, _need_stats(stats, path, "merge_experts with a count"), n)
        freq = layer_stats.frequency if layer_stats is not None else torch.zeros(moe.num_experts, dtype=torch.float64)
        before, experts_before = _count(moe), moe.num_experts
        reps = []
        with torch.no_grad():
            for group in partition:
                rep = min(group, key=lambda e: (-float(freq[e]), e))
                w = torch.tensor([float(freq[e]) for e in group], dtype=torch.float64)
                if method == "average" or float(w.sum()) == 0.0:
                    w = torch.ones(len(group), dtype=torch.float64)
                w = w / w.sum()
                for name in ("w_in", "w_out", "b_in", "b_out"):
                    p = getattr(moe.experts, name)
                    if p is not None:
                        merged = sum(float(wi) * p[e].double() for wi, e in zip(w, group))
                        p[rep].copy_(merged.to(p.dtype))
                reps.append(rep)
        keep_experts(moe, reps)
        entries.append(SurgeryLayer(path, experts_before, moe.num_experts, reps, partition, before, _count(moe)))
    return SurgeryReport(entries, before_total, _count(model))
