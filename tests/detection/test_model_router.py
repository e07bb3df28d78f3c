"""moe_yolo: shapes, the expert-blending router against a naive oracle (forward and gradients), equal compute."""

from __future__ import annotations

import pytest
import torch

from moezoo.models import create_model, list_models
from moezoo.models.yolo import ExpertBlendRouter, blend_outputs, count_flops
from tests.detection import oracles_detection as oracle


def test_registered_sizes():
    assert {"moe_yolo_debug", "moe_yolo_nano", "moe_yolo_tiny"} <= set(list_models("moe_yolo_*"))


@pytest.mark.parametrize("num_experts,top_k", [(2, None), (3, None), (4, 2), (3, 1)])
def test_router_blend_matches_oracle_forward_and_gradients(num_experts, top_k):
    torch.manual_seed(num_experts)
    channels, batch, sizes = (5, 6, 7), 3, ((4, 4), (2, 2), (1, 1))
    router = ExpertBlendRouter(channels, num_experts, hidden=8, top_k=top_k).double()
    for mlp in router.mlps:  # leave the zero init, so that the weights depend on the input
        torch.nn.init.normal_(mlp[-1].weight, std=0.5)
        torch.nn.init.normal_(mlp[-1].bias, std=0.5)
    feats = [[torch.randn(batch, c, *hw, dtype=torch.float64, requires_grad=True) for c, hw in zip(channels, sizes)]
             for _ in range(num_experts)]  # fmt: skip
    outputs = [[torch.randn(batch, 9, *hw, dtype=torch.float64, requires_grad=True) for hw in sizes]
               for _ in range(num_experts)]  # fmt: skip
    w = router(feats)
    got = blend_outputs(outputs, w.to(torch.float64))
    mlps = [(m[0].weight, m[0].bias, m[2].weight, m[2].bias) for m in router.mlps]
    want, w_want = oracle.blend_router(feats, outputs, mlps, top_k or num_experts)
    torch.testing.assert_close(w.double(), w_want)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
    if top_k is not None:
        assert int((w > 0).sum(-1).max()) == top_k
    torch.testing.assert_close(w.sum(-1), torch.ones(batch, 3, dtype=w.dtype))
    cotangents = [torch.randn_like(g) for g in got]
    leaves = [t for per in feats + outputs for t in per] + list(router.parameters())
    grads = torch.autograd.grad(got, leaves, cotangents, allow_unused=True)
    grads_want = torch.autograd.grad(want, leaves, cotangents, allow_unused=True)
    for g, e in zip(grads, grads_want):
        if e is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, e)


def test_router_starts_uniform_and_balance_term():
    router = ExpertBlendRouter((4, 4, 4), 4, hidden=8, balance_coef=0.5)
    feats = [[torch.randn(6, 4, 2, 2) for _ in range(3)] for _ in range(4)]
    w = router(feats)
    torch.testing.assert_close(w, torch.full((6, 3, 4), 0.25))
    auxes = router.aux(w)
    assert len(auxes) == 3
    assert auxes[0].losses["balance"].item() == pytest.approx(0.5)  # uniform usage: N * sum (1/N)^2 = 1
    one_hot = torch.zeros(6, 3, 4)
    one_hot[..., 1] = 1.0
    assert router.aux(one_hot)[0].losses["balance"].item() == pytest.approx(0.5 * 4)
    assert router.aux(one_hot)[0].tokens_per_expert_E.tolist() == [0.0, 6.0, 0.0, 0.0]


def test_model_outputs_routing_and_predictions():
    model = create_model("moe_yolo_debug", num_classes=3, in_chans=1, num_experts=3).eval()
    x = torch.rand(2, 1, 32, 64)
    out, auxes = model.forward_with_aux(x)
    assert [tuple(p.shape) for p in out["preds"]] == [(2, 4 * 8 + 3, 4, 8), (2, 35, 2, 4), (2, 35, 1, 2)]
    assert out["routing"].shape == (2, 3, 3)
    assert len(auxes) == 3 and all("balance" in a.losses for a in auxes)
    dets, routing = model.predict(x, conf_thres=0.0)
    assert len(dets) == 2 and routing.shape == (2, 3, 3)
    assert set(dets[0]) == {"boxes", "scores", "labels"} and len(dets[0]["boxes"]) <= 100


def test_dense_twin_has_no_router_and_neck_moe_reports_aux():
    dense = create_model("moe_yolo_debug", num_classes=2, dense=True)
    out, auxes = dense.forward_with_aux(torch.rand(2, 1, 32, 32))
    assert out["routing"] is None and auxes == [] and len(dense.experts) == 1
    moe = create_model("moe_yolo_debug", num_classes=2, neck_moe={"num_experts": 4, "top_k": 1})
    out, auxes = moe.forward_with_aux(torch.rand(2, 1, 32, 32))
    assert len(auxes) == 2 + 3  # one core MoE per expert detector, one blend router aux per scale
    twin = create_model("moe_yolo_debug", num_classes=2, neck_moe={"num_experts": 4, "top_k": 1}, dense=True)
    assert twin.forward_with_aux(torch.rand(2, 1, 32, 32))[1] == []


def test_equal_compute_baseline_matches_the_mixture_flops():
    moe = create_model("moe_yolo_debug", num_classes=10, num_experts=4)
    wide = create_model("moe_yolo_debug", num_classes=10, dense=True, match_compute_of=4)
    single = create_model("moe_yolo_debug", num_classes=10, dense=True)
    f_moe, f_wide, f_single = count_flops(moe), count_flops(wide), count_flops(single)
    assert f_moe / f_single == pytest.approx(4.0, rel=0.02)
    assert f_wide / f_moe == pytest.approx(1.0, abs=0.12)
    assert wide.width > single.width


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_experts=0), "num_experts"),
        (dict(router_top_k=5), "router_top_k"),
        (dict(match_compute_of=4), "match_compute_of"),
        (dict(reg_max=1), "reg_max"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("moe_yolo_debug", **kwargs)


def test_bad_input_shape():
    model = create_model("moe_yolo_debug", num_classes=2, in_chans=1)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 1, 40, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 64, 64))
