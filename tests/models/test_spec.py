"""``MoESpec``: one validated MoE config object for every model family; the router validates its own options."""

from __future__ import annotations

import warnings

import pytest
import torch

from moezoo.layers import ROUTERS, MoE, TopKRouter
from moezoo.layers.segment import SegmentMoE
from moezoo.models import create_model, moe_layers
from moezoo.models.spec import LegacyConfigWarning, MoESpec, check_spec_router, upgrade_model_kwargs

FAMILIES = {  # debug size, extra model arguments, spec argument
    "moe_vit_debug": (dict(img_size=8, patch_size=2), "moe"),
    "moe_dit_debug": ({}, "moe"),
    "moe_conformer_debug": ({}, "moe"),
    "moe_patchtst_debug": ({}, "moe"),
    "moe_yolo_debug": (dict(num_classes=2), "neck_moe"),
}


@pytest.mark.parametrize(
    "fields,error,match",
    [
        (dict(num_experts=0), ValueError, r"moe.num_experts must be an integer >= 1, got 0"),
        (dict(num_experts=True), ValueError, r"moe.num_experts"),
        (dict(top_k=5), ValueError, r"moe.top_k must be an integer in \[1, num_experts=4\], got 5"),
        (dict(moe_every=0), ValueError, r"moe.moe_every"),
        (dict(moe_offset=-1), ValueError, r"moe.moe_offset"),
        (dict(num_shared_experts=-1), ValueError, r"moe.num_shared_experts"),
        (dict(granularity=0), ValueError, r"moe.granularity"),
        (dict(dense="yes"), TypeError, r"moe.dense must be true or false, got 'yes'"),
        (dict(backend="cuda"), ValueError, r"moe.backend must be null or one of .*'reference'.*got 'cuda'"),
        (dict(router="nope"), ValueError, r"moe.router='nope' is unknown; registered routers are \["),
        (
            dict(router_kwargs={"capacity": 1.0}),
            TypeError,
            r"moe.router_kwargs: router='topk' does not accept capacity; it accepts top_k, noise",
        ),
        (dict(router_kwargs={"top_k": 1}), ValueError, r"must not set \['top_k'\].*moe.top_k"),
        (dict(router_kwargs=[1]), TypeError, r"moe.router_kwargs must be a mapping"),
        (dict(segment_sizes=[3, 5]), ValueError, r"segment_sizes=\[3, 5\] needs router 'segment'"),
        (dict(router="segment", segment_sizes=[2, 0]), ValueError, r"moe.segment_sizes must be a positive integer"),
        (dict(router="segment", granularity=2), ValueError, r"moe.granularity must be 1 with router 'segment'"),
        (dict(bias=1), TypeError, r"moe.bias must be true or false, got 1"),
        (dict(router="segment", bias=True), ValueError, r"moe.bias must be false with router 'segment'"),
    ],
)
def test_bad_fields_name_the_key_the_value_and_what_is_allowed(fields, error, match):
    with pytest.raises(error, match=match):
        MoESpec(**fields)


def test_router_options_are_checked_against_the_router_and_its_bases():
    check_spec_router("topk", {"capacity_factor": 1.0, "drop_policy": "batch_priority"})
    check_spec_router("omni", {"capacity_factor": 1.0, "noise": "jitter"})  # OmniRouter forwards **kwargs
    check_spec_router("soft", {"slots_per_expert": 2})
    with pytest.raises(TypeError, match=r"router='soft' does not accept capacity_factor"):
        check_spec_router("soft", {"capacity_factor": 1.0})
    with pytest.raises(ValueError, match=r"must not set \['segment_size'\].*moe.segment_sizes"):
        check_spec_router("segment", {"segment_size": 2})


def test_a_router_class_with_its_own_check_validates_its_options(monkeypatch):
    class Picky(TopKRouter):
        @classmethod
        def check_options(cls, num_experts, options):
            super().check_options(num_experts, options)
            if options["noise_eps"] > 0.5:
                raise ValueError(f"noise_eps must be <= 0.5, got {options['noise_eps']}")

    monkeypatch.setitem(ROUTERS, "picky", Picky)
    MoESpec(router="picky", router_kwargs={"noise_eps": 0.1})
    with pytest.raises(ValueError, match="noise_eps must be <= 0.5"):
        MoESpec(router="picky", router_kwargs={"noise_eps": 0.9})


