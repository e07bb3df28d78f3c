"""``moezoo bench timeseries`` follows the ``moezoo bench tables`` contract: its ``--json`` passes ``validate`` and
keeps the raw ``args``/``runs``; ``--resume`` skips done runs; ``--from-json`` rebuilds the rows of a raw file
(also one written before the per-run throughput and routing fields existed); the channel grouping of the routing
statistics matches a per-window count."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from moezoo.bench import tables
from moezoo.bench import timeseries as bench
from moezoo.models import create_model

ETTH1 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ett" / "ETTh1.csv"
pytestmark = pytest.mark.skipif(not ETTH1.is_file(), reason=f"{ETTH1} not present")
TINY = ["--data", str(ETTH1), "--seq-len", "48", "--horizons", "8", "--seeds", "0", "--epochs", "1",
        "--train-stride", "200", "--val-stride", "100", "--batch-size", "64", "--threads", "1"]  # fmt: skip
NEW_FIELDS = ("train_windows", "train_throughput", "infer_throughput", "active_params", "total_params",
              "num_channels", "expert_load", "expert_load_cv", "dropped_frac", "specialisation", "wall_s")  # fmt: skip


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense and a Seg-MoE run (one epoch on every 200th training window), written with --json."""
    path = tmp_path_factory.mktemp("ts") / "bench.json"
    assert bench.main([*TINY, "--variants", "dense", "segmoe", "--json", str(path)]) == 0
    return path


def test_quick_and_full_flags() -> None:
    full = bench._parse(["--full"])
    assert full.horizons == [96, 192, 336, 720] and full.seeds == [0, 1, 2] and full.epochs == 30 and not full.quick
    assert vars(full) == {**vars(bench._parse([])), "full": True}
    with pytest.raises(SystemExit):
        bench._parse(["--quick", "--full"])


def test_json_follows_the_tables_contract(raw_file: Path) -> None:
    data = json.loads(raw_file.read_text())
    assert tables.validate(data, "timeseries") == []
    assert data["metric"] == "mse" and data["higher_is_better"] is False and data["settings"] == "full"
    assert set(data["args"]) >= {"horizons", "seeds", "variants", "seq_len"} and len(data["runs"]) == 2
    assert data["runtime_s"] == pytest.approx(sum(r["wall_s"] for r in data["runs"]), abs=0.05)
    assert all(r["wall_s"] > r["train_s"] for r in data["runs"])
    dense, seg = data["rows"]
    assert (dense["router"], seg["router"]) == ("dense", "segment")
    assert dense["model"] == seg["model"] == "moe_patchtst_tiny"
    runs = {r["variant"]: r for r in data["runs"]}
    for row, run in ((dense, runs["dense"]), (seg, runs["segmoe"])):
        assert row["metric"] == pytest.approx(run["mse"])
        assert row["extra"]["horizons"]["8"]["mae"] == pytest.approx(run["mae"])
        assert row["train_throughput"] == pytest.approx(run["train_windows"] * run["epochs"] / run["train_s"])
        assert row["infer_throughput"] > 0
    assert run["train_windows"] == (8640 - 48 - 8) // 200 + 1 and runs["segmoe"]["epochs"] == 1
    assert dense["active_params"] == dense["total_params"] == runs["dense"]["params"]
    assert dense["expert_load"] is None and dense["specialisation"] is None and dense["expert_load_cv"] is None
    assert seg["active_params"] < seg["total_params"] == runs["segmoe"]["params"]
    assert seg["extra"]["segment_sizes"] == [3, 5, 5] and seg["dropped_frac"] == 0.0
    assert len(seg["expert_load"]) == 3 and all(sum(layer) == pytest.approx(1.0) for layer in seg["expert_load"])
    spec = seg["specialisation"]
    assert spec["by"] == "channel" and spec["groups"] == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert all(sum(share) == pytest.approx(1.0) for share in spec["share"])


