"""``moezoo bench timeseries`` end to end on ETTh1 at tiny settings: ``moezoo fit`` of the benchmark configs at a
horizon of the command line, routing per channel; the baselines as variants (their recipes, one epoch without
parameters, their rows and Markdown). (Rows as means over horizons: tests/bench/test_suite.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from moezoo.tasks.bench import timeseries as bench
from moezoo.tasks.bench.schema import validate
from moezoo.tasks.bench.suite import bench_rows, markdown, parse_args, run_specs

ROOT = Path(__file__).resolve().parents[2]
ETTH1 = ROOT / ".." / "shared" / "data" / "ett" / "ETTh1.csv"
TINY = ["--quick", "--seeds", "0", "--horizons", "12", "--trainer.max_epochs", "1", "--data.init_args.seq_len", "48",
        "--data.init_args.train_stride", "200",
        "--data.init_args.val_stride", "100", "--trainer.limit_test_batches", "2", "--data.init_args.path",
        str(ETTH1)]  # fmt: skip


BASELINES = ("last_value", "seasonal_naive", "nlinear", "dlinear", "patchtst")


def test_quick_and_full_budgets() -> None:
    _, quick, name = parse_args(bench.SPEC, ["--quick"])
    assert name == "quick" and quick.cells == ("96",) and quick.seeds == (0, 1) and "3" in quick.overrides
    assert quick.variants == ("dense", "moe", "segmoe", "last_value", "seasonal_naive", "nlinear", "dlinear")
    _, full, name = parse_args(bench.SPEC, ["--full"])
    assert name == "full" and full.cells == ("96", "192", "336", "720") and full.seeds == (0, 1, 2)
    assert full.variants == ("dense", "moe", "segmoe", *BASELINES) and full.overrides == ()
    assert bench.horizon_overrides("192") == ("--data.init_args.pred_len", "192")  # the model's follows the data


@pytest.mark.skipif(not ETTH1.is_file(), reason=f"{ETTH1} not present")
def test_rows_average_horizons_and_route_by_channel(tmp_path: Path) -> None:
    path = tmp_path / "ts.json"
    assert bench.main([*TINY, "--variants", "dense,segmoe", "--json", str(path), "--out", str(tmp_path / "r")]) == 0
    data = json.loads(path.read_text())
    assert validate(data, "timeseries") == [] and data["settings"] == "custom" and len(data["runs"]) == 2
    run = next(r for r in data["runs"] if r["variant"] == "segmoe" and r["cell"] == "12")
    assert run["command"].startswith(
        "moezoo fit --config configs/bench/timeseries/etth1_segmoe.yaml --seed_everything 0"
    )
    assert run["command"].endswith("--data.init_args.pred_len 12")
    dense, seg = data["rows"]
    for row in (dense, seg):
        (run,) = [r for r in data["runs"] if r["variant"] == row["extra"]["variant"]]
        assert row["metric"] == run["metrics"]["test/mse"] == row["extra"]["cells"]["12"]["metric"]
        assert row["extra"]["mae"] == run["metrics"]["test/mae"] and row["total_params"] == run["params"]["total"]
    assert dense["active_params"] == dense["total_params"] and seg["active_params"] < seg["total_params"]
    assert (dense["router"], seg["router"]) == ("dense", "segment") and seg["dropped_frac"] == 0.0
    assert len(seg["expert_load"]) == 3 and all(sum(layer) == pytest.approx(1.0) for layer in seg["expert_load"])
    spec = seg["specialisation"]
    assert spec["by"] == "channel" and spec["groups"] == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert all(sum(share) == pytest.approx(1.0) for share in spec["share"])


def _yaml(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def test_baselines_are_variants_with_their_recipes() -> None:
    """Every baseline is a ``baseline`` row whose bench config is the model and optimiser recipe of its
    ``configs/timeseries/etth1_<name>_336_96.yaml`` on the MoE rows' windows."""
    assert [v.name for v in bench.VARIANTS if v.router == "baseline"] == list(BASELINES)
    moe_data = _yaml("configs/bench/timeseries/etth1_segmoe.yaml")["data"]["init_args"]
    for name in BASELINES:
        variant = bench.SPEC.variant(name)
        bench_cfg, recipe = _yaml(variant.config), _yaml(f"configs/timeseries/etth1_{name}_336_96.yaml")
        model, own = bench_cfg["model"]["init_args"], recipe["model"]["init_args"]
        assert model["model"] == own["model"] and model.get("model_kwargs") == own.get("model_kwargs")
        for key in ("optimizer", "lr_scheduler"):
            assert model.get(key) == own.get(key), f"{name}: {key}"
        data = bench_cfg["data"]["init_args"]
        assert data["batch_size"] == recipe["data"]["init_args"]["batch_size"]
        assert (data["train_stride"], data["val_stride"]) == (moe_data["train_stride"], moe_data["val_stride"])
        assert all(data[k] == moe_data[k] for k in ("path", "seq_len", "pred_len", "features", "target"))
    assert bench.PARAMETER_FREE == ("last_value", "seasonal_naive")


