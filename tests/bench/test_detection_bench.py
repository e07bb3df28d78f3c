"""``moezoo bench detection``: the tables format at tiny settings, the settings names and the ``--merge`` round trip."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from moezoo.bench import detection
from moezoo.bench.tables import discover, validate

TINY = ["--size", "debug", "--steps", "2", "--batch-size", "4", "--num-train", "8", "--num-test", "8"]
RUN_KEYS = {"variant", "seed", "model", "train_images", "metrics", "routing", "routing_load", "params", "mflops",
            "width", "img_per_s", "train_cpu_s", "train_wall_s"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("detection") / "detection.json"
    assert detection.main([*TINY, "--seeds", "0", "1", "--variants", "dense,wide2,moe2", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_json_is_in_the_tables_format_with_the_raw_runs(tiny_json: dict) -> None:
    data = tiny_json
    assert validate(data, "detection") == []
    assert (data["domain"], data["metric"], data["higher_is_better"], data["settings"]) == (
        "detection", "map", True, "custom"
    )  # fmt: skip
    assert data["args"]["steps"] == 2 and data["runtime_s"] > 0
    assert [(r["variant"], r["seed"]) for r in data["runs"]] == [
        (v, s) for s in (0, 1) for v in ("dense", "wide2", "moe2")
    ]
    assert all(set(r) == RUN_KEYS for r in data["runs"])
    rows = {r["router"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "wide2", "moe2"] and {r["model"] for r in rows.values()} == {"moe_yolo_debug"}
    for router, row in rows.items():
        runs = [r for r in data["runs"] if r["variant"] == router]
        assert row["metric"] == pytest.approx(statistics.fmean(r["metrics"]["mAP_clean"] for r in runs))
        assert row["extra"]["mAP50_degraded"] == pytest.approx(
            statistics.fmean(r["metrics"]["mAP50_degraded"] for r in runs)
        )
        assert row["extra"]["AR100_clean_std"] == pytest.approx(
            statistics.stdev(r["metrics"]["AR100_clean"] for r in runs)
        )
        assert row["active_params"] == row["total_params"] == runs[0]["params"]
        assert row["train_throughput"] == pytest.approx(statistics.fmean(8 / r["train_wall_s"] for r in runs))
    assert "mixture's total compute" in rows["wide2"]["extra"]["description"]
    for router in ("dense", "wide2"):
        assert rows[router]["expert_load"] is rows[router]["specialisation"] is rows[router]["expert_load_cv"] is None


def test_mixture_row_has_expert_load_per_scale_and_domain_specialisation(tiny_json: dict) -> None:
    row = next(r for r in tiny_json["rows"] if r["router"] == "moe2")
    runs = [r for r in tiny_json["runs"] if r["variant"] == "moe2"]
    load = row["expert_load"]
    assert len(load) == 3 and all(len(s) == 2 and sum(s) == pytest.approx(1.0) for s in load)
    for s in range(3):  # naive: the seed mean of each run's per-scale mean weights
        for n in range(2):
            assert load[s][n] == pytest.approx(statistics.fmean(r["routing_load"][s][n] for r in runs))
    cvs = []
    for r in runs:
        per_scale = [statistics.pstdev(w) / statistics.fmean(w) for w in r["routing_load"]]
        cvs.append(statistics.fmean(per_scale))
    assert row["expert_load_cv"] == pytest.approx(statistics.fmean(cvs))
    assert row["dropped_frac"] == 0.0
    spec = row["specialisation"]
    assert spec["by"] == "domain" and spec["groups"] == ["clean", "degraded"]
    for g, domain in enumerate(spec["groups"]):
        assert spec["share"][g] == pytest.approx(
            [statistics.fmean(r["routing"][domain][n] for r in runs) for n in range(2)]
        )


def test_merge_round_trip_reproduces_the_rows(tiny_json: dict, tmp_path: Path) -> None:
    by_seed = []
    for seed in (0, 1):
        part = {k: v for k, v in tiny_json.items() if k != "runs"}
        part["runs"] = [r for r in tiny_json["runs"] if r["seed"] == seed]
        by_seed.append(tmp_path / f"seed{seed}.json")
        by_seed[-1].write_text(json.dumps(part))
    out = tmp_path / "merged.json"
    assert detection.main(["--merge", *map(str, by_seed), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert validate(merged, "detection") == [] and merged["settings"] == "custom"
    assert merged["merged_from"] == [str(p) for p in by_seed]
    assert merged["rows"] == tiny_json["rows"], "the rows are a function of the runs alone"
    assert merged["runs"] == [r for s in (0, 1) for r in tiny_json["runs"] if r["seed"] == s]


def test_merge_reads_files_written_before_the_tables_format(tiny_json: dict, tmp_path: Path) -> None:
    old_runs = [{k: v for k, v in r.items() if k not in ("model", "train_images", "routing_load")}
                for r in tiny_json["runs"]]  # fmt: skip
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"args": tiny_json["args"], "runs": old_runs}))
    out = tmp_path / "merged.json"
    assert detection.main(["--merge", str(old), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert validate(merged, "detection") == []
    rows = {r["router"]: r for r in merged["rows"]}
    assert rows["moe2"]["model"] == "moe_yolo_debug" and rows["moe2"]["expert_load"] is None
    assert rows["moe2"]["specialisation"] is not None and rows["moe2"]["train_throughput"] > 0


def test_settings_names_and_argument_checks() -> None:
    assert detection.settings_of(vars(detection.parse_args(["--quick"]))) == "quick"
    assert detection.settings_of(vars(detection.parse_args(["--full", "--seeds", "3", "--variants", "moe4"]))) == "full"
    assert detection.settings_of(vars(detection.parse_args([]))) == "full"
    quick = detection.parse_args(["--quick", "--steps", "7"])
    assert quick.steps == 7 and quick.size == "debug" and detection.settings_of(vars(quick)) == "custom"
    for bad in (["--quick", "--full"], ["--variants", "moe9"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            detection.parse_args(bad)


def test_tables_discovers_detection_and_generation() -> None:
    benches, _, _ = discover(["detection", "generation"])
    assert benches == {"detection": "detection", "generation": "generation"}
