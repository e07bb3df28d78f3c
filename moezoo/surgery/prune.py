"""Shrinking the experts of trained MoEs: pruning (REAP or frequency) and merging (frequency-weighted).

Both keep the layer an ordinary :class:`moezoo.MoE` with fewer experts: the expert weights, the router's gate rows
(and per-expert buffers) of the kept experts are sliced, so the router's softmax runs over the remaining experts
only, which is the renormalisation: with renormalised top-k gates, removing experts no token chose leaves every
output unchanged. A merged expert keeps the router row of its most frequent member (MC-SMoE's dominant expert).

A router shared by several layers (the Omni-Router of the speech Conformer: one instance passed to every MoE
layer) has one gate row per expert for all of them, so those layers keep the same experts: scores (and, for
merging, frequencies and weight similarities) are summed over the layers that share the router, the router is
sliced once and each layer's experts by the same indices.

The report's ``kept`` / ``groups`` replay the same structure on a freshly built model (then ``load_state_dict``
restores the weights): that is how a pruned or merged model is saved and reloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def router_groups(layers: Mapping[str, MoE]) -> list[list[str]]:
    """The layers' paths grouped by router instance, in model order: a group of several paths shares one router."""
    groups: dict[int, list[str]] = {}
    for path, moe in layers.items():
        groups.setdefault(id(moe.router), []).append(path)
    return list(groups.values())


def keep_experts(moe: MoE | Sequence[MoE], keep: Sequence[int]) -> None:
    """Slice ``moe`` (experts and router) to the experts ``keep``, in that order. A sequence of MoE layers that
    share one router is sliced together: the router once, every layer's experts by the same indices."""
    moes = [moe] if isinstance(moe, MoE) else list(moe)
    if not moes or any(m.router is not moes[0].router for m in moes):
        raise ValueError("keep_experts slices one MoE layer or several that share one router instance")
    old = moes[0].num_experts
    if any(m.num_experts != old for m in moes):
        raise ValueError(f"layers sharing a router must have the same number of experts, got "
                         f"{[m.num_experts for m in moes]}")  # fmt: skip
    idx = list(keep)
    if not idx or len(set(idx)) != len(idx) or any(not 0 <= i < old for i in idx):
        raise ValueError(f"keep must list distinct expert indices in [0, {old}), got {idx}")
    router = moes[0].router
    top_k = getattr(router, "top_k", moes[0].top_k)
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
    for layer in moes:
        experts = layer.experts
        for name in ("w_in", "w_out", "b_in", "b_out"):
            p = getattr(experts, name)
            if p is not None:
                sliced = p.detach()[index.to(p.device)].clone()
                setattr(experts, name, nn.Parameter(sliced, requires_grad=p.requires_grad))
        experts.num_experts = len(idx)
        layer.num_experts = len(idx)


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


def _shared_plan(plan: Mapping[str, Any], paths: Sequence[str], what: str, norm: Callable[[Any], Any]) -> Any:
    """What ``plan`` (argument ``what``) says for the layers ``paths``, which share one router: ``None`` when it
    names none of them, else the one value it gives every one of them (``norm`` makes the values comparable)."""
    named = [p for p in paths if p in plan]
    if not named:
        return None
    values = [norm(plan[p]) for p in named]
    if len(named) != len(paths) or any(v != values[0] for v in values):
        raise ValueError(
            f"{what}: layers {list(paths)} share one router, so {what} must give every one of them the same value; "
            f"got {dict((p, plan[p]) for p in named)}"
        )
    return values[0]


