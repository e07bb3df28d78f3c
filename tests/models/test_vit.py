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


@pytest.mark.parametrize("router", ["topk", "omni"])
def test_shares_one_router_when_the_router_class_says_so(router, tmp_path):
    """The Omni-router is one router for every MoE layer (``shared_across_layers``), in moe_vit as in the Conformer
    and moe_patchtst: one instance (one gate for the 4 MoE layers) that gets gradients from every layer, and
    stays one instance through a state-dict round trip and a saved folder."""
    kwargs = dict(img_size=8, patch_size=2, depth=4, moe={"router": router, "num_experts": 4, "top_k": 1})
    model = moezoo.create_model("moe_vit_debug", **kwargs)
    layers = moezoo.models.moe_layers(model)
    assert len(layers) == 4 and len({id(layer.router) for layer in layers}) == (1 if router == "omni" else 4)
    assert (model.shared_router is not None) == (router == "omni")
    if router == "omni":
        assert all(layer.router is model.shared_router for layer in layers)
    topk = moezoo.create_model("moe_vit_debug", **{**kwargs, "moe": {**kwargs["moe"], "router": "topk"}})
    gate = layers[0].router.gate.weight.numel()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in topk.parameters()) - (
        3 * gate if router == "omni" else 0
    )
    # the shared gate's gradient is the sum of both layers' contributions
    logits, auxes = model.forward_with_aux(torch.randn(3, 1, 8, 8))
    (logits.pow(2).mean() + sum(a.aux_loss for a in auxes)).backward()
    assert all(layer.router.gate.weight.grad is not None for layer in layers)
    # round trips: another instance loads the state dict; a saved folder rebuilds the model
    other = moezoo.create_model("moe_vit_debug", **kwargs)
    other.load_state_dict(model.state_dict())
    folder = moezoo.create_model(str(moezoo.save_pretrained(model, tmp_path / "vit", card=False)), pretrained=True)
    x = torch.randn(2, 1, 8, 8)
    for loaded in (other, folder):
        routers = [layer.router for layer in moezoo.models.moe_layers(loaded)]
        assert len({id(r) for r in routers}) == (1 if router == "omni" else 4)
        for mine, theirs in zip(layers, routers, strict=True):
            assert torch.equal(mine.router.gate.weight, theirs.gate.weight)
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    dense = moezoo.create_model("moe_vit_debug", **{**kwargs, "moe": {**kwargs["moe"], "dense": True}})
    assert dense.shared_router is None