def test_parameter_free_baselines_run_one_epoch_whatever_the_budget() -> None:
    for argv in (["--quick"], ["--full"], ["--quick", "--trainer.max_epochs", "7"]):
        _, budget, _ = parse_args(bench.SPEC, [*argv, "--variants", "last_value,dlinear,dense"])
        runs = {r.variant: r for r in run_specs(bench.SPEC, budget) if r.seed == 0}
        epochs = {name: runs[name].overrides[runs[name].overrides.index("--trainer.max_epochs") + 1]
                  if "--trainer.max_epochs" in runs[name].overrides else None for name in runs}  # fmt: skip
        assert epochs["last_value"] == "1"
        assert epochs["dlinear"] == epochs["dense"] == {"--quick": "3", "--full": None}.get(argv[-1], "7")
    assert "--trainer.max_epochs 1" in runs["last_value"].command()


def _record(variant: str, seed: int, mse: float, params: int, routed: bool) -> dict:
    routing = {"file": "f", "expert_load_cv": 0.2, "dropped_frac": 0.0, "router_entropy": 1.0,
               "expert_load": [[0.5, 0.5]], "specialisation": None}  # fmt: skip
    return {"variant": variant, "seed": seed, "cell": "96", "command": f"moezoo fit {variant}", "model": f"{variant}_m",
            "metrics": {"test/mse": mse, "test/mae": mse / 2}, "routing": routing if routed else None,
            "params": {"total": params, "active": params}, "train_throughput": 100.0, "train_cpu_throughput": 50.0,
            "infer_throughput": 1000.0, "infer_cpu_throughput": 500.0, "extra": {}}  # fmt: skip


def test_baseline_rows_and_markdown() -> None:
    runs = [_record("dense", s, 0.40 + s / 100, 100, False) for s in (0, 1)]
    runs += [_record("segmoe", s, 0.39, 200, True) for s in (0, 1)]
    runs += [_record("last_value", s, 1.29, 0, False) for s in (0, 1)]
    runs += [_record("dlinear", s, 0.38, 64, False) for s in (0, 1)]
    rows = {r.extra["variant"]: r for r in bench_rows(bench.SPEC, runs)}
    assert [r.router for r in rows.values()] == ["dense", "segment", "baseline", "baseline"]
    assert rows["segmoe"].expert_load_cv == 0.2 and rows["dlinear"].expert_load_cv is None
    assert rows["dlinear"].expert_load is None and rows["last_value"].extra["router_entropy"] is None
    # nothing trained without parameters: no training throughput; a trained baseline keeps its own
    assert rows["last_value"].train_throughput is None and rows["last_value"].extra["train_throughput"] is None
    assert rows["dlinear"].train_throughput == 50.0  # the tables show items per CPU second
    assert rows["dense"].extra["mse_std"] == pytest.approx(0.01 * 2**0.5 / 2)
    text = markdown(bench.SPEC, list(rows.values()))
    assert "| last_value (baseline) | 1.2900 ± 0.0000 | 0.6450 ± 0.0000 | 0.000M / 0.000M | - | 500.0 | - | - |" in text
    assert "| dlinear (baseline) | 0.3800 ± 0.0000 |" in text and "| segmoe | 0.3900 ± 0.0000 |" in text


