"""``moezoo.stats.count_parameters`` against counts written out by hand for each kind of layer, and against the
parameter counts recorded on every released model card (so ``moezoo.zoo`` can use it unchanged)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moezoo.layers import MoE
from moezoo.layers.segment import SegmentMoE
from moezoo.models import create_model, get_pretrained_cfg, list_models, parameter_counts
from moezoo.models.registry import split_name
from moezoo.stats import count_parameters


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_topk_layer_counts_router_shared_and_k_of_e_experts() -> None:
    moe = MoE(16, 32, num_experts=8, top_k=2, num_shared_experts=1, shared_expert_gate=True)
    experts = moe.experts.w_in.numel() + moe.experts.w_out.numel()
    router, shared = _numel(moe.router), _numel(moe.shared) + _numel(moe.shared_gate)
    counts = count_parameters(moe)
    assert counts.total == experts + router + shared
    assert counts.active == router + shared + experts * 2 // 8
    parts = counts.components
    assert (parts["routed_experts"].total, parts["routed_experts"].active) == (experts, experts // 4)
    assert (parts["routers"].active, parts["shared_experts"].active, parts["dense"].total) == (router, shared, 0)


def test_soft_moe_is_all_active() -> None:
    moe = MoE(16, 32, num_experts=4, top_k=1, router="soft", router_kwargs={"slots_per_expert": 2})
    counts = count_parameters(moe)
    assert counts.active == counts.total == _numel(moe)
    assert counts.components["routers"].total == _numel(moe.router) > 0


def test_segment_experts_count_whole_per_token() -> None:
    """A token's output goes through the whole selected segment expert: per-token count = per-segment count."""
    moe = SegmentMoE(8, 16, num_experts=4, top_k=1, segment_size=3)
    experts = _numel(moe.experts)
    assert count_parameters(moe).active == _numel(moe.router) + experts // 4


def test_a_shared_router_counts_once() -> None:
    layers = nn.ModuleList([MoE(8, 16, num_experts=4, top_k=1) for _ in range(2)])
    layers[1].router = layers[0].router  # the Omni-router: one router for every layer
    router = _numel(layers[0].router)
    experts = sum(_numel(m.experts) for m in layers)
    counts = count_parameters(layers)
    assert counts.total == experts + router == _numel(layers)
    assert counts.active == experts // 4 + router


def test_expert_blend_and_dense_models_are_all_active() -> None:
    yolo = create_model("moe_yolo_debug", num_classes=3, in_chans=1, num_experts=2)
    counts = count_parameters(yolo)
    assert counts.active == counts.total == _numel(yolo)
    assert counts.components["routers"].total == _numel(yolo.router)
    dense = create_model("moe_vit_debug", img_size=8, patch_size=2, dense=True)
    assert count_parameters(dense).active == count_parameters(dense).total == _numel(dense)


def test_sharded_experts_count_at_full_size() -> None:
    class Shard(nn.Module):  # the attributes moezoo.parallel.ExpertParallelExperts exposes
        def __init__(self) -> None:
            super().__init__()
            self.num_experts, self.num_local_experts = 8, 2
            self.w_in = nn.Parameter(torch.zeros(2, 4, 6))

    moe = MoE(4, 6, num_experts=8, top_k=2)
    moe.experts = Shard()  # type: ignore[assignment]
    counts = count_parameters(moe)
    assert counts.components["routed_experts"].total == 4 * 2 * 4 * 6
    assert counts.total == 4 * 2 * 4 * 6 + _numel(moe.router)
    assert counts.components["routed_experts"].active == 2 * 4 * 6  # top-2 of 8


def test_models_parameter_counts_is_this_count() -> None:
    model = create_model("moe_vit_debug", img_size=8, patch_size=2, router="soft")
    assert (
        parameter_counts(model)
        == count_parameters(model).as_dict()
        == {"total": _numel(model), "active": _numel(model)}
    )


@pytest.mark.parametrize("name", list_models(pretrained=True))
def test_release_cards_record_this_count(name: str) -> None:
    cfg = get_pretrained_cfg(name)
    model = create_model(split_name(name)[0], **cfg.model_kwargs)
    assert count_parameters(model).as_dict() == cfg.params
