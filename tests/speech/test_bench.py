"""``moezoo bench speech`` end to end on the smoke corpus: ``moezoo fit`` of the speech configs (two steps), the
tables format with per-language routing and the out-of-domain test; the utterance groups of the speech task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moezoo.tasks.bench import speech
from moezoo.tasks.bench.schema import validate
from moezoo.tasks.speech.asr import utterance_groups
from moezoo.tasks.speech.corpus import missing_engines

TINY = ["--quick", "--seeds", "0", "--data.init_args.preset", "smoke", "--data.init_args.batch_size", "4",
        "--model.init_args.model", "moe_conformer_debug", "--trainer.max_steps", "2"]  # fmt: skip


@pytest.mark.skipif(bool(missing_engines()), reason=f"TTS programs {missing_engines()} not installed")
def test_bench_rows_routing_and_out_of_domain(tmp_path: Path) -> None:
    path = tmp_path / "speech.json"
    assert speech.main([*TINY, "--variants", "switch,dense", "--json", str(path), "--out", str(tmp_path / "r")]) == 0
    data = json.loads(path.read_text())
    assert validate(data, "speech") == [] and (data["metric"], data["higher_is_better"]) == ("cer", False)
    runs = {r["variant"]: r for r in data["runs"]}
    assert runs["switch"]["command"].startswith(
        "moezoo fit --config configs/speech/numbers_switch_conformer.yaml --seed_everything 0 --data.init_args.preset"
    )
    dense, switch = data["rows"]  # in the benchmark's order of variants
    assert (switch["router"], dense["router"]) == ("topk", "dense") and switch["model"] == "moe_conformer_debug"
    run = runs["switch"]
    assert switch["metric"] == run["metrics"]["test/cer"] and switch["extra"]["wer"] == run["metrics"]["test/wer"]
    assert 0 <= switch["extra"]["ood_cer"] == run["extra"]["ood_cer"] and switch["infer_throughput"] > 0
    assert 0 <= switch["extra"]["routing_agreement_matched"] <= 1
    assert switch["active_params"] < switch["total_params"] and dense["active_params"] == dense["total_params"]
    assert len(switch["expert_load"]) == 4 and all(sum(x) == pytest.approx(1.0) for x in switch["expert_load"])
    spec = switch["specialisation"]
    assert spec["by"] == "language" and spec["groups"] == ["en", "de", "es", "fr", "cs"] and spec["layer"] == 3
    assert all(sum(share) == pytest.approx(1.0) or sum(share) == 0.0 for share in spec["share"])
    assert sum(spec["share"][-1]) == pytest.approx(1.0)  # the smoke test set has code-switched utterances
    assert dense["expert_load"] is None and dense["expert_load_cv"] is None and dense["dropped_frac"] is None
    assert (Path(run["log_dir"]) / "ood" / "routing").is_dir(), "the out-of-domain test writes beside, not over"


def test_utterance_groups() -> None:
    lid = torch.tensor([[-1, 1, 1, 1, -1], [0, 0, 2, 2, 2], [-1, -1, -1, -1, -1], [3, 3, -1, -1, -1]])
    batch = {"kinds": ["mono", "cs", "mono", "real"], "lid": lid}
    assert utterance_groups(batch, ("en", "de", "es", "fr")).tolist() == [1, 4, -1, -1]