@pytest.mark.skipif(not ETTH1.is_file(), reason=f"{ETTH1} not present")
def test_baselines_run_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "ts.json"
    argv = [*TINY, "--variants", "last_value,dlinear", "--json", str(path), "--out", str(tmp_path / "r")]
    assert bench.main(argv) == 0
    data = json.loads(path.read_text())
    assert validate(data, "timeseries") == []
    free, linear = data["rows"]
    assert (free["model"], linear["model"]) == ("last_value_base", "dlinear_base")
    assert free["router"] == linear["router"] == "baseline" and free["total_params"] == 0
    assert free["train_throughput"] is None  # (the tiny DLinear run is too short for the meter either)
    assert free["expert_load"] is None and linear["expert_load_cv"] is None
    runs = {r["variant"]: r for r in data["runs"]}
    assert "--trainer.max_epochs 1 " in runs["last_value"]["command"]
    assert 0 < linear["metric"] < free["metric"]


# -- the router study's variants (issue 19) --------------------------------------------------------------------------
def _router_moe(variant: str) -> dict:
    """The MoE spec a router variant's override sets (the value of ``--model.init_args.model_kwargs.moe``)."""
    overrides = bench.SPEC.variant(variant).overrides
    assert overrides[0] == "--model.init_args.model_kwargs.moe" and len(overrides) == 2
    return json.loads(overrides[1])


def test_every_registered_router_is_a_variant_or_refused_with_a_reason() -> None:
    """No router is skipped silently: each is a ``moe_<router>`` variant on etth1_moe.yaml, or named in
    ``UNSUPPORTED_ROUTERS``, whose routers the model indeed refuses (a side input it lacks)."""
    from moezoo.layers import ROUTERS
    from moezoo.models import create_model

    variants = {v.name for v in bench.ROUTER_VARIANTS}
    assert variants == {f"moe_{r}" for r in ROUTERS} - {f"moe_{r}" for r in bench.UNSUPPORTED_ROUTERS}
    assert set(bench.UNSUPPORTED_ROUTERS) == {"language", "global_embedding", "promoe"}
    for router in bench.UNSUPPORTED_ROUTERS:
        with pytest.raises(ValueError, match="side input"):
            create_model("moe_patchtst_tiny", moe={"router": router, "segment_sizes": 1})
    for variant in bench.ROUTER_VARIANTS:
        router = variant.name.removeprefix("moe_")
        assert variant.config == "configs/bench/timeseries/etth1_moe.yaml" and variant.router == router
        assert _router_moe(variant.name) == {"router": router, "segment_sizes": 1, **(
            {"router_kwargs": bench.ROUTER_KWARGS[router]} if router in bench.ROUTER_KWARGS else {})}  # fmt: skip
    # selectable, not in the default budgets
    _, budget, _ = parse_args(bench.SPEC, ["--full", "--variants", "moe_topk,moe_soft"])
    assert budget.variants == ("moe_topk", "moe_soft") and budget.seeds == (0, 1, 2)
    assert not variants & (set(bench.SPEC.quick.variants) | set(bench.SPEC.full.variants))


def test_unsupported_routers_are_refused_by_name_with_their_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """``--variants moe_<router>`` of a router without a variant says why, as the vision study does for its routers
    outside the study."""
    for router, why in bench.UNSUPPORTED_ROUTERS.items():
        with pytest.raises(SystemExit):
            bench.main(["--variants", f"moe_topk,moe_{router}"])
        err = capsys.readouterr().err
        assert f"['moe_{router}'] are not variants" in err and f"'moe_{router}' is left out on purpose: {why}" in err
    with pytest.raises(SystemExit):
        bench.main(["--variants", "moe_nonexistent"])
    assert "left out on purpose" not in capsys.readouterr().err  # an unknown name: only the list of variants