def test_resolve_merges_a_mapping_over_defaults_and_keeps_a_spec():
    spec = MoESpec.resolve({"router": "soft", "router_kwargs": {"slots_per_expert": 2}}, {"num_experts": 8})
    assert (spec.num_experts, spec.router, spec.top_k) == (8, "soft", 2)
    given = MoESpec(num_experts=3, top_k=1)
    assert MoESpec.resolve(given, {"num_experts": 8}) is given
    assert MoESpec.resolve(None, {"top_k": 1}) == MoESpec(top_k=1)
    with pytest.raises(TypeError, match=r"moe has no field\(s\) \['experts'\]; its fields are \["):
        MoESpec.resolve({"experts": 4})
    with pytest.raises(TypeError, match="moe must be a MoESpec, a mapping of its fields or None, got int"):
        MoESpec.resolve(4)
    assert MoESpec.resolve(spec.to_dict()) == spec


def test_a_size_keeps_its_moe_defaults_under_a_partial_mapping():
    model = create_model("moe_vit_tiny", img_size=8, patch_size=2, moe={"router": "soft"})
    assert (model.spec.num_experts, model.spec.moe_every, model.spec.router) == (8, 2, "soft")
    layers = moe_layers(model)
    assert len(layers) == 3 and all(layer.num_experts == 8 for layer in layers)
    exact = MoESpec(num_experts=2, top_k=1, moe_every=1, moe_offset=0)
    model = create_model("moe_vit_tiny", img_size=8, patch_size=2, moe=exact)
    assert model.spec is exact and len(moe_layers(model)) == 6


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_takes_one_spec_and_its_dense_twin(name):
    kwargs, argument = FAMILIES[name]
    moe = create_model(name, **kwargs, **{argument: {"num_experts": 4, "top_k": 1}})
    dense = create_model(name, **kwargs, **{argument: {"num_experts": 4, "top_k": 1, "dense": True}})
    assert moe_layers(moe) and not moe_layers(dense)
    assert all(layer.num_experts == 4 and layer.top_k == 1 for layer in moe_layers(moe))


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "moe_yolo_debug"])
def test_bias_builds_experts_and_the_dense_twin_with_biases(name):
    """``moe.bias`` reaches every MoE layer (experts and shared experts) and the dense twin's FFNs; the default
    builds none, so released models keep their parameters."""
    kwargs, argument = FAMILIES[name]
    moe = {"num_experts": 4, "top_k": 1, "num_shared_experts": 1, "bias": True, "router": "topk", "segment_sizes": 1}
    model = create_model(name, **kwargs, **{argument: moe})
    layers = moe_layers(model)
    assert layers and all(
        layer.experts.b_in is not None and layer.experts.b_out is not None and layer.shared.fc_in.bias is not None
        for layer in layers
    )
    assert all(layer.experts.b_in is None for layer in moe_layers(create_model(name, **kwargs)))
    plain = create_model(name, **kwargs, **{argument: {**moe, "bias": False}})
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    per_layer = [
        4 * (layer.experts.b_in.shape[1] + layer.dim) + layer.shared.hidden_dim + layer.dim for layer in layers
    ]
    assert extra == sum(per_layer)
    twin = create_model(name, **kwargs, **{argument: {**moe, "dense": True}})
    twin_plain = create_model(name, **kwargs, **{argument: {**moe, "dense": True, "bias": False}})
    assert sum(p.numel() for p in twin.parameters()) > sum(p.numel() for p in twin_plain.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_num_iterations_builds_chain_of_experts_in_every_family_and_its_dense_twin(name):
    """``moe.num_iterations > 1``: every MoE layer is a ChainOfExperts with a router per pass; its dense twin has the
    chain's active width (passes x top_k experts); the default (1) builds the plain MoE layer."""
    from moezoo.layers import ChainOfExperts

    kwargs, argument = FAMILIES[name]
    spec = {"num_experts": 4, "top_k": 1, "num_iterations": 3, "inner_residual": False, "router": "topk"}
    spec["segment_sizes"] = 1
    layers = moe_layers(create_model(name, **kwargs, **{argument: spec}))
    assert layers and all(
        isinstance(m, ChainOfExperts) and len(m.routers) == 3 and not m.inner_residual for m in layers
    )
    assert not any(isinstance(m, ChainOfExperts) for m in moe_layers(create_model(name, **kwargs)))
    twin = create_model(name, **kwargs, **{argument: {**spec, "dense": True}})
    widths = {m.hidden_dim for m in twin.modules() if type(m).__name__ == "FeedForward" and m.hidden_dim}
    assert {layer.active_ffn_dim for layer in layers} <= widths


@pytest.mark.parametrize(
    "fields,error,match",
    [
        (dict(num_iterations=0), ValueError, r"moe.num_iterations must be an integer >= 1, got 0"),
        (dict(inner_residual=1), TypeError, r"moe.inner_residual must be true or false, got 1"),
        (dict(num_iterations=2, router="soft"), ValueError, r"needs a sparse router built per layer.*'soft'"),
        (dict(num_iterations=2, router="smear"), ValueError, r"needs a sparse router built per layer.*'smear'"),
        (dict(num_iterations=2, router="omni"), ValueError, r"needs a sparse router built per layer.*'omni'"),
        (dict(num_iterations=2, router="segment", segment_sizes=2), ValueError, r"router 'segment' is not one"),
    ],
)
def test_chain_fields_name_the_key_and_what_is_allowed(fields, error, match):
    with pytest.raises(error, match=match):
        MoESpec(**{"num_experts": 4, "top_k": 1, **fields})


def test_bias_is_a_spec_field_only_and_a_config_builds_it():
    spec = MoESpec.resolve({"bias": True, "num_experts": 2, "top_k": 1})
    assert spec.bias and spec.to_dict()["bias"] is True and MoESpec.resolve(spec.to_dict()) == spec
    assert upgrade_model_kwargs("moe_vit_tiny", {"bias": True}) == ({"bias": True}, [])  # no old flat spelling
    with pytest.raises(TypeError):
        create_model("moe_vit_debug", img_size=8, patch_size=2, bias=True)


def test_flat_arguments_fold_into_the_spec_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = create_model("moe_vit_debug", img_size=8, patch_size=2, num_experts=2, top_k=1, router="sinkhorn")
    assert [w.category for w in caught] == [LegacyConfigWarning]
    assert "['num_experts', 'router', 'top_k']" in str(caught[0].message) and "moe: {" in str(caught[0].message)
    new = create_model("moe_vit_debug", img_size=8, patch_size=2, moe=dict(num_experts=2, top_k=1, router="sinkhorn"))
    assert old.spec == new.spec
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    # Nested keys win over flat ones; a spec instance cannot be mixed with flat keys.
    kwargs, moved = upgrade_model_kwargs("moe_vit_tiny", {"top_k": 1, "moe": {"top_k": 2}, "dim": 8})
    assert kwargs == {"moe": {"top_k": 2}, "dim": 8} and moved == ["top_k"]
    with pytest.raises(ValueError, match="cannot be combined with the flat arguments"):
        upgrade_model_kwargs("moe_vit_tiny", {"top_k": 1, "moe": MoESpec()})
    # YOLO's mixture arguments are its own; only the old neck-MoE arguments move, and 0 experts meant none.
    assert upgrade_model_kwargs("moe_yolo_nano", {"num_experts": 4, "dense": True}) == (
        {"num_experts": 4, "dense": True},
        [],
    )
    assert upgrade_model_kwargs("moe_yolo_nano", {"neck_moe_experts": 4, "neck_moe_top_k": 1})[0] == {
        "neck_moe": {"num_experts": 4, "top_k": 1}
    }
    assert upgrade_model_kwargs("moe_yolo_nano", {"neck_moe_experts": 0})[0] == {"neck_moe": None}
    assert upgrade_model_kwargs("unregistered_family_x", {"num_experts": 4}) == ({"num_experts": 4}, [])


CONFORMER_ROUTERS = {  # every registered router that routes frames, with what it needs
    "topk": {},
    "expert_choice": {},
    "sigmoid_lossfree": {},
    "sinkhorn": {},
    "relu": {},
    "soft": {"router_kwargs": {"slots_per_expert": 2}},
    "segment": {"segment_sizes": 2},
    "omni": {},
    "language": {},
    "global_embedding": {},
}


@pytest.mark.parametrize("router", CONFORMER_ROUTERS)
def test_conformer_takes_any_frame_router(router):
    model = create_model("moe_conformer_debug", moe={"router": router, **CONFORMER_ROUTERS[router]})
    out, auxes = model.forward_with_aux(torch.randn(2, 40, 80), torch.tensor([40, 29]))
    assert auxes and torch.isfinite(out.log_probs_BLV).all()
    (out.log_probs_BLV.mean() + sum(a.aux_loss for a in auxes)).backward()
    layers = moe_layers(model)
    assert all(isinstance(layer, SegmentMoE) == (router == "segment") for layer in layers)
    shared = {id(layer.router) for layer in layers}
    one_router = router in ("omni", "language")  # their classes say shared_across_layers
    assert (len(shared) == 1) == one_router and (model.shared_router is not None) == one_router
    assert (model.lid_head is not None) == (router == "language")
    assert (model.global_proj is not None) == (router == "global_embedding")


def test_a_router_needing_side_inputs_the_model_lacks_is_refused():
    with pytest.raises(
        ValueError, match=r"moe.router='language' needs the side input\(s\) \['lid_probs'\], which moe_vit"
    ):
        create_model("moe_vit_debug", moe={"router": "language"})
    with pytest.raises(ValueError, match=r"needs the side input\(s\) \['cfg_dropped'\], which moe_conformer"):
        create_model("moe_conformer_debug", moe={"router": "promoe"})
    create_model("moe_dit_debug", moe={"router": "promoe", "num_experts": 5, "top_k": 1})  # the DiT provides it
    create_model("moe_vit_debug", moe={"router": "language", "dense": True})  # a dense twin routes nothing
    with pytest.raises(ValueError, match="embed_dim=8 must equal global_embed_dim=32"):
        create_model("moe_conformer_debug", moe={"router": "global_embedding", "router_kwargs": {"embed_dim": 8}})


def test_patchtst_segments_per_block_and_token_routers():
    seg = create_model("moe_patchtst_debug", moe={"segment_sizes": [2, 4]})
    assert [layer.segment_size for layer in moe_layers(seg)] == [2, 4]
    token = create_model("moe_patchtst_debug", moe={"router": "topk", "segment_sizes": 1})
    assert all(type(layer) is MoE for layer in moe_layers(token))
    with pytest.raises(ValueError, match=r"moe.segment_sizes must be one positive integer or a list of 2"):
        create_model("moe_patchtst_debug", moe={"segment_sizes": [1, 2, 3]})


@pytest.mark.parametrize("router", ["topk", "omni"])
def test_patchtst_shares_one_router_when_the_router_class_says_so(router):
    """The Omni-router is one router for every MoE layer (``shared_across_layers``), in moe_patchtst as in the
    Conformer: one instance, one gate's parameters fewer per extra layer, and it still trains."""
    model = create_model("moe_patchtst_debug", moe={"router": router, "segment_sizes": 1})
    layers = moe_layers(model)
    assert len(layers) == 2 and len({id(layer.router) for layer in layers}) == (1 if router == "omni" else 2)
    assert (model.shared_router is not None) == (router == "omni")
    topk = create_model("moe_patchtst_debug", moe={"router": "topk", "segment_sizes": 1})
    gate = layers[0].router.gate.weight.numel()
    expected = sum(p.numel() for p in topk.parameters()) - (gate if router == "omni" else 0)
    assert sum(p.numel() for p in model.parameters()) == expected
    out, auxes = model.forward_with_aux(torch.randn(2, model.seq_len, model.num_channels))
    (out.pow(2).mean() + sum(a.aux_loss for a in auxes)).backward()
    assert layers[0].router.gate.weight.grad is not None
    dense = create_model("moe_patchtst_debug", moe={"router": router, "segment_sizes": 1, "dense": True})
    assert dense.shared_router is None
