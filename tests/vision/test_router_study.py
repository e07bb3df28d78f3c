"""The Fashion-MNIST router study: one config per router at equal active compute, ``moezoo bench vision`` through
``moezoo fit`` of those configs, and the CPU-time budget."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from moezoo.layers import MoE
from moezoo.models import create_model
from moezoo.stats import count_parameters
from moezoo.tasks.bench import vision
from moezoo.tasks.bench.schema import validate
from moezoo.tasks.vision.data import FASHION_MNIST_CLASSES
from moezoo.tasks.vision.study import CPUTimeBudget

VIT_VARIANTS = vision.ROUTERS

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
    dense_active = count_parameters(models["dense"]).active
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
            assert count_parameters(model).active - dense_active == pytest.approx(gates, abs=2)


@pytest.mark.parametrize("variant", vision.EXTRA_ROUTERS)
def test_every_extra_router_has_a_config_at_equal_active_compute(variant):
    """``moezoo.layers.routers_extra``: same ViT, data and schedule as top-k; only the router and its options differ;
    two MoE blocks of 2 x 128 active FFN width (top-p caps at 2; GW-MoE broadcasts extra pairs in training only);
    the model builds and runs; and the variant is selectable but not in the default budgets."""
    base = {k: v for k, v in _flat(_model_kwargs("topk")).items() if k not in ROUTER_KEYS}
    kwargs = _flat(_model_kwargs(variant))
    # SMEAR's one merged expert has one expert's width: it is the one router at top-1's compute (its config says so)
    top_k = 1 if variant == "smear" else 2
    assert {k: v for k, v in kwargs.items() if k not in ROUTER_KEYS} == {**base, "top_k": top_k}
    assert kwargs["router"] == variant
    model = create_model("moe_vit_tiny", **_model_kwargs(variant)).eval()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 2 and all(m.active_ffn_dim == top_k * 128 and m.router.top_k == top_k for m in moes)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert vision.SPEC.variant(variant).config == f"configs/vision/fmnist_vit_{variant}.yaml"
    assert variant not in vision.SPEC.quick.variants and variant not in vision.SPEC.full.variants


def test_every_registered_router_is_a_row_or_left_out_with_a_reason(capsys):
    """The study's rows are listed by hand: every registered router is a row (with its config) or in
    ``NOT_IN_STUDY`` with the reason, never both, and ``--variants <left-out router>`` prints that reason."""
    from moezoo.layers import ROUTERS as REGISTERED

    rows = {v.router for v in vision.VARIANTS if v.router != "dense"} - set(vision.EXTRA_LAYERS)
    assert rows.isdisjoint(vision.NOT_IN_STUDY)
    assert rows | set(vision.NOT_IN_STUDY) == set(REGISTERED) | {"bpr"}  # bpr: top-k's batch-priority row
    root = CONFIGS.parents[1]
    assert all((root / v.config).is_file() for v in vision.VARIANTS)
    for router in set(vision.NOT_IN_STUDY) - {"segment"}:  # the side-input routers: the ViT refuses them
        with pytest.raises(ValueError, match="side input"):
            create_model("moe_vit_tiny", **{**_model_kwargs("topk"), "moe": {"router": router}})
    with pytest.raises(SystemExit):
        vision.main(["--variants", "topk,segment"])
    err = capsys.readouterr().err
    assert "'segment' is left out on purpose: Seg-MoE at segment size 1 is token-wise top-k" in err


def test_omni_config_shares_one_router_and_relu_config_targets_two_experts_per_token():
    """``omni``: both MoE blocks route with one router instance (one gate's parameters fewer than top-k);
    ``relu``: the adaptive L1 aims at sparsity 1 - 2/8, i.e. 2 of 8 experts per token on average."""
    omni = create_model("moe_vit_tiny", **_model_kwargs("omni"))
    moes = [m for m in omni.modules() if isinstance(m, MoE)]
    assert len(moes) == 2 and moes[0].router is moes[1].router is omni.shared_router
    topk = create_model("moe_vit_tiny", **_model_kwargs("topk"))
    assert count_parameters(topk).total - count_parameters(omni).total == 8 * 64
    relu = create_model("moe_vit_tiny", **_model_kwargs("relu"))
    routers = [m.router for m in relu.modules() if isinstance(m, MoE)]
    assert len(routers) == 2 and all(r.target_sparsity == 1 - 2 / 8 for r in routers)


def test_chain_of_experts_config_is_top_k_in_two_passes_at_equal_active_compute():
    """Chain-of-Experts is a layer option, not a router: top-k's config with ``top_k: 1`` and two passes
    (``num_iterations: 2``, inner residual), so 2 x 128 active as top-2; each block's MoE is one ChainOfExperts with
    a router per pass, and the variant is selectable but not in the default budgets."""
    from moezoo.layers import ChainOfExperts

    base = _flat(_model_kwargs("topk"))
    kwargs = _flat(_model_kwargs("chain"))
    assert kwargs == {**base, "top_k": 1, "num_iterations": 2, "inner_residual": True}
    model = create_model("moe_vit_tiny", **_model_kwargs("chain")).eval()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 2 and all(isinstance(m, ChainOfExperts) and len(m.routers) == 2 for m in moes)
    assert all(m.active_ffn_dim == 2 * 128 for m in moes)
    topk = create_model("moe_vit_tiny", **_model_kwargs("topk"))
    extra = sum(p.numel() for m in moes for r in m.chain_routers for p in r.parameters())  # a router per pass
    assert extra == 2 * 8 * 64 and count_parameters(model).active - count_parameters(topk).active == extra
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert vision.SPEC.variant("chain").config == "configs/vision/fmnist_vit_chain.yaml"
    assert "chain" not in vision.SPEC.quick.variants and "chain" not in vision.SPEC.full.variants


@pytest.mark.parametrize("variant", ["s2moe", "cartesian"])
def test_layer_option_configs_are_top_k_plus_the_layer_at_equal_active_compute(variant):
    """S2MoE and CartesianMoE are layer options (``moe.layer``), not routers: top-k's config plus ``layer`` and its
    ``layer_kwargs``; each MoE block is one such layer at top-2's active width (CartesianMoE: two sub-layers of 64-wide
    experts, top-2 each; S2MoE at evaluation: one top-2 pass); selectable, not in the default budgets."""
    from moezoo.layers import MOE_LAYERS

    base = _flat(_model_kwargs("topk"))
    kwargs = _flat(_model_kwargs(variant))
    assert {k: v for k, v in kwargs.items() if k != "layer_kwargs"} == {**base, "layer": variant}
    model = create_model("moe_vit_tiny", **_model_kwargs(variant)).eval()
    layers = [m for m in model.modules() if isinstance(m, MOE_LAYERS[variant])]
    assert len(layers) == 2 and all(m.active_ffn_dim == 2 * 128 for m in layers)
    topk = create_model("moe_vit_tiny", **_model_kwargs("topk"))
    routed = [count_parameters(m).components["routed_experts"] for m in (model, topk)]
    assert routed[0] == routed[1]  # same expert parameters, total and active
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert (
        variant in vision.EXTRA_LAYERS
        and vision.SPEC.variant(variant).config == f"configs/vision/fmnist_vit_{variant}.yaml"
    )
    assert variant not in vision.SPEC.quick.variants and variant not in vision.SPEC.full.variants


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


@pytest.mark.slow
def test_bench_fits_the_study_configs(tmp_path: Path) -> None:
    """Slow tier (Fashion-MNIST per run): two routers, two steps, through ``moezoo fit`` of the study's configs."""
    path = tmp_path / "vision.json"
    args = ["--quick", "--seeds", "0", "--variants", "soft,dense", "--trainer.max_steps", "2"]
    assert vision.main([*args, "--trainer.limit_test_batches", "2", "--json", str(path), "--out", str(tmp_path)]) == 0
    data = json.loads(path.read_text())
    assert validate(data, "vision") == [] and data["settings"] == "custom"
    soft, dense = data["rows"]
    runs = {r["variant"]: r for r in data["runs"]}
    assert runs["soft"]["command"] == (
        "moezoo fit --config configs/vision/fmnist_vit_soft.yaml --seed_everything 0 --trainer.max_steps 2 "
        "--trainer.max_epochs -1 --data.init_args.batch_size 64 --trainer.limit_val_batches 0 "
        "--trainer.limit_test_batches 2"
    )
    assert soft["metric"] == runs["soft"]["metrics"]["test/acc"] and soft["infer_throughput"] > 0
    assert soft["active_params"] == soft["total_params"], "Soft MoE: every expert reaches every token"
    assert soft["expert_load_cv"] == 0.0 and soft["specialisation"] is None  # slots: uniform load, no pairs
    assert dense["router"] == "dense" and dense["expert_load"] is None
    routing = json.loads(Path(runs["soft"]["routing"]["file"]).read_text())
    assert routing["groups"] == list(FASHION_MNIST_CLASSES) and len(routing["layers"]) == 2
