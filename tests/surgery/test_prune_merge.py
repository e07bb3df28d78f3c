"""Calibration statistics against a hand count, pruning and merging of experts: never-routed experts pruned and
identical experts merged leave outputs unchanged; parameter counts and router shapes follow; the result reloads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moezoo.layers import MoE, TopKRouter
from moezoo.models import create_model
from moezoo.surgery import calibrate, merge_experts, prune_experts, upcycle

D, F, E = 8, 12, 6


def tiny(num_experts=E, top_k=2, bias=True, **router_kwargs):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D, D),
        MoEOnly(MoE(D, F, num_experts, top_k, router_kwargs={"normalize": True, **router_kwargs}, bias=bias)),
    ).eval()


class MoEOnly(nn.Module):
    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x)[0]


def batches(n=3, rows=10):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(rows, D, generator=gen) for _ in range(n)]


def test_calibration_counts_match_a_hand_count():
    model = tiny()
    data = batches()
    stats = calibrate(model, data)["1.moe"]
    moe = model[1].moe
    count = torch.zeros(E, dtype=torch.float64)
    reap = torch.zeros(E, dtype=torch.float64)
    coact = torch.zeros(E, E, dtype=torch.float64)
    with torch.no_grad():
        for x in data:
            h = model[0](x)
            r = moe(h)[1].routing
            per_token: dict[int, list[int]] = {}
            for t, e, g in zip(r.token_idx_N.tolist(), r.expert_idx_N.tolist(), r.gate_N.tolist()):
                count[e] += 1
                hidden = torch.nn.functional.gelu(h[t] @ moe.experts.w_in[e] + moe.experts.b_in[e])
                y = hidden @ moe.experts.w_out[e] + moe.experts.b_out[e]
                reap[e] += g * float(y.norm())
                per_token.setdefault(t, []).append(e)
            for es in per_token.values():
                for a in es:
                    for b in es:
                        coact[a, b] += 1
    assert stats.tokens == 30
    assert torch.equal(stats.count_E, count)
    torch.testing.assert_close(stats.reap, reap / count.clamp(min=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.coact_EE, coact)
    torch.testing.assert_close(stats.frequency.sum(), torch.tensor(2.0, dtype=torch.float64))  # top-2


def _starve(model, experts):
    """Make ``experts`` never chosen: the MoE's inputs are positive (for positive data) and their router rows
    negative."""
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.fill_(0.1)
        model[1].moe.router.gate.weight[experts] = -10.0


@pytest.mark.parametrize("criterion", ["reap", "frequency"])
def test_pruning_never_routed_experts_leaves_outputs_unchanged(criterion):
    model = tiny()
    _starve(model, [1, 4])
    x = torch.rand(10, D)
    want = model(x)
    stats = calibrate(model, [b.abs() for b in batches()])
    routed = torch.nonzero(stats["1.moe"].count_E).flatten().tolist()
    assert 1 not in routed and 4 not in routed and len(routed) >= 2
    n = len(routed)
    before = sum(p.numel() for p in model.parameters())
    report = prune_experts(model, keep=n, criterion=criterion, stats=stats)
    assert report.kept == {"1.moe": routed}
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
    moe = model[1].moe
    per_expert = D * F + F * D + F + D + D  # w_in, w_out, b_in, b_out, one router row
    assert report.params_before == before and report.params_after == before - (E - n) * per_expert
    assert moe.experts.w_in.shape == (n, D, F) and moe.router.gate.weight.shape == (n, D)
    assert moe.num_experts == moe.router.num_experts == moe.experts.num_experts == n


def test_prune_by_fraction_and_by_indices():
    model = tiny()
    stats = calibrate(model, batches())
    report = prune_experts(model, keep=0.5, stats=stats)
    assert len(report.kept["1.moe"]) == 3
    model = tiny()
    prune_experts(model, keep={"1.moe": [5, 0, 2]})
    assert model[1].moe.num_experts == 3
    with pytest.raises(ValueError, match="needs calibration statistics"):
        prune_experts(tiny(), keep=3)
    with pytest.raises(ValueError, match="top_k=2"):
        prune_experts(tiny(), keep={"1.moe": [0]})
    with pytest.raises(ValueError, match="keep names layers that are not MoE layers"):
        prune_experts(tiny(), keep={"0": [0, 1]})
    with pytest.raises(ValueError, match="criterion='norm'"):
        prune_experts(tiny(), keep=3, criterion="norm")


def test_merging_identical_experts_leaves_outputs_unchanged():
    """An upcycled model's experts are identical copies: merging any partition keeps the dense function."""
    dense = nn.Sequential(nn.Linear(D, D), nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))).eval()
    model = copy.deepcopy(dense)
    upcycle(model, num_experts=E, top_k=2)
    x = torch.randn(10, D)
    want = model(x)
    stats = calibrate(model, batches())
    report = merge_experts(model, groups={"1.0.moe": [[0, 3], [1, 2, 4], [5]]}, stats=stats)
    moe = model[1][0].moe
    assert moe.num_experts == 3 and moe.router.gate.weight.shape == (3, D)
    assert report.groups == {"1.0.moe": [[0, 3], [1, 2, 4], [5]]}
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), dense(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["frequency_weighted", "average"])
def test_merged_weights_are_the_weighted_mean(method):
    model = tiny()
    stats = calibrate(model, batches())
    freq = stats["1.moe"].frequency
    w_in = model[1].moe.experts.w_in.detach().clone()
    report = merge_experts(model, groups={"1.moe": [[0, 1, 2], [3], [4, 5]]}, method=method, stats=stats)
    weights = freq[[0, 1, 2]] if method == "frequency_weighted" else torch.ones(3, dtype=torch.float64)
    weights = weights / weights.sum()
    want = sum(float(w) * w_in[e] for w, e in zip(weights, [0, 1, 2]))
    merged_at = report.layers[0].groups.index([0, 1, 2])
    torch.testing.assert_close(model[1].moe.experts.w_in[merged_at], want)
    # the merged expert keeps the router row of its most frequent member
    rep = max([0, 1, 2], key=lambda e: (float(freq[e]), -e))
    assert report.kept["1.moe"][merged_at] == rep


