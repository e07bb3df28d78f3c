"""Routing statistics accumulated over a split: per-layer expert load, dropped fraction, router entropy, load CV,
and per-group routing shares (group = class, language, domain, channel, or any label the data exposes).

Legend: B samples, T tokens of one MoE layer, N routed (token, expert) pairs, E experts, G groups, L MoE layers.

The one aggregator in moezoo: the tasks feed it every validation and test batch (``MoETask.routing_stats``), the
routing-analytics callback writes its :meth:`RoutingStats.summary` and heatmaps, the benchmarks read that file,
and the task's printed routing summary is its :meth:`RoutingStats.table`.

Definitions (for each MoE layer, over every batch of the split):

- ``expert_counts``: routed pairs per expert, summed (Soft MoE: slot rows, uniform by construction; a blend
  router: the summed per-sample weights). ``expert_load`` is the same normalised to shares.
- ``load_cv``: std / mean of ``expert_counts`` (population std): the imbalance of the split's total load, not the
  mean of per-batch CVs (which the per-step ``<stage>/expert_load_cv`` logs).
- ``dropped_frac`` and ``router_entropy``: token-weighted means of the layer's per-batch values.
- group shares: for each group, the fraction of its routed pairs (or blend weight) that went to each expert; a
  group with no tokens has a row of zeros.

Model-level numbers: ``expert_load_cv`` is the mean of the layers' ``load_cv``; ``dropped_frac`` and
``router_entropy`` are token-weighted over layers. The specialisation reported by default is that of the last
layer with group counts (the deepest routing decision).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from moezoo.layers.moe import MoEAux


@dataclass(frozen=True)
class TokenGroups:
    """The group of each sample of a batch, and how an MoE layer's tokens map back to samples.

    Args:
        group_B: group index per sample (``-1``: not counted), into ``names``.
        names: the group names (class names, languages ...).
        by: what a group is (``"class"``, ``"language"``, ``"domain"``, ``"channel"``).
        lengths_B: real tokens per sample when the MoE layers route only real tokens (padding removed, in sample
            order); ``None`` when every sample contributes the same number of tokens to a layer.
    """

    group_B: Tensor
    names: tuple[str, ...]
    by: str = "group"
    lengths_B: Tensor | None = None

    def __post_init__(self) -> None:
        if self.group_B.dim() != 1:
            raise ValueError(f"group_B must be 1-D (one group per sample), got shape {tuple(self.group_B.shape)}")
        if self.group_B.numel() and (int(self.group_B.min()) < -1 or int(self.group_B.max()) >= len(self.names)):
            raise ValueError(
                f"group_B values must be -1 or in [0, {len(self.names)}) (the group names {self.names}), got range "
                f"[{int(self.group_B.min())}, {int(self.group_B.max())}]"
            )
        if self.lengths_B is not None and self.lengths_B.shape != self.group_B.shape:
            raise ValueError(
                f"lengths_B must have one entry per sample, shape {tuple(self.group_B.shape)}; got "
                f"{tuple(self.lengths_B.shape)}"
            )

    def of_tokens(self, num_tokens: int) -> Tensor | None:
        """``(T,)`` group of each token of a layer that saw ``num_tokens``; ``None`` when the layer's tokens do
        not map onto the samples (another token rate than this mapping describes)."""
        group_B = self.group_B.detach().cpu().long()
        if self.lengths_B is not None:
            lengths_B = self.lengths_B.detach().cpu().long()
            if int(lengths_B.sum()) != num_tokens:
                return None
            return group_B.repeat_interleave(lengths_B)
        samples = group_B.numel()
        if samples == 0 or num_tokens % samples:
            return None
        return group_B.repeat_interleave(num_tokens // samples)


@dataclass
class LayerSummary:
    """One MoE layer over a split (see the module docstring for the definitions)."""

    layer: int
    num_experts: int
    tokens: int
    expert_counts: list[float]
    expert_load: list[float]
    load_cv: float
    dropped_frac: float
    router_entropy: float
    group_share: list[list[float]] | None


class _Layer:
    """Running sums of one MoE layer."""

    def __init__(self, num_experts: int) -> None:
        self.counts_E = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0
        self.dropped = 0.0
        self.entropy = 0.0
        self.groups_GE: Tensor | None = None

    def add_groups(self, counts_GE: Tensor) -> None:
        self.groups_GE = counts_GE if self.groups_GE is None else self.groups_GE + counts_GE


def _cv(counts_E: Tensor) -> float:
    return float(counts_E.std(unbiased=False) / counts_E.mean().clamp_min(1e-12)) if counts_E.numel() else 0.0


class RoutingStats:
    """Accumulates :class:`~moezoo.layers.MoEAux` results (and, optionally, the group of each token) over a split.

    ``update`` per batch, then ``summary()`` (JSON-able), ``specialisation()``, ``table()``; ``reset`` starts a
    new split. Layers are identified by their position in the model's list of aux results.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._layers: list[_Layer] = []
        self.group_names: tuple[str, ...] | None = None
        self.group_by: str | None = None

    def __bool__(self) -> bool:
        return bool(self._layers)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def _layer(self, index: int, num_experts: int) -> _Layer:
        while len(self._layers) <= index:
            self._layers.append(_Layer(num_experts))
        layer = self._layers[index]
        if layer.counts_E.numel() != num_experts:
            raise ValueError(
                f"MoE layer {index} reported {num_experts} experts after {layer.counts_E.numel()} earlier in this "
                "split; call reset() between models"
            )
        return layer

    def _groups(self, groups: TokenGroups) -> int:
        if self.group_names is None:
            self.group_names, self.group_by = tuple(groups.names), groups.by
        elif (tuple(groups.names), groups.by) != (self.group_names, self.group_by):
            raise ValueError(
                f"groups changed within a split: {groups.by} {groups.names} after {self.group_by} {self.group_names}"
            )
        return len(self.group_names)

    @torch.no_grad()
    def update(self, auxes: Sequence[MoEAux], groups: TokenGroups | None = None) -> None:
        """Add one batch: every layer's aux result; with ``groups``, also the group x expert counts of each layer
        whose routing pairs map onto the samples."""
        num_groups = self._groups(groups) if groups is not None else 0
        for i, aux in enumerate(auxes):
            counts_E = aux.tokens_per_expert_E.detach().cpu().double()
            layer = self._layer(i, counts_E.numel())
            layer.counts_E += counts_E
            layer.tokens += aux.num_tokens
            layer.dropped += float(aux.dropped_frac) * aux.num_tokens
            layer.entropy += float(aux.router_entropy) * aux.num_tokens
            routing = aux.routing
            if groups is None or routing is None:
                continue
            group_T = groups.of_tokens(routing.num_tokens)
            if group_T is None:
                continue
            group_N = group_T[routing.token_idx_N.detach().cpu()]
            keep_N = group_N >= 0
            experts = counts_E.numel()
            flat_N = group_N[keep_N] * experts + routing.expert_idx_N.detach().cpu()[keep_N]
            layer.add_groups(torch.bincount(flat_N, minlength=num_groups * experts).double().view(num_groups, experts))

    @torch.no_grad()
    def add_group_weights(self, layer: int, groups: TokenGroups, weights_BE: Tensor) -> None:
        """Soft assignments of one batch to layer ``layer`` (already counted by :meth:`update`): each sample's
        expert weights ``(B, E)`` added to its group's row (a blend router, whose aux has no pairs)."""
        num_groups = self._groups(groups)
        if layer >= len(self._layers):
            raise ValueError(f"layer {layer} has no counts yet ({len(self._layers)} layers); call update() first")
        group_B = groups.group_B.detach().cpu().long()
        weights_BE = weights_BE.detach().cpu().double()
        if weights_BE.shape != (group_B.numel(), self._layers[layer].counts_E.numel()):
            raise ValueError(
                f"weights_BE must have shape {(group_B.numel(), self._layers[layer].counts_E.numel())} (samples, "
                f"experts of layer {layer}), got {tuple(weights_BE.shape)}"
            )
        keep_B = group_B >= 0
        counts_GE = torch.zeros(num_groups, weights_BE.shape[1], dtype=torch.float64)
        counts_GE.index_add_(0, group_B[keep_B], weights_BE[keep_B])
        self._layers[layer].add_groups(counts_GE)

    # -- results -------------------------------------------------------------------------------------------------
    def layers(self) -> list[LayerSummary]:
        out = []
        for i, layer in enumerate(self._layers):
            counts_E = layer.counts_E
            tokens = max(layer.tokens, 1)
            share = None
            if layer.groups_GE is not None:
                share = (layer.groups_GE / layer.groups_GE.sum(-1, keepdim=True).clamp_min(1e-12)).tolist()
            out.append(
                LayerSummary(
                    layer=i,
                    num_experts=counts_E.numel(),
                    tokens=layer.tokens,
                    expert_counts=counts_E.tolist(),
                    expert_load=(counts_E / counts_E.sum().clamp_min(1e-12)).tolist(),
                    load_cv=_cv(counts_E),
                    dropped_frac=layer.dropped / tokens,
                    router_entropy=layer.entropy / tokens,
                    group_share=share,
                )
            )
        return out

    def expert_load_cv(self) -> float | None:
        """Mean over layers of each layer's ``load_cv``; ``None`` without MoE layers."""
        return sum(_cv(layer.counts_E) for layer in self._layers) / len(self._layers) if self._layers else None

    def dropped_frac(self) -> float | None:
        tokens = sum(layer.tokens for layer in self._layers)
        return sum(layer.dropped for layer in self._layers) / tokens if tokens else None

    def router_entropy(self) -> float | None:
        tokens = sum(layer.tokens for layer in self._layers)
        return sum(layer.entropy for layer in self._layers) / tokens if tokens else None

    def specialisation(self, layer: int | None = None) -> dict[str, Any] | None:
        """``{"by", "layer", "groups", "share" (G x E)}`` of ``layer`` (default: the last layer with group counts);
        ``None`` when no layer has group counts."""
        with_groups = [i for i, lay in enumerate(self._layers) if lay.groups_GE is not None]
        if not with_groups:
            return None
        index = with_groups[-1] if layer is None else layer
        counts_GE = self._layers[index].groups_GE
        if counts_GE is None:
            raise ValueError(f"layer {index} has no group counts; layers with them: {with_groups}")
        share_GE = counts_GE / counts_GE.sum(-1, keepdim=True).clamp_min(1e-12)
        return {"by": self.group_by, "layer": index, "groups": list(self.group_names or ()), "share": share_GE.tolist()}

    def summary(self) -> dict[str, Any]:
        """Everything above as one JSON-able object (what the routing-analytics callback writes)."""
        return {
            "num_moe_layers": self.num_layers,
            "expert_load_cv": self.expert_load_cv(),
            "dropped_frac": self.dropped_frac(),
            "router_entropy": self.router_entropy(),
            "expert_load": [layer.expert_load for layer in self.layers()],
            "group_by": self.group_by,
            "groups": list(self.group_names) if self.group_names is not None else None,
            "specialisation": self.specialisation(),
            "layers": [asdict(layer) for layer in self.layers()],
        }

    def table(self) -> str:
        """The per-layer summary as text (expert shares in %, load CV, dropped fraction, entropy)."""
        if not self._layers:
            return "no MoE layers"
        lines = ["layer | expert load (% of routed pairs)                     | load CV | dropped | entropy"]
        for layer in self.layers():
            shares = " ".join(f"{100 * s:4.1f}" for s in layer.expert_load)
            lines.append(
                f"{layer.layer:5d} | {shares:<52} | {layer.load_cv:7.3f} | {layer.dropped_frac:7.3f} "
                f"| {layer.router_entropy:7.3f}"
            )
        return "\n".join(lines)
