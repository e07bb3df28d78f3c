"""``moezoo bench generation`` end to end at tiny settings: ``moezoo fit`` of the DiT configs, the tables format.

Slow tier: about 30 CPU seconds (Fashion-MNIST, and the FD reference statistics of its 10k test images, per run).
"""

from __future__ import annotations

import json
import statistics

import pytest

from moezoo.tasks.bench import generation
from moezoo.tasks.bench.schema import validate
from moezoo.tasks.vision.data import FASHION_MNIST_CLASSES

pytestmark = pytest.mark.slow
TINY = ["--quick", "--seeds", "0", "--trainer.max_steps", "2", "--data.init_args.batch_size", "8",
        "--model.init_args.eval_num_samples", "10", "--model.init_args.num_sampling_steps", "2",
        "--trainer.limit_test_batches", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("generation")
    path = folder / "generation.json"
    assert generation.main([*TINY, "--variants", "dense,topk", "--json", str(path), "--out", str(folder / "r")]) == 0
    return json.loads(path.read_text())


def test_rows_come_from_the_fitted_runs(tiny: dict) -> None:
    assert validate(tiny, "generation") == []
    assert (tiny["domain"], tiny["metric"], tiny["higher_is_better"], tiny["settings"]) == (
        "generation", "fd_fmnist", False, "custom"
    )  # fmt: skip
    runs = {r["variant"]: r for r in tiny["runs"]}
    assert runs["topk"]["command"].startswith(
        "moezoo fit --config configs/vision/dit_fmnist_topk.yaml --seed_everything 0"
    )
    dense, topk = tiny["rows"]
    for row, run in ((dense, runs["dense"]), (topk, runs["topk"])):
        assert run["global_step"] == 2 and row["model"] == "moe_dit_tiny"
        assert row["metric"] == run["metrics"]["test/fd_fmnist"] > 0
        assert row["extra"]["sample_acc"] == run["metrics"]["test/sample_acc"] and row["infer_throughput"] > 0
    assert dense["active_params"] == dense["total_params"] and topk["active_params"] < topk["total_params"]
    assert abs(topk["active_params"] - dense["active_params"]) / dense["active_params"] < 0.01, "equal active width"
    assert dense["expert_load"] is dense["specialisation"] is dense["expert_load_cv"] is dense["dropped_frac"] is None


def test_moe_row_routing_statistics(tiny: dict) -> None:
    topk = tiny["rows"][1]
    assert len(topk["expert_load"]) == 2 and all(
        len(s) == 8 and sum(s) == pytest.approx(1.0) for s in topk["expert_load"]
    )
    cv = statistics.fmean(statistics.pstdev(s) / statistics.fmean(s) for s in topk["expert_load"])
    assert topk["expert_load_cv"] == pytest.approx(cv, rel=1e-6)
    assert topk["dropped_frac"] == 0.0, "dropless top-k drops nothing"
    spec = topk["specialisation"]
    assert spec["by"] == "class" and spec["groups"] == list(FASHION_MNIST_CLASSES) and spec["layer"] == 1
    assert all(sum(s) == pytest.approx(1.0) or sum(s) == 0 for s in spec["share"])
    assert 0 < topk["extra"]["routing_purity"] <= 1
