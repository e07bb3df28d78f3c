"""The Fashion-MNIST router study: one config per router at equal active compute; the CPU-time budget."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from moezoo.bench.vision import VIT_VARIANTS, count_params, render
from moezoo.layers import MoE
from moezoo.models import create_model
from moezoo.tasks.vision.study import CPUTimeBudget

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vision"
ROUTER_KEYS = ("router", "router_kwargs", "dense")


def _model_kwargs(variant: str) -> dict:
    config = yaml.safe_load((CONFIGS / f"fmnist_vit_{variant}.yaml").read_text())
    return config["model"]["init_args"]["model_kwargs"]


def _flat(kwargs: dict) -> dict:
    """The model arguments and the MoE settings (``moe``) in one mapping, for comparing configs."""
    return {**{k: v for k, v in kwargs.items() if k != "moe"}, **kwargs.get("moe", {})}


def test_every_router_of_the_study_has_a_config_that_differs_only_in_routing():
    base = {k: v for k, v in _flat(_model_kwargs("topk")).items() if k not in ROUTER_KEYS}
    routers = set()
    for variant in VIT_VARIANTS:
        kwargs = _flat(_model_kwargs(variant))
        assert {k: v for k, v in kwargs.items() if k not in ROUTER_KEYS} == base, variant
        routers.add("dense" if kwargs.get("dense") else kwargs["router"])
    assert routers == {"topk", "expert_choice", "sinkhorn", "sigmoid_lossfree", "soft", "dense"}
    assert _flat(_model_kwargs("bpr"))["router_kwargs"]["drop_policy"] == "batch_priority"


def test_the_study_is_at_equal_active_compute():
    models = {v: create_model("moe_vit_tiny", **_model_kwargs(v)) for v in VIT_VARIANTS}
    dense_active = count_params(models["dense"])[1]
    tokens = (28 // 4) ** 2 + 1
    for variant, model in models.items():
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        if variant == "dense":
            continue
        assert len(moes) == 2
        for moe in moes:
            assert moe.active_ffn_dim == 2 * 128
            if moe.router.kind == "soft":  # E * S slot passes per image vs K * L token passes for top-2
                slots = moe.num_experts * moe.router.slots_per_expert
                assert abs(slots - 2 * tokens) / (2 * tokens) < 0.05
        if variant != "soft":  # the routers' gates (and bias buffers) are the only extra active weights
            gates = sum(m.router.gate.weight.numel() for m in moes)
            assert count_params(model)[1] - dense_active == pytest.approx(gates, abs=2)


def test_cpu_time_budget_stops_training_and_rejects_bad_budgets():
    budget = CPUTimeBudget(max_cpu_minutes=0.001)  # 60 ms
    trainer = SimpleNamespace(should_stop=False, global_step=1)
    budget.on_train_start(trainer, None)
    budget.on_train_batch_end(trainer, None)
    assert not trainer.should_stop
    start = time.process_time()
    while time.process_time() - start < 0.1:
        sum(range(1000))
    budget.on_train_batch_end(trainer, None)
    assert trainer.should_stop
    with pytest.raises(ValueError, match="max_cpu_minutes"):
        CPUTimeBudget(0)


def test_bench_table_reports_mean_and_std_over_seeds():
    runs = {
        "topk": [dict(acc=0.8, active_params=10, total_params=20), dict(acc=0.9, active_params=10, total_params=20)]
    }
    table = render("t", runs, [("acc", "test acc")])
    assert f"0.850 +- {math.sqrt(0.005):.3f}" in table and "10 / 20" in table


def test_router_table_json_carries_seed_averaged_load_and_specialisation(tmp_path):
    import json

    from moezoo.bench.tables import validate
    from moezoo.bench.vision import FULL, _write_json

    def run(acc, load, share):
        spec = {"by": "class", "layer": 3, "groups": ["a", "b"], "share": share}
        routing = {"expert_load": load, "specialisation": spec} if load else {}
        base = dict(test_acc=acc, train_img_s=1.0, train_img_cpu_s=1.0, dropped_frac=0.0, steps=5)
        return {**base, "expert_load_cv": 0.1 if load else math.nan, "total_params": 20, "active_params": 10,
                "routing": routing}  # fmt: skip

    results = {
        "topk": [run(0.8, [[0.2, 0.8]], [[1.0, 0.0], [0.5, 0.5]]), run(0.9, [[0.4, 0.6]], [[0.0, 1.0], [0.5, 0.5]])],
        "dense": [run(0.7, None, None), run(0.7, None, None)],
    }
    path = tmp_path / "vision.json"
    _write_json(path, "full", FULL, results)
    data = json.loads(path.read_text())
    assert validate(data, "vision") == []
    topk, dense = data["rows"]
    assert topk["expert_load"][0] == pytest.approx([0.3, 0.7])
    assert topk["specialisation"]["share"] == [[0.5, 0.5], [0.5, 0.5]] and topk["specialisation"]["by"] == "class"
    assert dense["expert_load"] is None and dense["specialisation"] is None and dense["expert_load_cv"] is None