def test_active_params_count_router_topk_and_shared_expert() -> None:
    from moezoo.bench.speech import count_params

    model = create_model("moe_patchtst_tiny", seq_len=48, pred_len=8, segment_sizes=[3, 5, 5])
    total, active = count_params(model)
    expert_params = [sum(p.numel() for p in b.ffn.experts.parameters()) for b in model.blocks]
    assert total == sum(p.numel() for p in model.parameters())
    assert active == total - sum(3 * e // 4 for e in expert_params)  # top-1 of 4 experts per block


def test_resume_skips_done_runs(raw_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "resume.json"
    path.write_text(raw_file.read_text())
    before = json.loads(raw_file.read_text())["runs"]
    assert bench.main([*TINY, "--variants", "dense", "moe", "segmoe", "--json", str(path), "--resume"]) == 0
    data = json.loads(path.read_text())
    assert [r["variant"] for r in data["runs"]] == ["dense", "segmoe", "moe"]
    assert data["runs"][:2] == before  # kept as they were, not rerun
    assert [r["router"] for r in data["rows"]] == ["dense", "topk", "segment"]
    assert tables.validate(data, "timeseries") == []


def test_from_json_rebuilds_rows_also_of_old_runs(raw_file: Path, tmp_path: Path, capsys) -> None:
    data = json.loads(raw_file.read_text())
    out = tmp_path / "tables.json"
    assert bench.main(["--from-json", str(raw_file), "--json", str(out)]) == 0
    rebuilt = json.loads(out.read_text())
    assert rebuilt["rows"] == data["rows"] and rebuilt["runs"] == data["runs"]
    assert "| moe_patchtst_tiny | segment |" in capsys.readouterr().out
    # A file of the earlier format: only "args" and "runs", runs without the new fields.
    old = tmp_path / "old.json"
    old_runs = [{k: v for k, v in r.items() if k not in NEW_FIELDS} for r in data["runs"]]
    old.write_text(json.dumps({"args": data["args"], "runs": old_runs}))
    assert bench.main(["--from-json", str(old), "--json", str(out)]) == 0
    rebuilt = json.loads(out.read_text())
    assert tables.validate(rebuilt, "timeseries") == [] and "runtime_s" not in rebuilt
    for new, row in zip(rebuilt["rows"], data["rows"]):
        # Parameter counts and training windows follow from the architecture and the split: the same numbers.
        assert (new["active_params"], new["total_params"]) == (row["active_params"], row["total_params"])
        assert new["train_throughput"] == pytest.approx(row["train_throughput"])
        assert new["metric"] == row["metric"] and new["infer_throughput"] is None and new["expert_load"] is None
    seg = rebuilt["rows"][1]
    assert seg["expert_load_cv"] == pytest.approx(data["runs"][1]["load_cv"]) and seg["dropped_frac"] is None
    assert seg["extra"]["train_throughput_derived_runs"] == 1
    # --resume of such a file with every run done trains nothing and rewrites it in the tables format.
    assert bench.main([*TINY, "--variants", "dense", "segmoe", "--json", str(old), "--resume"]) == 0
    resumed = json.loads(old.read_text())
    assert resumed["runs"] == old_runs and resumed["rows"] == rebuilt["rows"]


def test_channel_grouping_matches_a_per_window_count() -> None:
    torch.manual_seed(0)
    model = create_model("moe_patchtst_debug", num_channels=3).eval()
    x_WLC = torch.randn(5, 32, 3)
    stats = bench.channel_routing_stats(model, x_WLC, 2, ["a", "b", "c"])
    counts_CE = torch.zeros(3, 4)
    with torch.no_grad():
        for w in range(5):  # one window at a time: series n of the batch is channel n
            routing = [a.routing for a in model.forward_with_aux(x_WLC[w : w + 1])[1] if a.routing is not None][-1]
            per_series = routing.num_tokens // 3
            for token, expert in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()):
                counts_CE[token // per_series, expert] += 1
    expected = counts_CE / counts_CE.sum(-1, keepdim=True)
    assert torch.allclose(torch.tensor(stats["specialisation"]["share"], dtype=torch.float64), expected.double())
    assert stats["specialisation"]["groups"] == ["a", "b", "c"]
    assert statistics.fmean(sum(layer) for layer in stats["expert_load"]) == pytest.approx(1.0)
    assert bench.channel_routing_stats(create_model("moe_patchtst_debug", dense=True), x_WLC, 2, list("abc")) == {}
