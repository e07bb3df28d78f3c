"""Loaders on small fixtures written in each format (LibriSpeech, Common Voice, JSONL), bad input, features."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from moezoo.tasks.records import BadRecordWarning
from moezoo.tasks.speech.data import (
    POCKETSPHINX_ROOT,
    CommonVoiceDataModule,
    LibriSpeechDataModule,
    ManifestDataModule,
    SpeechDataset,
    SpeechEntry,
    collate_speech,
    corpus_entry,
    frame_languages,
    load_audio,
    metric_groups,
    pocketsphinx_entries,
)
from moezoo.tasks.speech.text import CharVocab


def _tone(seconds: float, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _epoch(dm, split):
    return [b for b in dm._loader(split, shuffle=False)]


def test_librispeech_layout(tmp_path):
    for subset, n in (("train-clean-100", 3), ("dev-clean", 1), ("test-clean", 2)):
        chapter = tmp_path / subset / "19" / "198"
        chapter.mkdir(parents=True)
        lines = []
        for i in range(n):
            sf.write(chapter / f"19-198-{i:04d}.flac", _tone(2.0 + 0.1 * i), 16000)
            lines.append(f"19-198-{i:04d} NORTHANGER ABBEY CHAPTER {('ONE', 'TWO', 'THREE')[i]} IT'S")
        (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    dm = LibriSpeechDataModule(str(tmp_path), batch_size=2)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 3 and len(dm.dataset("val")) == 1
    batches = _epoch(dm, "train")
    assert [b["features"].shape[0] for b in batches] == [2, 1]
    first = dm.dataset("train")[0]
    assert dm.vocab.decode(first["tokens"].tolist()) == "northanger abbey chapter one it's"
    assert first["features"].shape == (201, 80)  # 2 s at a 10 ms hop, centred frames
    assert bool((first["lid"] == 0).all())  # English, the first language
    with pytest.raises(ValueError, match="does not exist"):
        LibriSpeechDataModule(str(tmp_path / "nope")).setup("fit")


def test_librispeech_digits_are_outside_the_vocabulary_and_counted(tmp_path, caplog):
    chapter = tmp_path / "dev-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    sf.write(chapter / "1-2-0000.flac", _tone(2.0), 16000)
    sf.write(chapter / "1-2-0001.flac", _tone(2.0), 16000)
    (chapter / "1-2.trans.txt").write_text("1-2-0000 CHAPTER 7\n1-2-0001 HELLO THERE\n")
    with caplog.at_level(logging.WARNING):
        dm = LibriSpeechDataModule(str(tmp_path), val_subsets=("dev-clean",))
        dm.setup("validate")
    assert len(dm.dataset("val")) == 1
    assert dm.skipped() == {"out_of_vocabulary": 1}
    assert "outside the vocabulary ['7']" in caplog.text


def test_common_voice_tsv_with_resampling(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(clips / "a.wav", _tone(2.0, rate=48000), 48000)  # CV ships 48 kHz clips
    sf.write(clips / "b.flac", _tone(2.0), 16000)
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"
    rows = "x\ta.wav\t¿Qué tal, señor?\t2\t0\t\t\t\tes\t\nx\tb.flac\t« Bonjour » dit-elle\t2\t0\t\t\t\tfr\t\n"
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        (tmp_path / name).write_text(header + rows, encoding="utf-8")
    dm = CommonVoiceDataModule(str(tmp_path), batch_size=4)
    dm.setup("fit")
    ds = dm.dataset("train")
    texts = [dm.vocab.decode(ds[i]["tokens"].tolist()) for i in range(2)]
    assert texts == ["qué tal señor", "bonjour dit elle"]
    assert ds[0]["features"].shape[0] == 201  # 2 s resampled 48 kHz -> 16 kHz
    assert bool((ds[0]["lid"] == 2).all()) and bool((ds[1]["lid"] == 3).all())  # es, fr
    (tmp_path / "bad.tsv").write_text("path\tnot_sentence\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        CommonVoiceDataModule(str(tmp_path), train_tsv="bad.tsv").setup("fit")


def _manifest_fixture(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, _tone(2.0), 16000)
    sf.write(tmp_path / "rate8k.wav", _tone(2.0, rate=8000), 8000)
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    rows = [
        {"audio": "good.wav", "text": "Hallo Welt", "language": "de"},
        {"audio": "rate8k.wav", "text": "resampled fine"},
        {"audio": "garbage.wav", "text": "unreadable"},
        {"audio": "empty.wav", "text": "empty audio"},
        {"audio": "missing.wav", "text": "no such file"},
        {"audio": "good.wav", "text": "declared wrong rate", "sample_rate": 8000},
        {"audio": "good.wav", "text": "   "},
        {"audio": "good.wav", "text": "日本語"},
        {"text": "no audio field"},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + ["{not json"]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_manifest_bad_input_is_skipped_logged_and_counted(tmp_path, caplog):
    path = _manifest_fixture(tmp_path)
    dm = ManifestDataModule(str(path), str(path), batch_size=3, max_skip_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
        batches = _epoch(dm, "train")  # a whole epoch: bad files are dropped from their batches, no crash
    ds = dm.dataset("train")
    # Malformed manifest lines (a missing field, invalid JSON) are counted in the same ledger as bad audio.
    assert ds.skipped == {"bad_manifest_line": 2, "empty_transcript": 1, "out_of_vocabulary": 1, "bad_audio": 4}
    assert dm.skipped()["bad_manifest_line"] == 4  # 2 splits x 2 lines
    assert sum(b["features"].shape[0] for b in batches if b is not None) == 2
    uids = [u for b in batches if b is not None for u in b["uids"]]
    assert len(uids) == 2
    assert "is empty (0 samples)" in caplog.text
    assert "has sample rate 16000 Hz but its manifest says 8000" in caplog.text
    assert "cannot read audio file" in caplog.text
    # The 8 kHz file was resampled: 2 s gives 201 frames at 16 kHz.
    good = [ds[i] for i in range(len(ds)) if ds[i] is not None]
    assert sorted(g["features"].shape[0] for g in good) == [201, 201]


def test_manifest_on_bad_error_raises_with_the_reason(tmp_path):
    path = _manifest_fixture(tmp_path)
    with pytest.raises(ValueError, match="line 9 is not a valid manifest row"):
        ManifestDataModule(str(path), str(path), on_bad="error").setup("fit")
    good = tmp_path / "only_bad_audio.jsonl"
    good.write_text(json.dumps({"audio": "garbage.wav", "text": "x"}) + "\n")
    dm = ManifestDataModule(str(good), str(good), on_bad="error")
    with pytest.raises(ValueError, match="cannot read audio file"):
        dm.setup("fit")  # the header probe finds it before training starts
    with pytest.raises(ValueError, match="manifest .* does not exist"):
        ManifestDataModule(str(tmp_path / "nope.jsonl"), str(path)).setup("fit")


def test_all_bad_batch_collates_to_none_and_a_good_batch_pads():
    assert collate_speech([None, None]) is None
    items = [
        {"features": torch.ones(5, 3), "tokens": torch.tensor([3, 4]), "lid": torch.zeros(5, dtype=torch.long),
         "kind": "mono", "uid": "a"},
        None,
        {"features": torch.ones(2, 3), "tokens": torch.tensor([5]), "lid": torch.ones(2, dtype=torch.long),
         "kind": "cs", "uid": "b"},
    ]  # fmt: skip
    batch = collate_speech(items)
    assert batch["features"].shape == (2, 5, 3) and batch["lengths"].tolist() == [5, 2]
    assert batch["features"][1, 2:].abs().sum() == 0 and batch["lid"][1].tolist() == [1, 1, -1, -1, -1]
    assert batch["targets"].tolist() == [3, 4, 5] and batch["target_lengths"].tolist() == [2, 1]


def test_frame_languages_follow_the_segments_exactly():
    entry = SpeechEntry("u", "x.wav", "a b", "en+de", "cs", [(0, 800, "en"), (1600, 3200, "de")])
    lid = frame_languages(entry, 22, ("en", "de"))
    # frame i is centred on sample 160 * i: [0, 800) -> frames 0..4, [1600, 3200) -> frames 10..19
    assert lid.tolist() == [0] * 5 + [-1] * 5 + [1] * 10 + [-1] * 2


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read audio file .*nothing.wav"):
        load_audio(tmp_path / "nothing.wav")


def test_vocab_and_too_fast_transcripts(tmp_path):
    vocab = CharVocab()
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['5', '€'\]"):
        vocab.encode("5€")
    sf.write(tmp_path / "short.wav", _tone(0.1), 16000)
    entry = SpeechEntry("s", str(tmp_path / "short.wav"), "a much too long transcript for a tenth of a second")
    ds = SpeechDataset([entry], vocab)
    assert ds[0] is None and ds.skipped == {"too_fast": 1}


@pytest.mark.skipif(not (POCKETSPHINX_ROOT and __import__("os").path.isdir(POCKETSPHINX_ROOT)),
                    reason="Debian package pocketsphinx-testdata is not installed")  # fmt: skip
def test_pocketsphinx_sanity_set():
    entries = pocketsphinx_entries()
    assert len(entries) == 10
    assert entries[0].text == "ten of clubs"
    ds = SpeechDataset(entries, CharVocab(), preload=True)
    assert len(ds) == 10 and not ds.skipped


def test_metric_groups_of_corpus_rows_old_and_new(tmp_path):
    new = {
        "id": "test-00001", "split": "test", "audio": "test/test-00001.wav", "text": "twenty", "kind": "mono",
        "language": "en", "segments": [[10, 900, "en"]], "engine": "flite", "voice": "slt", "speaker": "slt",
        "augment": [{"op": "noise", "kind": "white", "snr_db": 10.0}], "unseen_engine": True,
    }  # fmt: skip
    entry = corpus_entry(new, tmp_path)
    assert entry.audio == str(tmp_path / "test/test-00001.wav") and entry.segments == [(10, 900, "en")]
    assert metric_groups(entry) == (
        "mono", "engine_flite", "voice_flite_slt", "lang_en", "engine_flite_en", "unseen_engine", "augmented",
    )  # fmt: skip
    # rows written before engines were recorded: "voice": "engine:voice", no augmentation, no held-out engine
    old = {k: v for k, v in new.items() if k not in ("engine", "speaker", "augment", "unseen_engine")}
    old.update(voice="espeak:m7", kind="cs", language="en+de")
    assert metric_groups(corpus_entry(old, tmp_path)) == ("cs", "engine_espeak", "voice_espeak_m7")
    assert metric_groups(SpeechEntry("u", "x.wav", "hi", "en", "real")) == ("real", "lang_en")
    assert metric_groups(SpeechEntry("u", "x.wav", "hi")) == ("real",)


def _manifest(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.filterwarnings("ignore::moezoo.tasks.records.BadRecordWarning")
@pytest.mark.parametrize("broken", ["train", "val"])
def test_a_split_without_readable_audio_is_an_error_before_training(tmp_path, broken):
    """Issue 18 item 1: every file of a split missing used to 'succeed' with zero optimiser steps."""
    sf.write(tmp_path / "good.wav", _tone(2.0), 16000)
    good = _manifest(tmp_path, "good.jsonl", [{"audio": "good.wav", "text": "hello"}] * 3)
    bad = _manifest(tmp_path, "bad.jsonl", [{"audio": f"missing{i}.wav", "text": "hello"} for i in range(3)])
    manifests = {"train": good, "val": good, broken: bad}
    dm = ManifestDataModule(manifests["train"], manifests["val"], preload=False)
    with pytest.raises(ValueError, match=rf"the {broken} split has no usable records .*missing0.wav"):
        dm.setup("fit")


def test_skipped_files_are_named_in_a_warning_and_capped_by_max_skip_fraction(tmp_path):
    """Issue 18 item 1: one unreadable file of 40 is a counted, warned skip; 3 of 40 exceed the 5 % default."""
    sf.write(tmp_path / "good.wav", _tone(0.5), 16000)
    rows = [{"audio": "good.wav", "text": "hello"}] * 39 + [{"audio": "gone.wav", "text": "hello"}]
    one_bad = _manifest(tmp_path, "one_bad.jsonl", rows)
    dm = ManifestDataModule(one_bad, one_bad)
    with pytest.warns(BadRecordWarning, match="gone.wav"):
        dm.setup("fit")
    assert len(dm.dataset("train")) == 39 and dm.records.skipped("train") == {"bad_audio": 1}
    assert "train: skipped: bad_audio 1; first: " in dm.records.summary()
    three_bad = _manifest(tmp_path, "three_bad.jsonl", rows[:37] + rows[-1:] * 3)
    with pytest.raises(ValueError, match=r"3 of 40 records of the train split .*max_skip_fraction=0.05"):
        with pytest.warns(BadRecordWarning):
            ManifestDataModule(three_bad, one_bad).setup("fit")
    dm = ManifestDataModule(three_bad, one_bad, max_skip_fraction=0.1)
    with pytest.warns(BadRecordWarning):
        dm.setup("fit")
    assert len(dm.dataset("train")) == 37
    with pytest.raises(ValueError, match=r"max_skip_fraction must be a number in \[0, 1\], got 1.5"):
        ManifestDataModule(one_bad, one_bad, max_skip_fraction=1.5)


def test_manifest_line_skips_share_the_ledger_summary_and_max_skip_fraction(tmp_path, caplog):
    """Bad manifest lines count against max_skip_fraction of their split, in the one per-split summary."""
    sf.write(tmp_path / "good.wav", _tone(2.0), 16000)
    good = json.dumps({"audio": "good.wav", "text": "hello"})
    lines = [good] * 9 + ["{not json"]  # 1 bad line of 10: 10 %
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(BadRecordWarning, match=r"m.jsonl:10"):
        with pytest.raises(ValueError, match=r"1 of 10 records of the train split.*max_skip_fraction=0.05"):
            ManifestDataModule(str(path), str(path)).setup("fit")
    dm = ManifestDataModule(str(path), str(path), max_skip_fraction=0.1)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.dataset("train")) == 9
    assert dm.dataset("train").skipped == {"bad_manifest_line": 1}
    assert "train split: 9 of 10 usable" in caplog.text and "bad_manifest_line 1" in caplog.text
    assert "train: skipped: bad_manifest_line 1" in dm.records.summary()
