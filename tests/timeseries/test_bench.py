"""``moezoo bench timeseries`` end to end on ETTh1 at tiny settings: ``moezoo fit`` of the benchmark configs at a
horizon of the command line, routing per channel; the baselines as variants (their recipes, one epoch without
parameters, their rows and Markdown). (Rows as means over horizons: tests/bench/test_suite.py.)"""

from __future__ import annotations

import json
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
