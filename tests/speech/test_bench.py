"""``moezoo bench speech`` end to end on the smoke corpus (two steps), and merging runs made separately."""

from __future__ import annotations

import json

import pytest

from moezoo.bench import speech
from moezoo.tasks.speech.corpus import missing_engines


@pytest.mark.skipif(bool(missing_engines()), reason=f"TTS programs {missing_engines()} not installed")
def test_bench_runs_and_merges(tmp_path, capsys):
    common = ["--preset", "smoke", "--steps", "2", "--size", "debug", "--batch-size", "4", "--no-ood"]
    for seed in (0, 1):
        out = tmp_path / f"s{seed}.json"
        assert speech.main([*common, "--variants", "switch", "lrmoe", "--seeds", str(seed), "--json", str(out)]) == 0
    record = json.loads((tmp_path / "s0.json").read_text())
    lrmoe = record["results"]["lrmoe"][0]
    assert 0.0 <= lrmoe["lid_acc"] <= 1.0 and lrmoe["params_active"] < lrmoe["params_total"]
    assert 0.0 <= record["results"]["switch"][0]["agree_matched"] <= 1.0
    capsys.readouterr()
    assert speech.main(["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json")]) == 0
    table = capsys.readouterr().out
    assert "| lrmoe |" in table and "| switch |" in table and "±" in table
    assert "WER relative to Switch" in table
