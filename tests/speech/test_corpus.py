"""The generated corpus: deterministic plans, held-out voices and engines (a speaker in one split), acoustic
conditions, exact language segments, clear errors without TTS programs or voices."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from moezoo.tasks.speech import corpus
from moezoo.tasks.speech.augment import AUGMENTATIONS
from moezoo.tasks.speech.corpus import (
    ENGINE_PROGRAMS,
    ENGINES,
    ENGINES3,
    PRESETS,
    SPLITS,
    VOICES,
    CorpusSpec,
    Phrase,
    UtterancePlan,
    Voice,
    generate_corpus,
    missing_engines,
    missing_packages,
    plan_corpus,
    render_utterance,
    split_voices,
)
from moezoo.tasks.speech.data import SpeechCorpusDataModule
from moezoo.tasks.speech.text import CharVocab

needs_tts = pytest.mark.skipif(
    bool(missing_engines()), reason=f"TTS programs {missing_engines()} not installed (apt-get install espeak-ng flite)"
)
ALL_VOICES = CorpusSpec(engines=ENGINES, languages=("en", "de", "es", "fr", "it"))
# festival's program and voices only (espeak-ng and flite are needs_tts)
FESTIVAL_MISSING = {k: p for k, p in missing_packages(ALL_VOICES).items() if "festival" in k or p == "festival"}
needs_festival = pytest.mark.skipif(
    bool(FESTIVAL_MISSING),
    reason=f"festival or its voices are missing: {FESTIVAL_MISSING} "
    f"(apt-get install {' '.join(dict.fromkeys(FESTIVAL_MISSING.values()))})",
)
TINY = CorpusSpec(num_train=4, num_val=2, num_test=2, code_switch_frac=0.5, max_number=100, seed=3)
LEGACY_FIELDS = ("uid", "split", "kind", "engine", "voice", "speed", "pitch", "gain", "pauses_ms")
# sha256 of the original presets' plans (espeak + flite, no augmentation), recorded before festival, leave-one-engine-
# out and augmentation were added: the released speech checkpoints are evaluated on the default corpus.
LEGACY_PLANS = {
    "default": "c3aa0170766e573089f7da4b44df0a24d54d93fefe9e742209c52dbf8413e5be",
    "smoke": "7cde775ed9bf8059ab31678879c566647b9c9a7e02b25594845959a324139adc",
    "quick": "2d0f479c10557f7bd73553c1bc1fce11e57ffd05e245b049af1eef1ac40a6f2f",
}


def _plan_digest(plans: list[UtterancePlan]) -> str:
    rows = [
        [p.uid, p.split, p.kind, [[ph.lang, ph.text] for ph in p.phrases], p.engine, p.voice, p.speed, p.pitch,
         p.gain, p.pauses_ms]
        for p in plans
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@pytest.mark.parametrize("preset", sorted(LEGACY_PLANS))
def test_the_original_corpora_are_planned_exactly_as_before(preset):
    spec = PRESETS[preset]
    assert spec.name.endswith("_s0") and "_eng-" not in spec.name  # the cache folder keeps its name
    plans = plan_corpus(spec)
    assert _plan_digest(plans) == LEGACY_PLANS[preset]
    assert all(not p.augment and p.unseen_engine is None for p in plans)


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


@pytest.mark.parametrize("holdout", [None, *ENGINES3])
@pytest.mark.parametrize("languages", [("en", "de", "es", "fr"), ("en", "de", "es", "fr", "it")])
def test_a_speaker_lives_in_one_split_and_a_held_out_engine_only_in_test(holdout, languages):
    spec = CorpusSpec(engines=ENGINES3, holdout_engine=holdout, languages=languages)
    voices = split_voices(spec)
    speakers = {split: {v.speaker for v in members} for split, members in voices.items()}
    assert not speakers["train"] & speakers["val"] and not speakers["train"] & speakers["test"]
    assert not speakers["val"] & speakers["test"]
    if holdout is not None:
        assert {v.engine for v in voices["train"] + voices["val"]} == set(ENGINES3) - {holdout}
        held = [v for v in VOICES if v.engine == holdout and set(v.languages) & set(languages) and not v.extra]
        assert set(held) <= set(voices["test"])  # every voice of the engine, whatever its usual split
    # the speakers two engines share (CMU's KAL diphones, CMU ARCTIC SLT) follow the held-out engine
    kal16, kal_diphone = (next(v for v in VOICES if v.name == n) for n in ("kal16", "kal_diphone"))
    assert kal16.speaker == kal_diphone.speaker
    used = [v for members in voices.values() for v in members]
    if holdout == "festival":
        assert kal16 not in used and kal_diphone in voices["test"]
    if holdout == "flite":
        assert kal_diphone not in used and kal16 in voices["test"]


def test_extra_espeak_variants_only_add_training_voices():
    base = CorpusSpec(engines=ENGINES3, holdout_engine="flite")
    extra = dataclasses.replace(base, espeak_extra=True)
    assert extra.name == base.name + "_espx"
    plain, more = split_voices(base), split_voices(extra)
    assert more["val"] == plain["val"] and more["test"] == plain["test"]
    added = set(more["train"]) - set(plain["train"])
    assert len(added) == 53 and all(v.engine == "espeak" and v.extra for v in added)
    plans = plan_corpus(dataclasses.replace(extra, num_train=400, num_val=10, num_test=10))
    assert len({p.voice for p in plans if p.engine == "espeak"}) > 60


def test_the_splitter_checks_speaker_identity(monkeypatch):
    # festival's KAL voice put in val while flite's (the same speaker) trains: refused
    moved = tuple(dataclasses.replace(v, split="val") if v.name == "kal_diphone" else v for v in VOICES)
    monkeypatch.setattr(corpus, "VOICES", moved)
    with pytest.raises(AssertionError, match=r"speakers \{'kal'\} in both train and val"):
        split_voices(CorpusSpec(engines=ENGINES3))
    # a voice of a new speaker in val is fine
    extra = (*VOICES, Voice("festival", "xyz_diphone", ("en",), "xyz", "val", "festvox-xyz"))
    monkeypatch.setattr(corpus, "VOICES", extra)
    assert extra[-1] in split_voices(CorpusSpec(engines=ENGINES3))["val"]


@pytest.mark.parametrize("holdout", ENGINES3)
def test_leave_one_engine_out_plans(holdout):
    spec = CorpusSpec(num_train=600, num_val=60, num_test=300, engines=ENGINES3, holdout_engine=holdout)
    plans = plan_corpus(spec)
    assert [dataclasses.asdict(p) for p in plans] == [dataclasses.asdict(p) for p in plan_corpus(spec)]
    by_split = {s: [p for p in plans if p.split == s] for s in SPLITS}
    assert all(p.engine != holdout and p.unseen_engine is None for p in by_split["train"] + by_split["val"])
    train_speakers = {p.speaker for p in by_split["train"] + by_split["val"]}
    test = by_split["test"]
    assert all(p.unseen_engine == (p.engine == holdout) for p in test)
    unseen = [p for p in test if p.unseen_engine]
    assert 0.4 < len(unseen) / len(test) < 0.6
    assert not {p.speaker for p in unseen} & train_speakers
    trained_langs = {ph.lang for p in by_split["train"] for ph in p.phrases}
    assert {ph.lang for p in unseen for ph in p.phrases} <= trained_langs
    if holdout == "espeak":  # flite and festival speak English only: no code-switching, no other language
        assert trained_langs == {"en"} and all(p.kind == "mono" for p in plans)
    else:
        assert {p.engine for p in by_split["train"]} == set(ENGINES3) - {holdout}
        assert len({p.voice for p in unseen}) >= 3


def test_acoustic_conditions_are_planned_per_split_and_leave_the_rest_unchanged():
    base = CorpusSpec(num_train=300, num_val=20, num_test=40, engines=ENGINES3, holdout_engine="flite")
    spec = dataclasses.replace(base, augment=("noise", "reverb", "speed"), augment_prob=0.5)
    assert spec.name == base.name + "_aug-speed-reverb-noise-p0.5-train"
    clean, noisy = plan_corpus(base), plan_corpus(spec)
    strip = [dataclasses.replace(p, augment=[]) for p in noisy]
    assert [dataclasses.asdict(p) for p in strip] == [dataclasses.asdict(p) for p in clean]
    assert all(not p.augment for p in noisy if p.split != "train")
    ops = Counter(s["op"] for p in noisy for s in p.augment)
    assert set(ops) == {"noise", "reverb", "speed"} and all(100 < c < 200 for c in ops.values()), ops
    both = dataclasses.replace(spec, augment_splits=("train", "test"))
    assert any(p.augment for p in plan_corpus(both) if p.split == "test")


def test_each_utterance_is_planned_from_its_own_seed():
    # utterance i of a split gets the same text, voice and conditions whatever the split sizes: its plan comes
    # from the seed, the split and i alone
    small = CorpusSpec(num_train=40, num_val=10, num_test=30, engines=ENGINES3, holdout_engine="festival",
                       augment=AUGMENTATIONS, augment_prob=0.5, augment_splits=("train", "test"))  # fmt: skip
    large = dataclasses.replace(small, num_train=70, num_val=5, num_test=50)
    plans, more = plan_corpus(small), {p.uid: dataclasses.asdict(p) for p in plan_corpus(large)}
    shared = [p for p in plans if p.uid in more]
    assert len(shared) == 40 + 5 + 30 and all(dataclasses.asdict(p) == more[p.uid] for p in shared)
    assert any(p.augment for p in shared if p.split == "test")
    # another corpus seed plans other utterances and other conditions
    other = plan_corpus(dataclasses.replace(small, seed=1))
    assert sum(a.phrases == b.phrases for a, b in zip(plans, other)) < 0.3 * len(plans)
    assert sum(a.augment == b.augment for a, b in zip(plans, other) if a.split == "train") < 0.5 * 40


def test_corpus_cli_switches_conditions_on(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(
        corpus, "generate_corpus", lambda spec, root, workers: seen.append(spec) or tmp_path / spec.name
    )
    args = ["--preset", "loeo_flite", "--root", str(tmp_path), "--augment", "codec", "noise", "--augment-prob", "0.2"]
    assert corpus.main(args) == 0
    assert seen[-1] == dataclasses.replace(PRESETS["loeo_flite"], augment=("codec", "noise"), augment_prob=0.2)
    assert capsys.readouterr().out.strip() == str(tmp_path / seen[-1].name)
    assert corpus.main(["--preset", "smoke"]) == 0 and seen[-1] == PRESETS["smoke"]  # the presets as they are
    assert corpus.main(["--preset", "smoke", "--augment", "wind"]) == 1
    assert "augment must be distinct ops" in capsys.readouterr().err
    assert corpus.main(["--preset", "smoke", "--augment", "noise", "--augment-prob", "0"]) == 1
    assert "augment_prob must be in (0, 1]" in capsys.readouterr().err


def test_bad_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="languages must be a non-empty subset"):
        CorpusSpec(languages=("en", "xx"))
    with pytest.raises(ValueError, match="num_val must be >= 1"):
        CorpusSpec(num_val=0)
    with pytest.raises(ValueError, match="preset must be one of"):
        SpeechCorpusDataModule(preset="huge")
    with pytest.raises(ValueError, match="engines must be distinct names"):
        CorpusSpec(engines=("espeak", "piper"))
    with pytest.raises(ValueError, match="holdout_engine must be None or one of"):
        CorpusSpec(holdout_engine="festival")  # not among the default engines
    with pytest.raises(ValueError, match="leave the val split without a voice"):
        CorpusSpec(engines=("festival",))
    with pytest.raises(ValueError, match="needs test voices of another engine"):
        CorpusSpec(engines=("espeak", "festival"), holdout_engine="festival", languages=("de", "fr"))  # no voice
    with pytest.raises(ValueError, match="augment must be distinct ops"):
        SpeechCorpusDataModule(preset="loeo_flite", augment=["noise", "wind"])
    with pytest.raises(ValueError, match="augment_splits must be"):
        CorpusSpec(augment=("noise",), augment_splits=("dev",))


def test_missing_tts_engines_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"needs the TTS programs \['espeak-ng', 'flite'\].*apt-get install"):
        generate_corpus(TINY, tmp_path)
    three = r"'espeak-ng', 'flite', 'text2wave'\].*package festival.*install espeak-ng "
    with pytest.raises(RuntimeError, match=three):
        generate_corpus(dataclasses.replace(TINY, engines=ENGINES3), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_missing_festival_voice_names_its_package(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(corpus, "festival_voices", lambda: frozenset({"kal_diphone", "cmu_us_slt_arctic_hts"}))
    spec = dataclasses.replace(TINY, engines=ENGINES3, languages=("en", "it"), code_switch_frac=0.0)
    assert missing_packages(spec) == {
        "the festival voice ked_diphone": "festvox-kdlpc16k",
        "the festival voice pc_diphone": "festvox-itapc16k",
        "the festival voice lp_diphone": "festvox-italp16k",
    }
    with pytest.raises(RuntimeError, match=r"ked_diphone: package festvox-kdlpc16k.*apt-get install festvox-kdlpc16k "):
        generate_corpus(spec, tmp_path)
    # without Italian the Italian voices are not needed
    assert set(missing_packages(dataclasses.replace(spec, languages=("en",)))) == {"the festival voice ked_diphone"}


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


def _plan(engine: str, voice: str, phrases: list[tuple[str, str]], augment=(), speed=1.0, pitch=0.0) -> UtterancePlan:
    return UtterancePlan(
        "train-00000", "train", "mono", [Phrase(lang, text) for lang, text in phrases], engine, voice, speed, pitch,
        0.8, [100] * (len(phrases) + 1), voice, None, list(augment),
    )  # fmt: skip


def _check_row(row: dict, folder, languages) -> np.ndarray:
    audio, rate = sf.read(folder / row["audio"], dtype="float32")
    assert rate == 16000 and audio.size == row["num_samples"]
    inside = np.zeros(audio.size, dtype=bool)
    previous_end = 0
    for start, end, lang in row["segments"]:
        assert previous_end < start < end <= audio.size and lang in languages
        inside[start:end] = True
        previous_end = end
    return audio


@needs_festival
@pytest.mark.parametrize(
    ("voice", "phrases", "pitch"),
    [
        ("kal_diphone", [("en", "twenty one"), ("en", "four hundred")], 130.0),
        ("cmu_us_slt_arctic_hts", [("en", "ninety nine")], 0.0),  # 32 kHz, speech rate instead of stretch
        ("pc_diphone", [("it", "ventitré")], 0.0),  # Latin-1 on festival's stdin
    ],
)
def test_festival_voices_render_with_exact_segments(tmp_path, voice, phrases, pitch):
    (tmp_path / "train").mkdir()
    slow = render_utterance(_plan("festival", voice, phrases, speed=1.15, pitch=pitch), tmp_path, str(tmp_path))
    audio = _check_row(slow, tmp_path, ("en", "it"))
    assert np.abs(audio).max() > 0.3 and (slow["engine"], slow["voice"]) == ("festival", voice)
    fast = render_utterance(_plan("festival", voice, phrases, speed=0.85, pitch=pitch), tmp_path, str(tmp_path))
    assert fast["num_samples"] < 0.9 * slow["num_samples"]  # the speed setting reaches the engine


@needs_tts
def test_an_augmented_utterance_differs_and_keeps_its_length_rules(tmp_path):
    (tmp_path / "train").mkdir()
    phrases = [("en", "seventy"), ("de", "drei")]
    clean = render_utterance(_plan("espeak", "m3", phrases, speed=160.0, pitch=50.0), tmp_path, str(tmp_path))
    clean_audio = _check_row(clean, tmp_path, ("en", "de"))
    for steps in (
        [
            {"op": "reverb", "rt60": 0.4, "drr_db": 3.0, "predelay_ms": 5},
            {"op": "noise", "kind": "pink", "snr_db": 10.0},
        ],
        [{"op": "bandlimit", "mode": "telephone"}, {"op": "codec", "mode": "mulaw", "bits": 5}],
        [{"op": "pitch", "semitones": -2.0}],
    ):
        row = render_utterance(_plan("espeak", "m3", phrases, steps, 160.0, 50.0), tmp_path, str(tmp_path))
        audio = _check_row(row, tmp_path, ("en", "de"))
        assert row["augment"] == steps and row["segments"] == clean["segments"] and audio.size == clean_audio.size
        assert np.abs(audio - clean_audio).max() > 0.05
        again = render_utterance(_plan("espeak", "m3", phrases, steps, 160.0, 50.0), tmp_path, str(tmp_path))
        assert again == row and np.array_equal(_check_row(again, tmp_path, ("en", "de")), audio)  # a plan, one audio
    slow = [{"op": "speed", "factor": 0.9}]
    row = render_utterance(_plan("espeak", "m3", phrases, slow, 160.0, 50.0), tmp_path, str(tmp_path))
    _check_row(row, tmp_path, ("en", "de"))
    assert row["num_samples"] == -(-10 * clean["num_samples"] // 9)  # ceil(n / 0.9)
    for (a, b, _), (c, d, _) in zip(clean["segments"], row["segments"]):
        assert abs(c - a / 0.9) <= 1 and abs(d - b / 0.9) <= 1


@needs_tts
@needs_festival
def test_a_leave_one_engine_out_corpus_with_conditions_loads_with_its_groups(tmp_path):
    spec = dataclasses.replace(
        PRESETS["loeo_flite"], num_train=6, num_val=2, num_test=8, max_number=100, seed=5, augment=AUGMENTATIONS,
        augment_prob=0.5,
    )  # fmt: skip
    folder = generate_corpus(spec, tmp_path, progress=False)
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        _check_row(row, folder, spec.languages)
        assert {"engine", "voice", "speaker", "language", "augment"} <= set(row)
        assert ("unseen_engine" in row) == (row["split"] == "test")
        assert (row["engine"] == "flite") == bool(row.get("unseen_engine"))
    assert any(row["augment"] for row in rows) and not any(row["augment"] for row in rows if row["split"] != "train")
    dm = SpeechCorpusDataModule(
        preset="loeo_flite", root=str(tmp_path), num_train=6, num_val=2, num_test=8, max_number=100, corpus_seed=5,
        augment=list(AUGMENTATIONS), augment_prob=0.5, batch_size=8,
    )  # fmt: skip
    assert dm.spec == spec
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    groups = {g for gs in batch["groups"] for g in gs}
    assert {"unseen_engine", "seen_engine", "engine_flite", "engine_flite_en", "lang_en"} <= groups


def test_every_engine_and_voice_package_installs_from_the_project_files():
    # the Makefile's system-deps step installs what the corpus can ask for, and the README names it
    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    lines = makefile.replace("\\\n", " ").splitlines()
    speech = next(line for line in lines if line.startswith("SPEECH_PACKAGES :=")).split(":=")[1].split()
    apt = next(line for line in lines if line.startswith("APT_PACKAGES :=")).split(":=")[1].split()
    assert "$(SPEECH_PACKAGES)" in apt
    needed = {package for programs in ENGINE_PROGRAMS.values() for _, package in programs} | {v.package for v in VOICES}
    assert needed == set(speech), f"Makefile SPEECH_PACKAGES {speech} vs the corpus's packages {sorted(needed)}"
    readme = (root / "README.md").read_text()
    assert all(package in readme for package in needed)
