"""``moezoo bench generation``: the DiT table of ``moezoo bench vision`` in the tables format, at tiny settings."""

from __future__ import annotations

import json
import statistics

import pytest

from moezoo.bench import generation
from moezoo.bench.tables import validate
from moezoo.bench.vision import load_config
from moezoo.layers import MoE
from moezoo.models import create_model
from moezoo.tasks.vision.data import FASHION_MNIST_CLASSES

TINY = ["--steps", "2", "--batch-size", "4", "--eval-samples", "10", "--sampling-steps", "2", "--seeds", "0"]


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("generation") / "generation.json"
    assert generation.main([*TINY, "--variants", "dense,topk", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_json_is_in_the_tables_format_with_the_raw_runs(tiny_json: dict) -> None:
    data = tiny_json
    assert validate(data, "generation") == []
    assert (data["domain"], data["metric"], data["higher_is_better"], data["settings"]) == (
        "generation", "fd_fmnist", False, "custom"
    )  # fmt: skip
    assert [(r["variant"], r["seed"]) for r in data["runs"]] == [("dense", 0), ("topk", 0)]
    for run in data["runs"]:
        assert {"fd_fmnist", "sample_acc", "routing_purity", "train_img_s", "sample_img_s", "routing"} <= set(run)
        assert (run["steps"], run["batch_size"], run["eval_samples"], run["sampling_steps"]) == (2, 4, 10, 2)
    rows = {r["router"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "topk"] and {r["model"] for r in rows.values()} == {"moe_dit_tiny"}
    for router, row in rows.items():
        (run,) = [r for r in data["runs"] if r["variant"] == router]
        assert row["metric"] == run["fd_fmnist"] and row["extra"]["sample_acc"] == run["sample_acc"]
        assert row["train_throughput"] == run["train_img_s"] and row["infer_throughput"] == run["sample_img_s"]
    dense, topk = rows["dense"], rows["topk"]
    assert dense["active_params"] == dense["total_params"]
    assert topk["active_params"] < topk["total_params"]
    assert abs(topk["active_params"] - dense["active_params"]) / dense["active_params"] < 0.01, "equal active width"
    assert dense["expert_load"] is dense["specialisation"] is dense["expert_load_cv"] is dense["dropped_frac"] is None


def test_moe_row_routing_statistics(tiny_json: dict) -> None:
    topk = next(r for r in tiny_json["rows"] if r["router"] == "topk")
    init = load_config("dit_fmnist_topk")["model"]["init_args"]
    moes = [m for m in create_model(init["model"], **init["model_kwargs"]).modules() if isinstance(m, MoE)]
    assert len(topk["expert_load"]) == len(moes) > 0
    for share in topk["expert_load"]:
        assert len(share) == moes[0].num_experts and sum(share) == pytest.approx(1.0)
    cv = statistics.fmean(statistics.pstdev(s) / statistics.fmean(s) for s in topk["expert_load"])
    assert topk["expert_load_cv"] == pytest.approx(cv, rel=1e-6)
    assert topk["dropped_frac"] == 0.0, "dropless top-k drops nothing"
    spec = topk["specialisation"]
    assert spec["by"] == "class" and spec["groups"] == list(FASHION_MNIST_CLASSES) and spec["layer"] == len(moes) - 1
    assert all(sum(s) == pytest.approx(1.0) for s in spec["share"])
    assert 0 < topk["extra"]["routing_purity"] <= 1


def test_settings_names_and_argument_checks() -> None:
    assert generation.parse_args(["--quick"])[2] == "quick" and generation.parse_args([])[2] == "quick"
    args, settings, name = generation.parse_args(["--full", "--seeds", "5"])
    assert name == "full" and settings.seeds == (5,) and settings.dit_steps == 1000
    assert generation.parse_args(["--steps", "3"])[2] == "custom"
    for bad in (["--quick", "--full"], ["--variants", "soft"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            generation.parse_args(bad)
