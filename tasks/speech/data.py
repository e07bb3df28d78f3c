"""Speech data: the generated corpus (embedded default), LibriSpeech, Common Voice, JSONL manifests, and the
10 recorded utterances of Debian's ``pocketsphinx-testdata`` as an out-of-domain sanity set.

Audio is read with ``soundfile`` and resampled to 16 kHz with torchaudio; features are 80-dim log-mel
spectrograms (25 ms windows, 10 ms hop), normalised per utterance. Bad input never crashes an epoch: empty
transcripts, characters outside the vocabulary and over-long utterances are skipped when the list is read;
unreadable, missing or empty audio and declared sample rates that do not match the file are skipped when the
dataset is built (a header read; :func:`probe_audio`) or, for damage past the header, when they are loaded.
Every skip is warned about naming the file and counted by split and reason in one
:class:`~moezoo.tasks.records.BadRecords` ledger (``dataset.skipped``); a split with no usable utterance, or
more unreadable files than ``max_skip_fraction``, is an error before training starts; ``on_bad="error"`` raises at
the first bad utterance instead.

Why one long file: the four sources (generated corpus, LibriSpeech, Common Voice, manifests) share one entry type,
vocabulary, feature pipeline, bad-record ledger and predict path; each source is a short subclass of
:class:`SpeechDataModule`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from moezoo.data.transforms import SPEECH_HOP as HOP
from moezoo.data.transforms import SPEECH_N_FFT as N_FFT
from moezoo.data.transforms import LogMel
from moezoo.tasks.records import DEFAULT_MAX_SKIP_FRACTION, BadRecords
from moezoo.tasks.speech.corpus import LANGUAGES, PRESETS, SAMPLE_RATE, CorpusSpec, generate_corpus
from moezoo.tasks.speech.text import CharVocab, normalize_text

log = logging.getLogger(__name__)
POCKETSPHINX_ROOT = "/usr/share/pocketsphinx/test/data"


class BadAudioError(ValueError):
    """An audio file that cannot be used (unreadable, empty, wrong declared sample rate)."""


@dataclass
class SpeechEntry:
    """One utterance: audio path, normalised text, language(s) and, when known, exact language segments."""

    uid: str
    audio: str
    text: str
    language: str | None = None
    kind: str = "real"  # "mono" / "cs" for the generated corpus
    segments: list[tuple[int, int, str]] | None = None  # (start sample, end sample, language) at 16 kHz
    sample_rate: int | None = None  # declared by the manifest, checked against the file
    engine: str | None = None  # the TTS engine of a generated utterance
    voice: str | None = None  # and its voice
    unseen_engine: bool | None = None  # leave-one-engine-out test: the engine is absent from train and val
    augmented: bool = False  # acoustic conditions were applied


def metric_groups(entry: SpeechEntry) -> tuple[str, ...]:
    """The groups an utterance's errors are also counted in (``cer_<group>``): its kind (``mono``, ``cs``,
    ``real``), ``engine_<e>``, ``voice_<e>_<v>``, ``lang_<l>`` and ``engine_<e>_<l>`` (single-language
    utterances), ``unseen_engine`` / ``seen_engine`` (leave-one-engine-out test sets) and ``augmented``."""
    groups = [entry.kind]
    single = entry.language if entry.language and "+" not in entry.language else None
    if entry.engine:
        groups.append(f"engine_{entry.engine}")
        if entry.voice:
            groups.append(f"voice_{entry.engine}_{entry.voice}")
    if single:
        groups.append(f"lang_{single}")
    if entry.engine and single:
        groups.append(f"engine_{entry.engine}_{single}")
    if entry.unseen_engine is not None:
        groups.append("unseen_engine" if entry.unseen_engine else "seen_engine")
    if entry.augmented:
        groups.append("augmented")
    return tuple(groups)


def _check_audio(path: str | Path, frames: int, rate: int, declared_rate: int | None) -> None:
    if frames == 0:
        raise BadAudioError(f"audio file {str(path)!r} is empty (0 samples)")
    if declared_rate is not None and declared_rate != rate:
        raise BadAudioError(f"audio file {str(path)!r} has sample rate {rate} Hz but its manifest says {declared_rate}")


def probe_audio(path: str | Path, declared_rate: int | None = None) -> None:
    """Read only the header of an audio file: :class:`BadAudioError` when it is missing, unreadable, empty or of
    another sample rate than declared (the checks of :func:`load_audio` that need no decoding)."""
    try:
        info = sf.info(str(path))
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError or OSError
        raise BadAudioError(f"cannot read audio file {str(path)!r}: {err}") from err
    _check_audio(path, info.frames, info.samplerate, declared_rate)


def load_audio(path: str | Path, target_rate: int = SAMPLE_RATE, declared_rate: int | None = None) -> Tensor:
    """Mono float32 waveform at ``target_rate``; :class:`BadAudioError` naming the file and the problem (unreadable,
    empty, another sample rate than declared, NaN or infinite samples, shorter than one analysis window)."""
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError or OSError
        raise BadAudioError(f"cannot read audio file {str(path)!r}: {err}") from err
    _check_audio(path, audio.shape[0], rate, declared_rate)
    finite = np.isfinite(audio)
    if not finite.all():
        first = int(np.flatnonzero(~finite.all(1))[0])
        raise BadAudioError(f"audio file {str(path)!r} has NaN or infinite samples (first at sample {first})")
    wave = torch.from_numpy(audio).mean(1)
    if rate != target_rate:
        wave = AF.resample(wave, rate, target_rate)
    if wave.numel() < N_FFT:  # the log-mel features need one whole analysis window
        raise BadAudioError(
            f"audio file {str(path)!r} is too short: {wave.numel()} samples at {target_rate} Hz, fewer than one "
            f"{N_FFT}-sample analysis window"
        )
    return wave


def frame_languages(entry: SpeechEntry, num_frames: int, languages: Sequence[str]) -> Tensor:
    """Language index of every 10 ms frame (the sample at its centre), -1 for pauses and unknown languages."""
    lid_T = torch.full((num_frames,), -1, dtype=torch.long)
    index = {lang: i for i, lang in enumerate(languages)}
    if entry.segments is not None:
        centre_T = torch.arange(num_frames) * HOP
        for start, end, lang in entry.segments:
            if lang in index:
                lid_T[(centre_T >= start) & (centre_T < end)] = index[lang]
    elif entry.language in index:
        lid_T.fill_(index[entry.language])
    return lid_T


class SpeechDataset(Dataset):
    """Utterances as ``{"features" (T, M), "tokens" (S,), "lid" (T,), "kind", "groups", "uid"}``; a bad file gives
    ``None`` (``groups``: see :func:`metric_groups`).

    ``preload=True`` computes every feature once (bad files are dropped then); otherwise every file's header is
    probed here (unreadable files are dropped) and audio is read lazily. Skips go to ``records`` under ``split``
    (a ledger of its own when None), which then checks the split (:meth:`BadRecords.check`); ``unlisted`` records
    of the split were skipped (and counted in ``records``) before they became entries, e.g. malformed manifest lines.
    """

    def __init__(
        self,
        entries: Sequence[SpeechEntry],
        vocab: CharVocab,
        languages: Sequence[str] = LANGUAGES,
        max_duration: float | None = None,
        on_bad: str = "skip",
        preload: bool = False,
        n_mels: int = 80,
        split: str = "train",
        records: BadRecords | None = None,
        unlisted: int = 0,
    ) -> None:
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
        self.vocab = vocab
        self.languages = tuple(languages)
        self.on_bad = on_bad
        self.max_duration = max_duration
        self.featurizer = LogMel(n_mels)
        self.split = split
        self.records = BadRecords("speech") if records is None else records
        self.entries = [e for e in entries if self._text_ok(e)]
        self.broken: set[int] = set()  # entries found unreadable while loading (skipped and counted once)
        self.cache: list[dict[str, Any] | None] | None = None
        if preload:
            cache = [self._load(i) for i in range(len(self.entries))]
            keep = [i for i, item in enumerate(cache) if item is not None]
            self.entries = [self.entries[i] for i in keep]
            self.cache = [cache[i] for i in keep]
            self.broken.clear()  # indices of the entries before the bad ones were dropped
        else:
            self.entries = [e for e in self.entries if self._audio_ok(e)]
        self.records.check(split, len(entries) + unlisted)

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped utterances of this dataset's split, by reason."""
        return self.records.skipped(self.split)

    def _skip(self, reason: str, message: str, entry: SpeechEntry) -> None:
        if self.on_bad == "error":
            raise ValueError(message)
        bad = reason not in ("too_long", "too_fast", "out_of_vocabulary")  # filters, not damaged records
        self.records.skip(self.split, reason, f"{entry.uid} ({entry.audio})", message, bad=bad)
        log.warning("skipping utterance: %s", message)

    def _audio_ok(self, entry: SpeechEntry) -> bool:
        try:
            probe_audio(entry.audio, entry.sample_rate)
        except BadAudioError as err:
            self._skip("bad_audio", str(err), entry)
            return False
        return True

    def _text_ok(self, entry: SpeechEntry) -> bool:
        if not entry.text:
            self._skip("empty_transcript", f"{entry.uid}: the transcript is empty", entry)
            return False
        bad = self.vocab.unknown(entry.text)
        if bad:
            self._skip(
                "out_of_vocabulary", f"{entry.uid}: characters outside the vocabulary {bad} in {entry.text!r}", entry
            )
            return False
        return True

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        if index in self.broken:
            return None  # counted once, when it was first read
        try:
            wave = load_audio(entry.audio, SAMPLE_RATE, entry.sample_rate)
        except BadAudioError as err:
            self.broken.add(index)
            self._skip("bad_audio", str(err), entry)
            return None
        duration = wave.numel() / SAMPLE_RATE
        if self.max_duration is not None and duration > self.max_duration:
            self.broken.add(index)
            self._skip(
                "too_long", f"{entry.uid}: {duration:.1f} s is longer than max_duration={self.max_duration}", entry
            )
            return None
        features = self.featurizer(wave)
        tokens = torch.tensor(self.vocab.encode(entry.text), dtype=torch.long)
        if tokens.numel() > (features.shape[0] + 3) // 4:
            self.broken.add(index)
            self._skip(
                "too_fast", f"{entry.uid}: {tokens.numel()} characters do not fit {features.shape[0]} frames", entry
            )
            return None
        lid = frame_languages(entry, features.shape[0], self.languages)
        groups = metric_groups(entry)
        return {
            "features": features,
            "tokens": tokens,
            "lid": lid,
            "kind": entry.kind,
            "groups": groups,
            "uid": entry.uid,
        }

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self.cache is not None:
            return self.cache[index]
        return self._load(index)


