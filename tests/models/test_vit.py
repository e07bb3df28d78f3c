"""moe_vit: shapes, dense twin, registry and bad input."""

from __future__ import annotations

import pytest
import torch

import moezoo
from moezoo.models import parameter_counts
from moezoo.tasks.vision import ImageClassificationTask


def test_registry_lists_and_builds():
    assert {"moe_vit_debug", "moe_vit_tiny"} <= set(moezoo.list_models("moe_vit_*"))
    with pytest.raises(ValueError, match="not registered"):
        moezoo.create_model("moe_vit_huge")
    with pytest.raises(ValueError, match="has no released weights|no weights tagged"):
        moezoo.create_model("moe_vit_debug.nope", pretrained=True)


@pytest.mark.parametrize("router", ["topk", "expert_choice", "sinkhorn", "sigmoid_lossfree", "relu", "soft"])
def test_forward_with_aux_every_router(router):
    kwargs = {"slots_per_expert": 4} if router == "soft" else {}
    model = moezoo.create_model(
        "moe_vit_debug", img_size=8, patch_size=2, moe={"router": router, "router_kwargs": kwargs}
    )
    logits, auxes = model.forward_with_aux(torch.randn(3, 1, 8, 8))
    assert logits.shape == (3, 10) and len(auxes) == 2
    logits.sum().backward()


def test_dense_twin_has_equal_active_parameters():
    moe = moezoo.create_model("moe_vit_tiny", img_size=8, patch_size=2, moe={"num_shared_experts": 1})
    dense = moezoo.create_model("moe_vit_tiny", img_size=8, patch_size=2, moe={"num_shared_experts": 1, "dense": True})
    moe_counts, dense_counts = parameter_counts(moe), parameter_counts(dense)
    router_params = sum(layer.router.gate.weight.numel() for layer in moezoo.models.moe_layers(moe))
    assert moe_counts["active"] == dense_counts["active"] + router_params
    assert moe_counts["total"] > dense_counts["total"]


def test_bad_input():
    with pytest.raises(ValueError, match="img_size=30 must be divisible by patch_size=4"):
        moezoo.create_model("moe_vit_debug", img_size=30, patch_size=4)
    model = moezoo.create_model("moe_vit_debug", img_size=8, patch_size=2)
    with pytest.raises(ValueError, match="x must have shape \\(B, 1, 8, 8\\)"):
        model(torch.randn(2, 3, 8, 8))
    task = ImageClassificationTask("moe_vit_debug", {"img_size": 8, "patch_size": 2})
    with pytest.raises(ValueError, match="class ids must be in \\[0, 10\\)"):
        task.compute_loss((torch.randn(2, 1, 8, 8), torch.tensor([1, 12])), "train")