def test_router_variants_are_etth1_moe_with_only_the_router_changed_at_equal_active_compute() -> None:
    """Through the CLI as ``moezoo fit`` builds them: the config's model with the variant's router; every variant's
    active parameters are top-k's but for the router's own weights (one MoE per block, top-1 of 4 experts of 64
    plus the shared expert), Soft MoE's expert passes per series (4 x 10 slots) at most top-1's (42 tokens), and the
    model runs."""
    import torch

    from moezoo.layers import MoE
    from moezoo.layers.segment import SegmentMoE
    from moezoo.stats import count_parameters
    from moezoo.tasks.cli import cli_main

    def build(variant: str) -> torch.nn.Module:
        spec = bench.SPEC.variant(variant)
        cli = cli_main(["--config", str(ROOT / spec.config), *spec.overrides], run=False)
        return cli.model.model

    base = _yaml("configs/bench/timeseries/etth1_moe.yaml")["model"]["init_args"]
    assert base["model"] == "moe_patchtst_tiny" and base["model_kwargs"] == {"moe": {"segment_sizes": 1}}
    topk = build("moe_topk")
    topk_router = sum(p.numel() for m in topk.modules() if isinstance(m, MoE) for p in m.router.parameters())
    x = torch.randn(2, 336, 7)
    for variant in ("moe_topk", "moe_soft", "moe_segment", "moe_xmoe", "moe_expert_choice", "moe_moec"):
        model = build(variant).eval()
        router = variant.removeprefix("moe_")
        assert model.spec.router == router and (model.spec.num_experts, model.spec.top_k) == (4, 1)
        moes = [m for m in model.modules() if isinstance(m, (MoE, SegmentMoE))]
        assert len(moes) == 3 and all(m.num_experts == 4 for m in moes)
        if router == "soft":
            assert all(4 * m.router.slots_per_expert <= model.num_patches == 42 for m in moes)
        if router not in ("segment", "soft"):  # Soft MoE: every expert runs (on 40 slots), so all are "active"
            own = sum(p.numel() for m in moes for p in m.router.parameters())
            assert count_parameters(model).active - own == count_parameters(topk).active - topk_router, variant
        assert model(x).shape == (2, 96, 7)


@pytest.mark.skipif(not ETTH1.is_file(), reason=f"{ETTH1} not present")
def test_moec_variant_fits_with_its_cluster_dropout(tmp_path: Path) -> None:
    """``moe_moec`` (4 experts in 2 clusters of 2, top-1, expert dropout in training) through ``moezoo fit``."""
    path = tmp_path / "ts.json"
    assert bench.main([*TINY, "--variants", "moe_moec", "--json", str(path), "--out", str(tmp_path)]) == 0
    data = json.loads(path.read_text())
    assert validate(data, "timeseries") == [] and len(data["runs"]) == 1
    (run,) = data["runs"]
    assert run["variant"] == "moe_moec" and '"router": "moec"' in run["command"]
    assert math.isfinite(run["metrics"]["test/mse"]) and run["metrics"]["test/mse"] > 0
    assert run["routing"]["router_entropy"] > 0


@pytest.mark.skipif(not ETTH1.is_file(), reason=f"{ETTH1} not present")
def test_router_variants_run_through_fit_and_the_study_table_reads_them(tmp_path: Path) -> None:
    from moezoo.tasks.bench import router_study

    path = tmp_path / "ts.json"
    argv = [*TINY, "--seeds", "0,1", "--variants", "moe_topk,moe_soft", "--json", str(path), "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    data = json.loads(path.read_text())
    assert validate(data, "timeseries") == [] and len(data["runs"]) == 4
    soft = next(r for r in data["runs"] if r["variant"] == "moe_soft")
    assert soft["command"].endswith(
        """--model.init_args.model_kwargs.moe '{"router": "soft", "router_kwargs": {"slots_per_expert": 10}, """
        """"segment_sizes": 1}'"""
    )
    assert soft["routing"]["router_entropy"] > 0
    out = tmp_path / "study.md"
    assert router_study.main([str(path), "--out", str(out)]) == 0
    table = out.read_text()
    assert "| moe_topk | topk | 0,1 |" in table and "| moe_soft | soft | 0,1 |" in table
    assert "(reference)" in table and "not judged" not in table