def collate_speech(items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Pad a batch (features with 0, LID labels with -1); ``None`` items (bad files) are dropped."""
    good = [it for it in items if it is not None]
    if not good:
        return None
    lengths = torch.tensor([it["features"].shape[0] for it in good])
    batch, frames, mels = len(good), int(lengths.max()), good[0]["features"].shape[1]
    features = torch.zeros(batch, frames, mels)
    lid = torch.full((batch, frames), -1, dtype=torch.long)
    for b, it in enumerate(good):
        features[b, : lengths[b]] = it["features"]
        lid[b, : lengths[b]] = it["lid"]
    return {
        "features": features,
        "lengths": lengths,
        "targets": torch.cat([it["tokens"] for it in good]),
        "target_lengths": torch.tensor([it["tokens"].numel() for it in good]),
        "lid": lid,
        "kinds": [it["kind"] for it in good],
        "groups": [it.get("groups", (it["kind"],)) for it in good],
        "uids": [it["uid"] for it in good],
    }


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def list_audio(path: str | Path) -> list[Path]:
    """Audio files of a predict input: a folder (recursive, sorted), one audio file, or a list file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    elif path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
        files = [path]
    elif path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        files = [(path.parent / line) for line in lines if line and not line.startswith("#")]
    else:
        raise FileNotFoundError(f"predict_path={str(path)!r} is not an audio file, a folder or a list of audio files")
    if not files:
        raise ValueError(f"predict_path={str(path)!r} names no audio files (looked for {', '.join(AUDIO_SUFFIXES)})")
    return files


class AudioFileDataset(Dataset):
    """Predict-only audio: items ``{"features", "uid", "file"}`` (the training log-mel features); a file that
    cannot be read gives ``None`` (dropped by :func:`collate_audio`, logged and counted in ``skipped``)."""

    def __init__(self, path: str | Path, n_mels: int = 80) -> None:
        self.files = list_audio(path)
        self.root = Path(path) if Path(path).is_dir() else Path(path).parent
        self.featurizer = LogMel(n_mels)
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        file = self.files[index]
        try:
            wave = load_audio(file)
        except BadAudioError as err:
            self.skipped[str(file)] = str(err)
            log.warning("predict: skipped %s", err)
            return None
        name = str(file.relative_to(self.root)) if file.is_relative_to(self.root) else str(file)
        return {"features": self.featurizer(wave), "uid": Path(name).stem, "file": name}


def collate_audio(items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Pad predict-only features with 0; ``None`` items (bad files) are dropped."""
    good = [it for it in items if it is not None]
    if not good:
        return None
    lengths = torch.tensor([it["features"].shape[0] for it in good])
    features = torch.zeros(len(good), int(lengths.max()), good[0]["features"].shape[1])
    for b, it in enumerate(good):
        features[b, : lengths[b]] = it["features"]
    return {
        "features": features,
        "lengths": lengths,
        "uids": [it["uid"] for it in good],
        "files": [it["file"] for it in good],
    }


class SpeechDataModule(L.LightningDataModule):
    """Shared options of every speech source; subclasses provide :meth:`entries` per split.

    Args:
        batch_size: utterances per batch.
        num_workers: DataLoader workers.
        languages: language codes in LID-label order (the experts of LR-MoE).
        max_duration: skip training utterances longer than this (seconds); ``None`` keeps all.
        on_bad: ``"skip"`` (log and count) or ``"error"`` for bad transcripts and audio.
        preload: compute every feature in ``setup`` (small corpora) instead of reading audio per batch.
        predict_path: audio to transcribe with ``predict``, without any corpus: a folder (searched recursively for
            ``.wav``/``.flac``/``.ogg``), one audio file, or a text file listing audio paths (one a line, relative
            to the list's folder). Without it, ``predict`` transcribes the test split.
        max_skip_fraction: the largest share of a split's utterances that may be unreadable or malformed
            (otherwise ``setup`` raises; :mod:`moezoo.tasks.records`).
    """

    def __init__(
        self,
        batch_size: int = 16,
        num_workers: int = 0,
        languages: Sequence[str] = LANGUAGES,
        max_duration: float | None = 20.0,
        on_bad: str = "skip",
        preload: bool = False,
        predict_path: str | None = None,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.languages = tuple(languages)
        self.max_duration = max_duration
        self.on_bad = on_bad
        self.preload = preload
        self.records = BadRecords(type(self).__name__, max_skip_fraction)
        self.vocab = CharVocab()
        self.datasets: dict[str, SpeechDataset] = {}
        self.unlisted: Counter[str] = Counter()  # per split: records skipped before they became entries
        self.predict_path = predict_path
        self.predict_set: AudioFileDataset | None = None

    def model_settings(self) -> dict[str, tuple[object, str]]:
        """What the model must match: ``{model kwarg: (value, this module's key)}`` (``moezoo fit`` links them)."""
        return {"vocab_size": (len(self.vocab), "vocab"), "num_languages": (len(self.languages), "languages")}

    def entries(self, split: str) -> list[SpeechEntry]:
        raise TypeError(f"{type(self).__name__} must override entries(split)")

    def dataset(self, split: str) -> SpeechDataset:
        if split not in self.datasets:
            max_duration = self.max_duration if split == "train" else None
            self.datasets[split] = SpeechDataset(
                self.entries(split),
                self.vocab,
                self.languages,
                max_duration,
                self.on_bad,
                self.preload,
                split=split,
                records=self.records,
                unlisted=self.unlisted[split],
            )
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_path is not None:
            if self.predict_set is None:
                self.predict_set = AudioFileDataset(self.predict_path)
            return
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage or "", ("train", "val", "test")):
            self.dataset(split)

    def skipped(self) -> dict[str, int]:
        return self.records.skipped()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_speech,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_path`` audio, or the test split without it."""
        if self.predict_path is None:
            return self._loader("test", shuffle=False)
        if self.predict_set is None:
            self.predict_set = AudioFileDataset(self.predict_path)
        return DataLoader(
            self.predict_set, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_audio
        )


def _spec_from(preset: str, overrides: dict[str, Any]) -> CorpusSpec:
    """``PRESETS[preset]`` with every override that is not ``None`` (lists become tuples)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[preset], **fields)


def corpus_entry(row: dict[str, Any], folder: Path) -> SpeechEntry:
    """A manifest row of the generated corpus as an entry (rows written before engines were recorded name theirs
    in ``voice`` as ``engine:voice``)."""
    engine, voice = row.get("engine"), row.get("voice")
    if engine is None and voice:
        engine, _, voice = str(voice).partition(":")
    return SpeechEntry(
        row["id"], str(folder / row["audio"]), row["text"], row["language"], row["kind"],
        [tuple(s) for s in row["segments"]], SAMPLE_RATE, engine or None, voice or None, row.get("unseen_engine"),
        bool(row.get("augment")),
    )  # fmt: skip


class SpeechCorpusDataModule(SpeechDataModule):
    """The embedded default: the generated multilingual / code-switched corpus (see :mod:`.corpus`).

    Args:
        preset: ``"default"`` (3000/200/400 utterances, espeak + flite, held-out voices), ``"quick"``
            (1200/100/240), ``"smoke"`` (24/8/8), ``"engines"`` (default + festival) or ``"loeo_espeak"``,
            ``"loeo_flite"``, ``"loeo_festival"`` (three engines, that one only in test); ``"engines5"`` and
            ``"loeo5_<engine>"`` the same with pico and mbrola too (Debian contrib/non-free).
        root: cache root (default ``$MOEZOO_DATA_DIR/speech`` or ``~/.cache/moezoo/speech``); never the repo.
        num_train, num_val, num_test, code_switch_frac, max_number, corpus_seed: override the preset.
        engines, holdout_engine, heldout_test_frac, non_espeak_frac: override the preset (see
            :class:`~moezoo.tasks.speech.corpus.CorpusSpec`).
        augment: acoustic conditions to switch on, any of ``speed``, ``pitch``, ``reverb``, ``noise``,
            ``bandlimit``, ``codec`` (``[]`` switches all off); ``augment_prob``: each one's probability per
            utterance; ``augment_splits``: the splits they apply to (default ``["train"]``).
        espeak_extra: train on the 53 other espeak-ng variants too.
        generate_workers: parallel TTS processes when the corpus has to be generated.
        (the rest as in :class:`SpeechDataModule`; features are preloaded)
    """

    def __init__(
        self,
        preset: str = "default",
        root: str | None = None,
        languages: Sequence[str] = LANGUAGES,
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        code_switch_frac: float | None = None,
        max_number: int | None = None,
        corpus_seed: int | None = None,
        engines: Sequence[str] | None = None,
        holdout_engine: str | None = None,
        heldout_test_frac: float | None = None,
        non_espeak_frac: float | None = None,
        augment: Sequence[str] | None = None,
        augment_prob: float | None = None,
        augment_splits: Sequence[str] | None = None,
        espeak_extra: bool | None = None,
        generate_workers: int = 2,
        batch_size: int = 16,
        num_workers: int = 0,
        max_duration: float | None = 20.0,
        on_bad: str = "skip",
        predict_path: str | None = None,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        super().__init__(
            batch_size,
            num_workers,
            languages,
            max_duration,
            on_bad,
            preload=True,
            predict_path=predict_path,
            max_skip_fraction=max_skip_fraction,
        )
        overrides = dict(
            languages=languages,
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            code_switch_frac=code_switch_frac,
            max_number=max_number,
            seed=corpus_seed,
            engines=engines,
            holdout_engine=holdout_engine,
            heldout_test_frac=heldout_test_frac,
            non_espeak_frac=non_espeak_frac,
            augment=augment,
            augment_prob=augment_prob,
            augment_splits=augment_splits,
            espeak_extra=espeak_extra,
        )
        self.spec = _spec_from(preset, overrides)
        self.root = root
        self.generate_workers = generate_workers
        self._manifest: list[SpeechEntry] | None = None
        self._splits: list[str] = []

    def prepare_data(self) -> None:
        if self.predict_path is not None and self.trainer is not None and self.trainer.predicting:
            return  # predict reads predict_path only
        generate_corpus(self.spec, self.root, self.generate_workers)

    def entries(self, split: str) -> list[SpeechEntry]:
        if self._manifest is None:
            folder = generate_corpus(self.spec, self.root, self.generate_workers)
            with open(folder / "manifest.jsonl") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            self._manifest = [corpus_entry(row, folder) for row in rows]
            self._splits = [row["split"] for row in rows]
        return [entry for entry, s in zip(self._manifest, self._splits) if s == split]


class LibriSpeechDataModule(SpeechDataModule):
    """LibriSpeech layout: ``<root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` + ``*.flac``."""

    def __init__(
        self,
        root: str,
        train_subsets: Sequence[str] = ("train-clean-100",),
        val_subsets: Sequence[str] = ("dev-clean",),
        test_subsets: Sequence[str] = ("test-clean",),
        batch_size: int = 16,
        num_workers: int = 0,
        max_duration: float | None = 20.0,
        on_bad: str = "skip",
        predict_path: str | None = None,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        super().__init__(
            batch_size,
            num_workers,
            ("en",),
            max_duration,
            on_bad,
            preload=False,
            predict_path=predict_path,
            max_skip_fraction=max_skip_fraction,
        )
        self.root = Path(root)
        self.subsets = {"train": tuple(train_subsets), "val": tuple(val_subsets), "test": tuple(test_subsets)}

    def entries(self, split: str) -> list[SpeechEntry]:
        return librispeech_entries(self.root, self.subsets[split])


def librispeech_entries(root: str | Path, subsets: Sequence[str]) -> list[SpeechEntry]:
    root = Path(root)
    out = []
    for subset in subsets:
        folder = root / subset
        if not folder.is_dir():
            raise ValueError(f"LibriSpeech subset folder {str(folder)!r} does not exist (root={str(root)!r})")
        for trans in sorted(folder.rglob("*.trans.txt")):
            for line in trans.read_text(encoding="utf-8").splitlines():
                uid, _, text = line.strip().partition(" ")
                if uid:
                    audio = trans.parent / f"{uid}.flac"
                    out.append(SpeechEntry(uid, str(audio), normalize_text(text), "en", "real"))
    return out


class CommonVoiceDataModule(SpeechDataModule):
    """Common Voice layout: ``<root>/{train,dev,test}.tsv`` (columns ``path``, ``sentence``, ``locale``) and
    ``<root>/clips/``. ``language`` is used when the TSV has no ``locale`` column."""

    def __init__(
        self,
        root: str,
        language: str | None = None,
        train_tsv: str = "train.tsv",
        val_tsv: str = "dev.tsv",
        test_tsv: str = "test.tsv",
        languages: Sequence[str] = LANGUAGES,
        batch_size: int = 16,
        num_workers: int = 0,
        max_duration: float | None = 20.0,
        on_bad: str = "skip",
        predict_path: str | None = None,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        super().__init__(
            batch_size,
            num_workers,
            languages,
            max_duration,
            on_bad,
            preload=False,
            predict_path=predict_path,
            max_skip_fraction=max_skip_fraction,
        )
        self.root = Path(root)
        self.language = language
        self.tsv = {"train": train_tsv, "val": val_tsv, "test": test_tsv}

    def entries(self, split: str) -> list[SpeechEntry]:
        return common_voice_entries(self.root, self.tsv[split], self.language)


def common_voice_entries(root: str | Path, tsv_name: str, language: str | None = None) -> list[SpeechEntry]:
    root = Path(root)
    path = root / tsv_name
    if not path.is_file():
        raise ValueError(f"Common Voice TSV {str(path)!r} does not exist (root={str(root)!r})")
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"path", "sentence"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{str(path)!r} lacks the columns {sorted(missing)}; it has {reader.fieldnames}")
        for row in reader:
            clip = row["path"] or ""
            lang = row.get("locale") or language
            out.append(SpeechEntry(clip, str(root / "clips" / clip), normalize_text(row["sentence"] or ""), lang))
    return out


class ManifestDataModule(SpeechDataModule):
    """JSONL manifests, one utterance a line: ``{"audio": path, "text": ..., "language"?: ..., "sample_rate"?: ...}``.

    Relative audio paths are relative to the manifest's folder; a line that is not valid JSON or lacks a field is
    skipped and counted (``on_bad="error"`` raises).
    """

    def __init__(
        self,
        train_manifest: str,
        val_manifest: str,
        test_manifest: str | None = None,
        languages: Sequence[str] = LANGUAGES,
        batch_size: int = 16,
        num_workers: int = 0,
        max_duration: float | None = 20.0,
        on_bad: str = "skip",
        preload: bool = False,
        predict_path: str | None = None,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        super().__init__(
            batch_size,
            num_workers,
            languages,
            max_duration,
            on_bad,
            preload=preload,
            predict_path=predict_path,
            max_skip_fraction=max_skip_fraction,
        )
        self.manifests = {"train": train_manifest, "val": val_manifest, "test": test_manifest or val_manifest}

    def entries(self, split: str) -> list[SpeechEntry]:
        before = self.records.skipped(split).get("bad_manifest_line", 0)
        entries = manifest_entries(self.manifests[split], self.on_bad, self.records, split)
        self.unlisted[split] = self.records.skipped(split).get("bad_manifest_line", 0) - before
        return entries


def manifest_entries(
    path: str | Path, on_bad: str = "skip", records: BadRecords | None = None, split: str = "train"
) -> list[SpeechEntry]:
    """The utterances of a JSONL manifest; a line that is not valid JSON, lacks ``audio``/``text`` or has them of
    another type is skipped and counted in ``records`` under ``split`` as ``bad_manifest_line`` (``on_bad="error"``
    raises ValueError naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {str(path)!r} does not exist")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            audio, text = row["audio"], row["text"]
            if not isinstance(audio, str) or not isinstance(text, str):
                raise TypeError("'audio' and 'text' must be strings")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            message = f"{str(path)!r} line {number} is not a valid manifest row ({err!r}): {line[:80]!r}"
            if on_bad == "error":
                raise ValueError(message) from err
            log.warning("skipping utterance: %s", message)
            if records is not None:
                records.skip(split, "bad_manifest_line", f"{path}:{number}", message)
            continue
        audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        rate = row.get("sample_rate")
        uid = str(row.get("id", f"{path.stem}:{number}"))
        out.append(SpeechEntry(uid, str(audio_path), normalize_text(text), row.get("language"), "real", None, rate))
    return out


def pocketsphinx_entries(root: str | Path = POCKETSPHINX_ROOT) -> list[SpeechEntry]:
    """The 10 recorded English utterances of Debian's ``pocketsphinx-testdata`` (cards + librivox)."""
    root = Path(root)
    out = []
    for folder, trans in (("cards", "cards.transcription"), ("librivox", "transcription")):
        path = root / folder / trans
        if not path.is_file():
            raise ValueError(f"{str(path)!r} not found: install the Debian package pocketsphinx-testdata")
        for line in path.read_text().splitlines():
            if "(" not in line:
                continue
            text, _, uid = line.rpartition("(")
            uid = uid.strip(" )")
            text = text.replace("<s>", " ").replace("</s>", " ")
            out.append(SpeechEntry(uid, str(root / folder / f"{uid}.wav"), normalize_text(text), "en", "ood"))
    return out
