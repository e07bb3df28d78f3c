"""``moezoo bench speech`` follows the ``moezoo bench tables`` contract: its ``--json`` (rewritten after every run)
passes ``validate`` and keeps the raw ``args``/``results``; ``--resume`` skips done (variant, seed) runs;
``--merge ... --json`` writes the merged rows, also from files of the earlier format; the per-language routing
counts of padded batches match per-utterance forwards."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from moezoo.bench import speech, tables
from moezoo.layers import MoE
from moezoo.tasks.speech.corpus import missing_engines

needs_tts = pytest.mark.skipif(bool(missing_engines()), reason=f"TTS programs {missing_engines()} not installed")
SMOKE = ["--preset", "smoke", "--steps", "2", "--size", "debug", "--batch-size", "4", "--no-ood"]
NEW_FIELDS = ("seed", "infer_utt_per_s", "dropped_frac", "expert_load", "specialisation", "wall_s")


@pytest.fixture(scope="module")
def seed0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Switch and the dense twin, seed 0, two steps on the smoke corpus."""
    path = tmp_path_factory.mktemp("speech") / "s0.json"
    assert speech.main([*SMOKE, "--variants", "switch", "dense", "--seeds", "0", "--json", str(path)]) == 0
    return path


@needs_tts
def test_json_follows_the_tables_contract(seed0: Path) -> None:
    data = json.loads(seed0.read_text())
    assert tables.validate(data, "speech") == []
    assert data["metric"] == "cer" and data["higher_is_better"] is False and data["settings"] == "full"
    assert data["args"]["steps"] == 2 and set(data["results"]) == {"switch", "dense"}
    runs = [data["results"][v][0] for v in ("switch", "dense")]
    assert data["runtime_s"] == pytest.approx(sum(r["wall_s"] for r in runs), abs=0.05)
    switch, dense = data["rows"]
    assert (switch["router"], dense["router"]) == ("topk", "dense")
    assert switch["model"] == dense["model"] == "moe_conformer_debug"
    run = data["results"]["switch"][0]
    assert run["seed"] == 0 and switch["metric"] == pytest.approx(run["test_cer"])
    assert switch["extra"]["wer"] == pytest.approx(run["test_wer"]) and switch["extra"]["seeds"] == [0]
    assert switch["train_throughput"] == pytest.approx(run["utt_per_s"]) and switch["infer_throughput"] > 0
    assert switch["active_params"] < switch["total_params"] and dense["active_params"] == dense["total_params"]
    assert switch["dropped_frac"] == 0.0 and switch["expert_load_cv"] == pytest.approx(run["load_cv"])
    assert len(switch["expert_load"]) == 4 and all(sum(x) == pytest.approx(1.0) for x in switch["expert_load"])
    spec = switch["specialisation"]
    assert spec["by"] == "language" and spec["groups"] == ["en", "de", "es", "fr", "cs"] and spec["layer"] == 3
    assert all(sum(share) == pytest.approx(1.0) or sum(share) == 0.0 for share in spec["share"])
    assert spec["share"][-1] != [0.0] * 4  # the smoke test set has code-switched utterances
    assert dense["expert_load"] is None and dense["expert_load_cv"] is None and dense["dropped_frac"] is None


@needs_tts
def test_resume_skips_done_runs_and_refuses_other_settings(seed0: Path, tmp_path: Path) -> None:
    path = tmp_path / "resume.json"
    path.write_text(seed0.read_text())
    before = json.loads(seed0.read_text())["results"]
    assert speech.main([*SMOKE, "--variants", "switch", "--seeds", "0", "1", "--json", str(path), "--resume"]) == 0
    results = json.loads(path.read_text())["results"]
    assert [r["seed"] for r in results["switch"]] == [0, 1] and results["switch"][0] == before["switch"][0]
    assert results["dense"] == before["dense"]
    other = [*SMOKE[:2], "--steps", "3", *SMOKE[4:]]
    assert speech.main([*other, "--variants", "switch", "--seeds", "2", "--json", str(path), "--resume"]) == 2
    assert json.loads(path.read_text())["results"] == results


@needs_tts
def test_merge_writes_the_merged_rows_also_from_old_files(seed0: Path, tmp_path: Path) -> None:
    s1 = tmp_path / "s1.json"
    assert speech.main([*SMOKE, "--variants", "switch", "dense", "--seeds", "1", "--json", str(s1)]) == 0
    # seed 1 as a file of the earlier format: raw settings under "settings", runs without the new fields
    new = json.loads(s1.read_text())
    old_results = {
        v: [{k: x for k, x in r.items() if k not in NEW_FIELDS} for r in runs] for v, runs in new["results"].items()
    }
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"settings": new["args"], "results": old_results}))
    out = tmp_path / "merged.json"
    assert speech.main(["--merge", str(seed0), str(old), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert tables.validate(merged, "speech") == [] and merged["args"]["seeds"] == [0, 1]
    assert "runtime_s" not in merged  # the old file's runs have no wall time
    runs = json.loads(seed0.read_text())["results"]["switch"] + new["results"]["switch"]
    switch = merged["rows"][0]
    assert switch["router"] == "topk" and switch["extra"]["seeds"] == [0, 1]
    assert switch["metric"] == pytest.approx(statistics.fmean(r["test_cer"] for r in runs))
    assert switch["extra"]["cer_std"] == pytest.approx(statistics.stdev(r["test_cer"] for r in runs))
    assert switch["infer_throughput"] == pytest.approx(runs[0]["infer_utt_per_s"])  # seed 1's is unknown
    assert switch["extra"]["routing_seed"] == 0
    assert speech.main(["--merge", str(seed0), str(seed0)]) == 2  # the same (variant, seed) twice
    # --resume of the old file with every run done trains nothing and rewrites it in the tables format.
    assert speech.main([*SMOKE, "--variants", "switch", "dense", "--seeds", "1", "--json", str(old), "--resume"]) == 0
    resumed = json.loads(old.read_text())
    assert tables.validate(resumed, "speech") == [] and resumed["results"]["switch"][0]["seed"] == 1
    assert resumed["rows"][0]["metric"] == pytest.approx(new["rows"][0]["metric"])


def test_language_counts_of_a_padded_batch_match_per_utterance_forwards() -> None:
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, top_k=1).eval()
    lengths_B = torch.tensor([5, 1, 7, 3])
    group_B = torch.tensor([2, -1, 4, 2])  # a language, not counted, "cs", the same language again
    x_BLD = torch.randn(4, 7, 8)
    mask_BL = torch.arange(7) < lengths_B[:, None]
    with torch.no_grad():
        _, aux = moe(x_BLD, mask=mask_BL)
        counts_GE = speech.group_counts(aux.routing, lengths_B, group_B, 5)
        expected_GE = torch.zeros(5, 4, dtype=torch.float64)
        for b in range(4):  # each utterance alone, without padding
            _, alone = moe(x_BLD[b, : lengths_B[b]])
            if group_B[b] >= 0:
                expected_GE[group_B[b]] += torch.bincount(alone.routing.expert_idx_N, minlength=4).double()
    assert torch.equal(counts_GE, expected_GE) and counts_GE.sum() == 15


def test_utterance_groups() -> None:
    lid = torch.tensor([[-1, 1, 1, 1, -1], [0, 0, 2, 2, 2], [-1, -1, -1, -1, -1], [3, 3, -1, -1, -1]])
    batch = {"kinds": ["mono", "cs", "mono", "real"], "lid": lid}
    assert speech.utterance_groups(batch, ("en", "de", "es", "fr")).tolist() == [1, 4, -1, -1]