def test_merge_to_a_count_and_bad_groups():
    model = tiny()
    stats = calibrate(model, batches())
    report = merge_experts(model, groups=2, stats=stats)
    assert model[1].moe.num_experts == 2
    assert sorted(e for g in report.groups["1.moe"] for e in g) == list(range(E))
    with pytest.raises(ValueError, match="must partition"):
        merge_experts(tiny(), groups={"1.moe": [[0, 1], [2]]})
    with pytest.raises(ValueError, match="method='ties'"):
        merge_experts(tiny(), groups=2, method="ties")


def test_soft_moe_is_refused():
    model = nn.Sequential(MoEOnly(MoE(D, F, 4, 1, router="soft")))
    with pytest.raises(ValueError, match="Soft MoE"):
        prune_experts(model, keep={"0.moe": [0, 1]})


def test_the_saved_result_reloads(tmp_path):
    """Save the state dict; rebuild: the same model, upcycle and prune/merge replayed from the reports, load."""

    def base():
        torch.manual_seed(0)
        return create_model("moe_vit_debug", moe={"dense": True}).eval()

    model = base()
    up = upcycle(model, num_experts=4, top_k=2)
    stats = calibrate(model, [torch.randn(2, 1, 28, 28) for _ in range(2)])
    pruned = prune_experts(model, keep=3, stats=stats)
    merged = merge_experts(model, groups=2, stats=calibrate(model, [torch.randn(2, 1, 28, 28)]))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    x = torch.randn(2, 1, 28, 28)
    want = model(x)

    again = base()
    upcycle(again, **{k: v for k, v in up.options.items()})
    prune_experts(again, keep=pruned.kept)
    merge_experts(again, groups=merged.groups)
    again.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.testing.assert_close(again.eval()(x), want)
    assert sum(p.numel() for p in again.parameters()) == merged.params_after


def test_calibration_of_a_segment_moe_counts_segments():
    """A Seg-MoE routes segments of w tokens: calibration sees the segment view its forward builds (padded and
    masked the same way), so the counts are per segment and pruning by them works."""
    from moezoo.layers.segment import SegmentMoE

    torch.manual_seed(0)
    moe = SegmentMoE(4, 16, num_experts=4, top_k=1, segment_size=3).eval()
    model = MoEOnly(moe)
    data = [torch.randn(2, 7, 4), torch.randn(2, 7, 4)]  # 7 tokens -> 3 segments (the last padded)
    stats = calibrate(model, data)["moe"]
    assert stats.tokens == 2 * 2 * 3 and float(stats.count_E.sum()) == 12  # top-1 of every segment
    with torch.no_grad():
        chosen = torch.cat([moe(x)[1].routing.expert_idx_N for x in data])
    assert torch.equal(stats.count_E, torch.bincount(chosen, minlength=4).double())
    prune_experts(model, keep=2, criterion="reap", stats={"moe": stats})
    assert moe.num_experts == 2 and model(data[0]).shape == data[0].shape


