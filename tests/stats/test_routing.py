"""``moezoo.stats.RoutingStats`` against naive counts of the routing pairs: per-layer load, CV, dropped fraction,
entropy, and the group x expert shares for equal-length samples, padded samples and blend weights."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import MoE
from moezoo.models import create_model
from moezoo.stats import RoutingStats, TokenGroups


def test_load_cv_and_groups_against_a_naive_count() -> None:
    model = create_model("moe_vit_debug", img_size=8, patch_size=2, num_classes=3).eval()
    x = torch.randn(7, 1, 8, 8)
    group_B = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    stats = RoutingStats()
    tokens = 17  # 16 patches + the class token
    load = torch.zeros(2, 4)
    spec = torch.zeros(2, 3, 4)
    dropped = entropy = seen = 0.0
    for xb, gb in ((x[:4], group_B[:4]), (x[4:], group_B[4:])):
        with torch.no_grad():
            _, auxes = model.forward_with_aux(xb)
        stats.update(auxes, TokenGroups(gb, ("a", "b", "c"), "cls"))
        for layer, aux in enumerate(auxes):
            for token, expert in zip(aux.routing.token_idx_N.tolist(), aux.routing.expert_idx_N.tolist()):
                load[layer, expert] += 1
                spec[layer, int(gb[token // tokens]), expert] += 1
            dropped += float(aux.dropped_frac) * aux.num_tokens
            entropy += float(aux.router_entropy) * aux.num_tokens
            seen += aux.num_tokens
    summary = stats.summary()
    torch.testing.assert_close(
        torch.tensor(summary["expert_load"]), load / load.sum(-1, keepdim=True), check_dtype=False
    )
    cv = (load.std(-1, unbiased=False) / load.mean(-1)).mean()
    assert summary["expert_load_cv"] == pytest.approx(float(cv), rel=1e-6)
    assert summary["dropped_frac"] == pytest.approx(dropped / seen) and summary["router_entropy"] == pytest.approx(
        entropy / seen
    )
    assert summary["specialisation"]["groups"] == ["a", "b", "c"] and summary["specialisation"]["layer"] == 1
    for layer in range(2):
        share = torch.tensor(summary["layers"][layer]["group_share"])
        torch.testing.assert_close(share, spec[layer] / spec[layer].sum(-1, keepdim=True), check_dtype=False)
    assert [row["tokens"] for row in summary["layers"]] == [7 * tokens] * 2
    assert "layer |" in stats.table() and len(stats.table().splitlines()) == 3


def test_padded_samples_map_through_their_lengths() -> None:
    """The layer routes only real tokens; each sample's tokens counted alone (no padding) give the same counts."""
    moe = MoE(8, 16, num_experts=4, top_k=1).eval()
    lengths_B = torch.tensor([5, 1, 7, 3])
    group_B = torch.tensor([2, -1, 4, 2])  # a group, not counted, another, the first again
    x_BLD = torch.randn(4, 7, 8)
    mask_BL = torch.arange(7) < lengths_B[:, None]
    stats = RoutingStats()
    with torch.no_grad():
        _, aux = moe(x_BLD, mask=mask_BL)
        stats.update([aux], TokenGroups(group_B, tuple("abcde"), "language", lengths_B))
        expected_GE = torch.zeros(5, 4, dtype=torch.float64)
        for b in range(4):
            _, alone = moe(x_BLD[b, : lengths_B[b]])
            if group_B[b] >= 0:
                expected_GE[group_B[b]] += torch.bincount(alone.routing.expert_idx_N, minlength=4).double()
    assert stats.layers()[0].tokens == 16
    share = torch.tensor(stats.specialisation()["share"], dtype=torch.float64)
    torch.testing.assert_close(share, expected_GE / expected_GE.sum(-1, keepdim=True).clamp_min(1e-12))
    assert share[1].sum() == share[3].sum() == 0  # groups without tokens have rows of zeros


def test_blend_weights_and_layers_without_pairs() -> None:
    yolo = create_model("moe_yolo_debug", num_classes=3, in_chans=1, num_experts=2).eval()
    with torch.no_grad():
        out, auxes = yolo.forward_with_aux(torch.rand(4, 1, 64, 64))
    groups = TokenGroups(torch.tensor([0, 1, 1, 0]), ("clean", "degraded"), "domain")
    stats = RoutingStats()
    stats.update(auxes, groups)  # the blend router's auxes carry no pairs: no group counts from them
    assert stats.specialisation() is None
    w_BSN = out["routing"]
    for s in range(3):
        stats.add_group_weights(s, groups, w_BSN[:, s])
    spec = stats.specialisation()
    assert spec["layer"] == 2 and spec["by"] == "domain"
    expected = torch.stack([w_BSN[[0, 3], 2].mean(0), w_BSN[[1, 2], 2].mean(0)])
    torch.testing.assert_close(torch.tensor(spec["share"]), expected, check_dtype=False)
    torch.testing.assert_close(torch.tensor(stats.summary()["expert_load"]), w_BSN.mean(0), check_dtype=False)


def test_bad_groups_and_inconsistent_layers_are_errors() -> None:
    with pytest.raises(ValueError, match="group_B values must be -1 or in"):
        TokenGroups(torch.tensor([0, 3]), ("a", "b"))
    with pytest.raises(ValueError, match="lengths_B must have one entry per sample"):
        TokenGroups(torch.tensor([0, 1]), ("a", "b"), lengths_B=torch.tensor([3]))
    assert TokenGroups(torch.tensor([0, 1]), ("a", "b")).of_tokens(5) is None  # 5 tokens do not split over 2
    stats = RoutingStats()
    moe4, moe2 = MoE(8, 16, num_experts=4, top_k=1), MoE(8, 16, num_experts=2, top_k=1)
    stats.update([moe4(torch.randn(3, 8))[1]])
    with pytest.raises(ValueError, match="reported 2 experts after 4"):
        stats.update([moe2(torch.randn(3, 8))[1]])
    stats.update([moe4(torch.randn(3, 8))[1]], TokenGroups(torch.tensor([0, 1, 0]), ("a", "b"), "x"))
    with pytest.raises(ValueError, match="groups changed within a split"):
        stats.update([moe4(torch.randn(3, 8))[1]], TokenGroups(torch.tensor([0, 1, 0]), ("a", "c"), "x"))
    stats.reset()
    assert not stats and stats.summary()["expert_load_cv"] is None and stats.table() == "no MoE layers"
