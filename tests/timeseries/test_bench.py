"""``moezoo bench timeseries`` end to end on ETTh1 at tiny settings: ``moezoo fit`` of the benchmark configs at a
horizon of the command line, routing per channel. (Rows as means over horizons: tests/bench/test_suite.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moezoo.tasks.bench import timeseries as bench
from moezoo.tasks.bench.schema import validate
from moezoo.tasks.bench.suite import parse_args

ETTH1 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ett" / "ETTh1.csv"
TINY = ["--quick", "--seeds", "0", "--horizons", "12", "--trainer.max_epochs", "1", "--data.init_args.seq_len", "48",
        "--model.init_args.model_kwargs.seq_len", "48", "--data.init_args.train_stride", "200",
        "--data.init_args.val_stride", "100", "--trainer.limit_test_batches", "2", "--data.init_args.path",
        str(ETTH1)]  # fmt: skip


def test_quick_and_full_budgets() -> None:
    _, quick, name = parse_args(bench.SPEC, ["--quick"])
    assert name == "quick" and quick.cells == ("96",) and quick.seeds == (0, 1) and "3" in quick.overrides
    _, full, name = parse_args(bench.SPEC, ["--full"])
    assert name == "full" and full.cells == ("96", "192", "336", "720") and full.seeds == (0, 1, 2)
    assert full.variants == ("dense", "moe", "segmoe") and full.overrides == ()
    assert bench.horizon_overrides("192") == (
        "--data.init_args.pred_len", "192", "--model.init_args.model_kwargs.pred_len", "192"
    )  # fmt: skip


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
    assert run["command"].endswith("--data.init_args.pred_len 12 --model.init_args.model_kwargs.pred_len 12")
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
