"""``moezoo bench speech-loeo``: its budgets and arguments, each held-out engine's overrides, the README block's
per-engine tables and verdicts from synthetic runs, and one tiny run through ``moezoo fit`` on a smoke-sized
leave-flite-out corpus."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moezoo.tasks.bench import speech_loeo as bench
from moezoo.tasks.bench.render import readme_markers
from moezoo.tasks.bench.schema import validate
from moezoo.tasks.bench.suite import parse_args, readme_block, run_specs
from moezoo.tasks.speech.corpus import ENGINES, ENGINES3, PRESETS, missing_packages

ALL_SIX = "[speed, pitch, reverb, noise, bandlimit, codec]"
SIZES = ("num_train", "num_val", "num_test")


def _value(overrides: tuple[str, ...], key: str) -> str | None:
    return overrides[overrides.index(key) + 1] if key in overrides else None


def test_budgets_and_arguments() -> None:
    _, full, name = parse_args(bench.SPEC, ["--full"])
    assert name == "full" and full.cells == ("espeak", "flite", "festival") and full.seeds == (0, 1)
    assert full.variants == ("dense", "switch", "omni", "lrmoe", "global")
    assert _value(full.overrides, "--trainer.max_epochs") == "6"
    assert _value(full.overrides, "--data.init_args.augment") == ALL_SIX
    assert _value(full.overrides, "--data.init_args.augment_prob") == "0.35"
    _, quick, name = parse_args(bench.SPEC, [])
    assert name == "quick" and quick.seeds == (0,) and quick.cells == full.cells
    assert _value(quick.overrides, "--data.init_args.augment") == ALL_SIX
    assert _value(quick.overrides, "--trainer.max_steps") == "120"
    _, one, name = parse_args(bench.SPEC, ["--full", "--variants", "omni", "--seeds", "0", "--engines", "flite"])
    assert name == "custom" and (one.cells, one.seeds, one.variants) == (("flite",), (0,), ("omni",))
    _, ablation, _ = parse_args(bench.SPEC, ["--variants", "noaug"])
    assert ablation.variants == ("dense_noaug", "omni_noaug")
    assert [v.router for v in bench.NOAUG] == ["dense", "omni"]  # in speech's order: dense first


def test_each_engine_selects_its_corpus_and_every_row_its_conditions() -> None:
    argv = ["--full", "--variants", "omni,noaug", "--data.init_args.augment_prob", "0.5"]
    _, budget, _ = parse_args(bench.SPEC, argv)
    runs = {(r.variant, r.cell): r for r in run_specs(bench.SPEC, budget) if r.seed == 0}
    assert len(runs) == 3 * 3
    for engine in ("espeak", "flite", "festival"):
        omni, noaug = runs[("omni", engine)], runs[("omni_noaug", engine)]
        assert _value(omni.overrides, "--data.init_args.preset") == f"loeo_{engine}"
        assert omni.config == "configs/speech/numbers_omni_conformer.yaml" == noaug.config
        assert _value(omni.overrides, "--data.init_args.augment") == ALL_SIX
        assert _value(omni.overrides, "--data.init_args.augment_prob") == "0.5"  # the command line replaces it
        assert _value(noaug.overrides, "--data.init_args.augment") == "[]"  # the ablation's own override wins
        assert _value(noaug.overrides, "--data.init_args.preset") == f"loeo_{engine}"
    assert "--data.init_args.augment '[speed, pitch" in runs[("omni", "flite")].command()
    with pytest.raises(ValueError, match="engine='google' is not a TTS engine"):
        bench.engine_overrides("google")


def test_unknown_engine_is_refused_before_any_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--engines", "flite,google"]) == 2
    assert "--engines ['google'] unknown" in capsys.readouterr().err


def test_quick_corpora_are_overrides_of_the_loeo_presets() -> None:
    # no preset of its own: the released presets' plans are untouched, and each cell's quick corpus can be formed
    from moezoo.tasks.speech.data import SpeechCorpusDataModule

    _, quick, _ = parse_args(bench.SPEC, [])
    sizes = {k: int(_value(quick.overrides, f"--data.init_args.{k}") or 0) for k in SIZES}
    for engine in ("espeak", "flite", "festival"):
        dm = SpeechCorpusDataModule(preset=f"loeo_{engine}", augment=["speed"], max_number=100, **sizes)
        assert dm.spec == dataclasses.replace(PRESETS[f"loeo_{engine}"], augment=("speed",), max_number=100, **sizes)


def _record(variant: str, cell: str, seed: int, unseen: float, seen: float, cs: float | None = None) -> dict:
    metrics = {"test/cer_unseen_engine": unseen, "test/cer_seen_engine": seen, f"test/cer_engine_{cell}_en": unseen}
    if cs is not None:
        metrics["test/cer_cs"] = cs
    return {"variant": variant, "seed": seed, "cell": cell, "command": f"moezoo fit {variant} {cell}",
            "model": "moe_conformer_tiny", "metrics": metrics, "routing": None,
            "params": {"total": 10, "active": 10}, "train_throughput": 1.0, "train_cpu_throughput": 1.0,
            "infer_throughput": 1.0, "infer_cpu_throughput": 1.0, "extra": {}}  # fmt: skip


def test_per_engine_tables_and_verdicts() -> None:
    runs = [
        _record("omni", "flite", 0, 0.20, 0.04, 0.020), _record("omni", "flite", 1, 0.22, 0.05, 0.022),  # 0.21
        _record("switch", "flite", 0, 0.30, 0.04, 0.030), _record("switch", "flite", 1, 0.32, 0.04, 0.032),
        _record("dense", "flite", 0, 0.21, 0.06), _record("dense", "flite", 1, 0.22, 0.06),  # within the spread
        _record("lrmoe", "flite", 0, 0.25, 0.03, 0.021), _record("lrmoe", "flite", 1, 0.25, 0.03, 0.021),
        _record("omni", "espeak", 0, 0.50, 0.10), _record("omni", "espeak", 1, 0.60, 0.12),
        _record("switch", "espeak", 0, 0.40, 0.10), _record("switch", "espeak", 1, 0.40, 0.10),
        _record("lrmoe", "espeak", 0, 0.40, 0.10), _record("lrmoe", "espeak", 1, 0.40, 0.10),  # no cs in this cell
    ]  # fmt: skip
    text = bench.per_engine(runs)
    assert "| variant | held-out espeak | held-out flite |" in text  # the engines' order, cells that ran only
    assert "| omni | 0.5500 ± 0.0707 | 0.2100 ± 0.0141 |" in text and "| dense | - | 0.2150 ± 0.0071 |" in text
    assert "| omni | 0.1100 ± 0.0141 | 0.0450 ± 0.0071 |" in text  # the seen-engine table
    assert "The held-out engine's test utterances are in espeak: en; flite: en" in text
    lines = text.splitlines()
    omni = lines.index(next(x for x in lines if x.startswith("Omni-router against Switch and dense")))
    assert lines[omni + 2] == "- espeak: switch: worse by 0.1500"
    assert lines[omni + 3] == "- flite: switch: better by 0.1000; dense: within the spread (-0.0050)"
    lrmoe = lines.index(next(x for x in lines if x.startswith("LR-MoE against Switch on the code-switched")))
    assert lines[lrmoe + 2 :] == ["- flite: switch: better by 0.0100"]  # espeak has no code-switched utterance
    block = readme_block(bench.SPEC, runs, "full")
    assert block.startswith("Generated by `moezoo bench speech-loeo --full` (14 runs") and text in block
    assert "engines flite, espeak" in block


@pytest.mark.skipif(
    bool(missing_packages(PRESETS["loeo_flite"])), reason=f"TTS packages {missing_packages(PRESETS['loeo_flite'])}"
)
def test_a_tiny_run_through_fit(tmp_path: Path) -> None:
    path, readme = tmp_path / "r.json", tmp_path / "README.md"
    begin, end = readme_markers("speech-loeo")
    readme.write_text(f"a\n{begin}\nSTALE-TABLE\n{end}\n")
    argv = ["--quick", "--engines", "flite", "--variants", "omni,omni_noaug", "--data.init_args.num_train", "24",
            "--data.init_args.num_val", "8", "--data.init_args.num_test", "16", "--data.init_args.batch_size", "4",
            "--model.init_args.model", "moe_conformer_debug", "--trainer.max_steps", "2", "--json", str(path),
            "--out", str(tmp_path / "runs"), "--readme", str(readme)]  # fmt: skip
    assert bench.main(argv) == 0
    data = json.loads(path.read_text())
    assert validate(data, "speech-loeo") == [] and data["settings"] == "custom" and len(data["runs"]) == 2
    runs = {r["variant"]: r for r in data["runs"]}
    omni, noaug = runs["omni"], runs["omni_noaug"]
    assert omni["cell"] == "flite" and "--data.init_args.preset loeo_flite" in omni["command"]
    for key in ("test/cer_unseen_engine", "test/cer_seen_engine", "test/wer_unseen_engine", "test/cer_engine_flite_en"):
        assert 0 <= omni["metrics"][key] <= 1.5, key
    assert omni["metrics"]["test/cer_engine_flite"] == omni["metrics"]["test/cer_unseen_engine"]
    assert "--data.init_args.augment '[]'" in noaug["command"]
    assert omni["params"]["active"] < omni["params"]["total"] and omni["extra"]["ood_cer"] >= 0
    text = readme.read_text()
    assert "STALE-TABLE" not in text and "| variant | held-out flite |" in text and "flite: en" in text


def test_the_five_engine_corpus_selects_its_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = bench.corpus_spec("loeo5")
    assert bench.corpus_spec("loeo") is bench.SPEC and spec.full.cells == ENGINES and spec.quick.cells == ENGINES
    _, one, _ = parse_args(spec, ["--full", "--variants", "omni", "--seeds", "0", "--engines", "flite"])
    (run,) = run_specs(spec, one)
    assert _value(run.overrides, "--data.init_args.preset") == "loeo5_flite" and run.cell == "flite"
    assert _value(run.overrides, "--data.init_args.augment") == ALL_SIX  # the same recipe as the three-engine rows
    presets = [_value(r.overrides, "--data.init_args.preset") for r in run_specs(spec, spec.quick)]
    assert list(dict.fromkeys(presets)) == [f"loeo5_{e}" for e in ENGINES]
    assert "espeak-ng / flite / festival / pico / mbrola" in spec.dataset
    with pytest.raises(ValueError, match="engine='pico' is not a TTS engine of the corpus 'loeo'"):
        bench.engine_overrides("pico")
    with pytest.raises(ValueError, match="corpus='loeo7' is not a leave-one-engine-out corpus"):
        bench.corpus_spec("loeo7")
    # main: --corpus is taken out of the arguments, the runs get a folder of their own
    seen: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(bench, "run_main", lambda s, args: seen.append((s.full.cells, args)) or 0)
    assert bench.main(["--corpus", "loeo5", "--engines", "pico", "--full"]) == 0
    assert seen[-1] == (ENGINES, ["--engines", "pico", "--full", "--out", "bench_results/runs/speech-loeo5"])
    assert bench.main(["--engines", "flite", "--corpus", "loeo5", "--out", "x"]) == 0
    assert seen[-1][1] == ["--engines", "flite", "--out", "x"]
    assert bench.main(["--engines", "flite"]) == 0 and seen[-1] == (ENGINES3, ["--engines", "flite"])


def test_an_unknown_corpus_or_an_engine_outside_it_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--corpus", "loeo7"]) == 2
    assert "--corpus 'loeo7' unknown; choose from ['loeo', 'loeo5']" in capsys.readouterr().err
    assert bench.main(["--engines", "mbrola"]) == 2
    assert "--engines ['mbrola'] unknown for --corpus loeo" in capsys.readouterr().err
    assert bench.main(["--corpus", "loeo5", "--readme", "README.md"]) == 2  # the README block is the three-engine one
    assert "--readme holds the three-engine table" in capsys.readouterr().err