def _summed(stats: Mapping[str, ExpertStats] | None, paths: Sequence[str], what: str, score: str) -> Tensor:
    """``score`` (a criterion, or ``frequency``) of every expert, summed over the layers ``paths``."""
    return torch.stack([_need_stats(stats, p, what).scores(score) for p in paths]).sum(0)


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
    Layers that share one router keep the same experts: scores summed over them, the same indices in a mapping.
    """
    if criterion not in ("reap", "frequency"):
        raise ValueError(f"criterion={criterion!r} is unknown; choose 'reap' or 'frequency'")
    layers = _sparse_moes(model, keep, "keep")
    before_total = _count(model)
    entries = []
    for paths in router_groups(layers):
        moes = [layers[p] for p in paths]
        if isinstance(keep, Mapping):
            idx = _shared_plan(keep, paths, "keep", list)
            if idx is None:
                continue
        else:
            n = _resolve_count(keep, moes[0].num_experts)
            idx = _select(_summed(stats, paths, "prune_experts", criterion), n)
        before = [(_count(m), m.num_experts) for m in moes]
        keep_experts(moes, idx)
        entries += [SurgeryLayer(p, e, m.num_experts, list(idx), None, c, _count(m))
                    for p, m, (c, e) in zip(paths, moes, before)]  # fmt: skip
    return SurgeryReport(entries, before_total, _count(model))


def _cluster(moes: Sequence[MoE], freq: Tensor, n: int) -> list[list[int]]:
    """``n`` groups: the most frequent experts (by ``freq``) as centres, every other expert joins the centre whose
    flattened weights are most cosine-similar (similarities summed over ``moes``, layers that share a router)."""
    centres = _select(freq, n)
    sims_EE = torch.zeros(moes[0].num_experts, moes[0].num_experts)
    for moe in moes:
        flat = torch.cat([moe.experts.w_in.detach().flatten(1), moe.experts.w_out.detach().flatten(1)], dim=1)
        flat = nn.functional.normalize(flat.float(), dim=1)
        sims_EE += (flat @ flat.t()).cpu()
    groups = {c: [c] for c in centres}
    for e in range(moes[0].num_experts):
        if e not in groups:
            groups[centres[int(sims_EE[centres, e].argmax())]].append(e)
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
    group's most frequent member (its lowest index without stats). Layers that share one router get the same
    partition and representatives (frequencies and similarities summed over them); each layer's weights are
    averaged with its own frequencies.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {MERGE_METHODS}")
    layers = _sparse_moes(model, groups, "groups")
    before_total = _count(model)
    entries = []
    for paths in router_groups(layers):
        moes = [layers[p] for p in paths]
        num = moes[0].num_experts
        if isinstance(groups, Mapping):
            partition = _shared_plan(groups, paths, "groups", lambda v: [list(g) for g in v])
            if partition is None:
                continue
            flat = sorted(e for g in partition for e in g)
            if flat != list(range(num)) or any(not g for g in partition):
                raise ValueError(
                    f"groups[{paths[0]!r}] must partition the experts 0..{num - 1} into non-empty groups, "
                    f"got {partition}"
                )
        else:
            n = _resolve_count(groups, num)
            partition = _cluster(moes, _summed(stats, paths, "merge_experts with a count", "frequency"), n)
        zeros = torch.zeros(num, dtype=torch.float64)
        freqs = [stats[p].frequency if stats is not None and p in stats else zeros for p in paths]
        total = torch.stack(freqs).sum(0)
        reps = [min(group, key=lambda e: (-float(total[e]), e)) for group in partition]
        before = [(_count(m), m.num_experts) for m in moes]
        with torch.no_grad():
            for moe, freq in zip(moes, freqs):
                for group, rep in zip(partition, reps):
                    w = torch.tensor([float(freq[e]) for e in group], dtype=torch.float64)
                    if method == "average" or float(w.sum()) == 0.0:
                        w = torch.ones(len(group), dtype=torch.float64)
                    w = w / w.sum()
                    for name in ("w_in", "w_out", "b_in", "b_out"):
                        p = getattr(moe.experts, name)
                        if p is not None:
                            merged = sum(float(wi) * p[e].double() for wi, e in zip(w, group))
                            p[rep].copy_(merged.to(p.dtype))
        keep_experts(moes, reps)
        entries += [SurgeryLayer(p, e, m.num_experts, list(reps), partition, c, _count(m))
                    for p, m, (c, e) in zip(paths, moes, before)]  # fmt: skip
    return SurgeryReport(entries, before_total, _count(model))
