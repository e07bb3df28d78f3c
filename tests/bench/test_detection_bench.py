"""``moezoo bench detection`` end to end at tiny settings: ``moezoo fit`` of the benchmark configs, the tables format,
the routing read from the routing-analytics files; the benchmark recipe lives in its configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moezoo.tasks.bench import detection
from moezoo.tasks.bench.schema import validate

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--quick", "--seeds", "0", "--trainer.max_steps", "4", "--data.init_args.batch_size", "4",
        "--data.init_args.num_train", "16", "--data.init_args.num_val", "4",
        "--data.init_args.num_test", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("detection")
    path = folder / "detection.json"
    assert detection.main([*TINY, "--variants", "dense,moe2", "--json", str(path), "--out", str(folder / "runs")]) == 0
    return json.loads(path.read_text())


def test_rows_come_from_the_fitted_runs(tiny: dict) -> None:
    assert validate(tiny, "detection") == []
    assert (tiny["domain"], tiny["metric"], tiny["higher_is_better"], tiny["settings"]) == (
        "detection", "map", True, "custom"
    )  # fmt: skip
    runs = {r["variant"]: r for r in tiny["runs"]}
    assert runs["moe2"]["command"] == (
        "moezoo fit --config configs/bench/detection/canvas_moe2.yaml --seed_everything 0 --model.init_args.model "
        "moe_yolo_debug --trainer.max_steps 4 --data.init_args.batch_size 4 --data.init_args.num_train 16 "
        "--data.init_args.num_test 8 --model.init_args.optimizer.init_args.lr 0.003 --trainer.limit_val_batches 0 "
        "--data.init_args.num_val 4"
    )
    dense, moe = tiny["rows"]
    for row, run in ((dense, runs["dense"]), (moe, runs["moe2"])):
        assert run["global_step"] == 4 and run["model"] == row["model"] == "moe_yolo_debug"
        assert row["metric"] == run["metrics"]["test/mAP_clean"]
        assert row["extra"]["mAP50_degraded"] == run["metrics"]["test/mAP50_degraded"]
        assert row["active_params"] == row["total_params"] == run["params"]["total"]  # every expert runs
        assert row["extra"]["mflops_per_image"] > 0 and row["infer_throughput"] > 0
        # the table shows items per CPU second (4 steps, 3 of warm-up); the wall figures stay in the run and extra
        assert row["train_throughput"] == pytest.approx(run["train_cpu_throughput"])
        assert row["infer_throughput"] == pytest.approx(run["infer_cpu_throughput"])
        assert row["extra"]["train_throughput"] == pytest.approx(run["train_throughput"])
    assert moe["extra"]["mflops_per_image"] > 1.9 * dense["extra"]["mflops_per_image"]
    assert dense["expert_load"] is dense["specialisation"] is dense["expert_load_cv"] is None


def test_mixture_routing_is_the_callbacks_test_file(tiny: dict) -> None:
    moe = tiny["rows"][1]
    run = next(r for r in tiny["runs"] if r["variant"] == "moe2")
    written = json.loads(Path(run["routing"]["file"]).read_text())
    assert written["stage"] == "test" and written["global_step"] == 4
    assert moe["expert_load"] == written["expert_load"] and moe["specialisation"] == written["specialisation"]
    assert len(moe["expert_load"]) == 3 and all(sum(s) == pytest.approx(1.0) for s in moe["expert_load"])
    spec = moe["specialisation"]
    assert spec["by"] == "domain" and spec["groups"] == ["clean", "degraded"] and spec["layer"] == 2
    assert moe["dropped_frac"] == 0.0 and moe["expert_load_cv"] == written["expert_load_cv"]


def test_the_recipe_is_in_the_configs(tiny: dict) -> None:
    """Clipping, the schedule's floor and warmup are config values, and the fitted run used them."""
    for name in detection.NAMES:
        config = yaml.safe_load((ROOT / f"configs/bench/detection/canvas_{name}.yaml").read_text())
        init = config["model"]["init_args"]
        sched, opt = init["lr_scheduler"]["init_args"], init["optimizer"]["init_args"]
        assert config["trainer"]["gradient_clip_val"] == 10.0 and config["trainer"]["max_steps"] == 1000
        recipe = (sched["min_lr_ratio"], sched["warmup_frac"], opt["lr"], init["aux_loss_coef"])
        assert recipe == (0.05, 0.0334, 2e-3, 1)
        assert int(sched["warmup_frac"] * 1000) == 1000 // 30 and int(sched["warmup_frac"] * 150) == 150 // 30
    run = tiny["runs"][0]
    used = yaml.safe_load((Path(run["log_dir"]) / "config.yaml").read_text())
    assert used["trainer"]["gradient_clip_val"] == 10.0
    assert used["model"]["init_args"]["lr_scheduler"]["init_args"]["min_lr_ratio"] == 0.05