class SharedRouterPair(nn.Module):
    """Two MoE layers on the same (positive) input with one router instance (the Omni-Router's sharing)."""

    def __init__(self, num_experts=E, top_k=2, bias=True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(D, D)
        router = TopKRouter(D, num_experts, top_k=top_k, normalize=True)
        self.a = MoE(D, F, num_experts, top_k, router=router, bias=bias)
        self.b = MoE(D, F, num_experts, top_k, router=router, bias=bias)

    def forward(self, x):
        h = self.proj(x)
        return self.a(h)[0] + 2 * self.b(h)[0]


def _shared(starve=()):
    model = SharedRouterPair().eval()
    with torch.no_grad():
        model.proj.weight.abs_()
        model.proj.bias.fill_(0.1)
        model.a.router.gate.weight[list(starve)] = -10.0
    return model


@pytest.mark.parametrize("criterion", ["reap", "frequency"])
def test_layers_sharing_a_router_are_pruned_together(criterion):
    model = _shared(starve=[1, 4])
    x = torch.rand(10, D)
    want = model(x)
    stats = calibrate(model, [b.abs() for b in batches()])
    routed = torch.nonzero(stats["a"].count_E).flatten().tolist()
    assert routed == torch.nonzero(stats["b"].count_E).flatten().tolist() and 1 not in routed and 4 not in routed
    before = sum(p.numel() for p in model.parameters())
    report = prune_experts(model, keep=len(routed), criterion=criterion, stats=stats)
    assert report.kept == {"a": routed, "b": routed}
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
    n = len(routed)
    assert model.a.router is model.b.router and model.a.router.gate.weight.shape == (n, D)
    assert model.a.experts.w_in.shape == model.b.experts.w_in.shape == (n, D, F)
    per_expert = 2 * (D * F + F * D + F + D) + D  # both layers' experts, one shared router row
    assert report.params_after == before - (E - n) * per_expert


def test_shared_router_scores_are_summed_over_its_layers():
    """An expert the first layer ranks low but the second ranks high survives when the sum says so."""
    model = _shared()
    stats = {"a": calibrate(model, batches())["a"], "b": calibrate(model, batches())["b"]}
    stats["a"].reap_sum_E = torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64) * stats["a"].count_E.clamp(min=1)
    stats["b"].reap_sum_E = torch.tensor([0.0, 0, 0, 0, 0, 9], dtype=torch.float64) * stats["b"].count_E.clamp(min=1)
    report = prune_experts(model, keep=3, criterion="reap", stats=stats)
    assert report.kept == {"a": [0, 1, 5], "b": [0, 1, 5]}  # sums 6, 5, 4, 3, 2, 10


def test_a_shared_router_needs_one_plan_for_its_layers():
    with pytest.raises(ValueError, match=r"layers \['a', 'b'\] share one router"):
        prune_experts(_shared(), keep={"a": [0, 1, 2], "b": [0, 1, 3]})
    with pytest.raises(ValueError, match="share one router"):
        prune_experts(_shared(), keep={"a": [0, 1, 2]})
    with pytest.raises(ValueError, match="share one router"):
        merge_experts(_shared(), groups={"a": [[0, 1], [2, 3], [4, 5]], "b": [[0], [1, 2, 3], [4, 5]]})
    model = _shared()
    prune_experts(model, keep={"a": (0, 2, 4), "b": [0, 2, 4]})  # equal as lists
    assert model.a.num_experts == model.b.num_experts == model.a.router.num_experts == 3


def test_merging_identical_experts_of_layers_sharing_a_router_leaves_outputs_unchanged():
    model = _shared()
    with torch.no_grad():
        for moe in (model.a, model.b):
            for name in ("w_in", "w_out", "b_in", "b_out"):
                p = getattr(moe.experts, name)
                p.copy_(p[:1].expand_as(p))  # every expert a copy of expert 0 (per layer)
    x = torch.rand(10, D)
    want = model(x)
    stats = calibrate(model, batches())
    report = merge_experts(model, groups=2, stats=stats)
    assert report.groups["a"] == report.groups["b"] and report.kept["a"] == report.kept["b"]
    total = stats["a"].frequency + stats["b"].frequency
    for group, rep in zip(report.groups["a"], report.kept["a"]):
        assert rep == min(group, key=lambda e: (-float(total[e]), e))
    assert model.a.router.gate.weight.shape == (2, D) and model.b.num_experts == 2
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)


def test_the_omni_router_conformer_prunes_merges_and_reloads(tmp_path):
    """The speech Conformer with the Omni-Router (one router for all 4 MoE layers): prune, merge, save, replay."""

    def base():
        torch.manual_seed(0)
        return create_model("moe_conformer_debug", moe={"router": "omni", "num_experts": 4, "top_k": 1}).eval()

    model = base()
    data = [torch.randn(2, 60, 80) for _ in range(2)]
    pruned = prune_experts(model, keep=3, stats=calibrate(model, data))
    merged = merge_experts(model, groups=2, stats=calibrate(model, data))
    assert len({tuple(v) for v in pruned.kept.values()}) == 1 and len(pruned.kept) == 4
    routers = {id(m.router) for m in model.modules() if isinstance(m, MoE)}
    assert len(routers) == 1 and next(m for m in model.modules() if isinstance(m, MoE)).router.num_experts == 2
    torch.save(model.state_dict(), tmp_path / "model.pt")
    x = torch.randn(1, 50, 80)
    want = model(x)
    again = base()
    prune_experts(again, keep=pruned.kept)
    merge_experts(again, groups=merged.groups)
    again.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.testing.assert_close(again.eval()(x), want)
