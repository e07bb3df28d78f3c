"""The generated corpus: deterministic plans, held-out voices, exact language segments, clear errors without TTS."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from moezoo.tasks.speech import corpus
from moezoo.tasks.speech.corpus import CorpusSpec, generate_corpus, missing_engines, plan_corpus
from moezoo.tasks.speech.data import SpeechCorpusDataModule
from moezoo.tasks.speech.text import CharVocab

needs_tts = pytest.mark.skipif(
    bool(missing_engines()), reason=f"TTS programs {missing_engines()} not installed (apt-get install espeak-ng flite)"
)
TINY = CorpusSpec(num_train=4, num_val=2, num_test=2, code_switch_frac=0.5, max_number=100, seed=3)


def test_plans_are_deterministic_with_held_out_voices():
    spec = CorpusSpec(num_train=200, num_val=40, num_test=40)
    plans = plan_corpus(spec)
    assert [p.__dict__ for p in plans] == [p.__dict__ for p in plan_corpus(spec)]
    voices = {split: {(p.engine, p.voice) for p in plans if p.split == split} for split in ("train", "val", "test")}
    assert not voices["train"] & voices["val"] and not voices["train"] & voices["test"]
    assert not voices["val"] & voices["test"]
    vocab = CharVocab()
    for p in plans:
        langs = [ph.lang for ph in p.phrases]
        assert (len(set(langs)) == 2) == (p.kind == "cs")
        if p.kind == "cs":
            assert all(a != b for a, b in zip(langs, langs[1:]))  # alternating
        if p.engine == "flite":
            assert set(langs) == {"en"}
        for ph in p.phrases:
            vocab.encode(ph.text)
    kinds = [p.kind for p in plans]
    assert 0.25 < kinds.count("cs") / len(kinds) < 0.55


def test_bad_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="languages must be a non-empty subset"):
        CorpusSpec(languages=("en", "xx"))
    with pytest.raises(ValueError, match="num_val must be >= 1"):
        CorpusSpec(num_val=0)
    with pytest.raises(ValueError, match="preset must be one of"):
        SpeechCorpusDataModule(preset="huge")


def test_missing_tts_engines_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"needs the TTS programs \['espeak-ng', 'flite'\].*apt-get install"):
        generate_corpus(TINY, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


@needs_tts
def test_generated_corpus_has_exact_language_segments(tmp_path):
    folder = generate_corpus(TINY, tmp_path, progress=False)
    assert folder == tmp_path / TINY.name
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:
        audio, rate = sf.read(folder / row["audio"], dtype="float32")
        assert rate == 16000 and audio.size == row["num_samples"]
        inside = np.zeros(audio.size, dtype=bool)
        previous_end = 0
        for start, end, lang in row["segments"]:
            assert previous_end < start < end <= audio.size and lang in TINY.languages
            inside[start:end] = True
            previous_end = end
        # Speech lies inside the labelled segments; the pauses between them hold only the faint noise floor.
        assert np.abs(audio[~inside]).max() < 0.02 < np.abs(audio[inside]).max()
        langs = [s[2] for s in row["segments"]]
        assert row["language"] == "+".join(dict.fromkeys(langs))
    mtime = (folder / "spec.json").stat().st_mtime
    assert generate_corpus(TINY, tmp_path, progress=False) == folder  # cached: not regenerated
    assert (folder / "spec.json").stat().st_mtime == mtime


@needs_tts
def test_corpus_datamodule_batches_carry_frame_language_labels(tmp_path):
    dm = SpeechCorpusDataModule(
        preset="smoke", root=str(tmp_path), num_train=4, num_val=2, num_test=2, corpus_seed=3,
        code_switch_frac=0.5, batch_size=4,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["features"].shape[0] == 4 and batch["features"].shape[2] == 80
    labelled = batch["lid"][batch["lid"] >= 0]
    assert labelled.numel() > 0 and int(labelled.max()) < 4
    shutil.rmtree(tmp_path)
