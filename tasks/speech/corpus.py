"""The embedded speech corpus: multilingual and code-switched spoken numbers, synthesised offline and cached.

Text: numbers written out by ``num2words`` (cardinals, some ordinals) in English, German, Spanish and French.
Audio: ``espeak-ng`` (every language, 31 voice variants) and ``flite`` (English, 4 voices), with per-utterance
speed and pitch perturbation and random gain. An utterance is 1-3 phrases of one language (``mono``) or 2-4
phrases alternating between two languages (``cs``, code-switched); each phrase is synthesised on its own, trimmed
and concatenated with short pauses, so every sample's language is known exactly (pauses are ``-1``).
Validation and test use voices that never occur in training (held-out espeak variants and flite voices).

The corpus is written once to ``<root>/<name>/`` (``$MOEZOO_DATA_DIR/speech`` or ``~/.cache/moezoo/speech``):
``{train,val,test}/*.wav`` (16 kHz PCM) and ``manifest.jsonl``; ``spec.json`` is written last and marks a
complete corpus. ``python -m moezoo.tasks.speech.corpus --preset default`` generates it with a progress bar.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from moezoo.tasks.speech.text import CharVocab, normalize_text

SAMPLE_RATE = 16000
LANGUAGES = ("en", "de", "es", "fr")
ESPEAK_LANG = {"en": "en", "de": "de", "es": "es", "fr": "fr", "it": "it", "pt": "pt"}
ESPEAK_VARIANTS = {
    "train": (
        "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "adam", "david", "edward", "john", "linda", "max", "paul",
        "robert", "steph", "victor", "zac", "annie", "Andy", "boris",
    ),
    "val": ("m6", "f4", "michel"),
    "test": ("m7", "f5", "belinda", "benjamin", "pedro"),
}  # fmt: skip
FLITE_VOICES = {"train": ("kal16", "awb"), "val": ("rms",), "test": ("slt",)}
INSTALL_HINT = "install them with `apt-get install espeak-ng flite` (Debian/Ubuntu) or `make system-deps`"


@dataclass(frozen=True)
class CorpusSpec:
    """What to generate; the name of the cache folder is derived from every field."""

    languages: tuple[str, ...] = LANGUAGES
    num_train: int = 3000
    num_val: int = 200
    num_test: int = 400
    code_switch_frac: float = 0.4
    flite_frac: float = 0.5  # share of English monolingual utterances spoken by flite
    max_number: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [lang for lang in self.languages if lang not in ESPEAK_LANG]
        if unknown or len(self.languages) < 1:
            raise ValueError(f"languages must be a non-empty subset of {sorted(ESPEAK_LANG)}, got {self.languages}")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.code_switch_frac <= 1 or (self.code_switch_frac > 0 and len(self.languages) < 2):
            raise ValueError(f"code_switch_frac must be in [0, 1] (0 with one language), got {self.code_switch_frac}")
        if self.max_number < 10:
            raise ValueError(f"max_number must be >= 10, got {self.max_number}")

    @property
    def name(self) -> str:
        langs = "-".join(self.languages)
        return (
            f"numbers_{langs}_n{self.num_train}-{self.num_val}-{self.num_test}_cs{self.code_switch_frac:g}"
            f"_fl{self.flite_frac:g}_max{self.max_number}_s{self.seed}"
        )


PRESETS = {
    "default": CorpusSpec(),
    "smoke": CorpusSpec(num_train=24, num_val=8, num_test=8, max_number=100),
    "quick": CorpusSpec(num_train=1200, num_val=100, num_test=240, max_number=100),
}


def default_root() -> Path:
    """``$MOEZOO_DATA_DIR/speech``, else ``$XDG_CACHE_HOME/moezoo/speech``, else ``~/.cache/moezoo/speech``."""
    if os.environ.get("MOEZOO_DATA_DIR"):
        return Path(os.environ["MOEZOO_DATA_DIR"]) / "speech"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "moezoo" / "speech"


def missing_engines(engines: Sequence[str] = ("espeak-ng", "flite")) -> list[str]:
    return [e for e in engines if shutil.which(e) is None]


def require_engines(engines: Sequence[str] = ("espeak-ng", "flite")) -> None:
    missing = missing_engines(engines)
    if missing:
        raise RuntimeError(
            f"generating the speech corpus needs the TTS programs {missing}, which are not on PATH; {INSTALL_HINT}. "
            "Alternatively train on your own data (LibriSpeechDataModule, CommonVoiceDataModule, ManifestDataModule)."
        )


@dataclass
class Phrase:
    lang: str
    text: str


@dataclass
class UtterancePlan:
    uid: str
    split: str
    kind: str  # "mono" or "cs"
    phrases: list[Phrase]
    engine: str  # "espeak" or "flite"
    voice: str
    speed: float  # espeak words per minute, or flite duration stretch
    pitch: float  # espeak pitch 0-99, or flite mean f0 (Hz)
    gain: float
    pauses_ms: list[int]


def number_phrase(rng: random.Random, lang: str, max_number: int) -> str:
    from num2words import num2words

    n = rng.randrange(0, 100) if rng.random() < 0.6 else rng.randrange(0, max_number)
    to = "ordinal" if rng.random() < 0.1 and n > 0 else "cardinal"
    return normalize_text(num2words(n, lang=lang, to=to))


def plan_corpus(spec: CorpusSpec) -> list[UtterancePlan]:
    """Every utterance's text, voice and perturbation, deterministically from ``spec.seed``."""
    plans = []
    counts = {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}
    vocab = CharVocab()
    for split, count in counts.items():
        for i in range(count):
            rng = random.Random(f"{spec.seed}-{split}-{i}")
            code_switch = rng.random() < spec.code_switch_frac
            if code_switch:
                pair = rng.sample(spec.languages, 2)
                langs = [pair[j % 2] for j in range(rng.randint(2, 4))]
            else:
                langs = [rng.choice(spec.languages)] * rng.randint(1, 3)
            phrases = [Phrase(lang, number_phrase(rng, lang, spec.max_number)) for lang in langs]
            for p in phrases:
                vocab.encode(p.text)  # num2words output must fit the vocabulary
            use_flite = not code_switch and langs[0] == "en" and rng.random() < spec.flite_frac
            if use_flite:
                engine, voice = "flite", rng.choice(FLITE_VOICES[split])
                speed, pitch = rng.uniform(0.85, 1.2), rng.uniform(90.0, 180.0)
            else:
                engine, voice = "espeak", rng.choice(ESPEAK_VARIANTS[split])
                speed, pitch = float(rng.randint(130, 200)), float(rng.randint(25, 75))
            pauses = [rng.randint(40, 250) for _ in range(len(phrases) + 1)]
            plans.append(
                UtterancePlan(
                    f"{split}-{i:05d}", split, "cs" if code_switch else "mono", phrases, engine, voice,
                    speed, pitch, rng.uniform(0.4, 1.0), pauses,
                )
            )  # fmt: skip
    return plans


def _synthesise(phrase: Phrase, plan: UtterancePlan, workdir: str) -> np.ndarray:
    """One phrase as float32 mono at 16 kHz, leading and trailing silence trimmed."""
    fd, path = tempfile.mkstemp(suffix=".wav", dir=workdir)
    os.close(fd)
    try:
        if plan.engine == "flite":
            cmd = ["flite", "-voice", plan.voice, "--setf", f"duration_stretch={plan.speed:.3f}"]
            cmd += ["--setf", f"int_f0_target_mean={plan.pitch:.1f}", "-t", phrase.text, "-o", path]
        else:
            voice = f"{ESPEAK_LANG[phrase.lang]}+{plan.voice}"
            cmd = ["espeak-ng", "-v", voice, "-s", str(int(plan.speed)), "-p", str(int(plan.pitch)), "-w", path]
            cmd.append(phrase.text)
        result = subprocess.run(cmd, capture_output=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed on {phrase.text!r}: {result.stderr.decode(errors='replace')}")
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    finally:
        os.unlink(path)
    wave = torch.from_numpy(audio.mean(1))
    if rate != SAMPLE_RATE:
        wave = AF.resample(wave, rate, SAMPLE_RATE)
    loud = (wave.abs() > 0.02 * float(wave.abs().max().clamp_min(1e-6))).nonzero().squeeze(-1)
    if loud.numel() == 0:
        raise RuntimeError(f"{cmd[0]} produced silence for {phrase.text!r} ({plan.voice})")
    margin = SAMPLE_RATE // 50
    start, end = max(0, int(loud[0]) - margin), min(wave.numel(), int(loud[-1]) + margin)
    return wave[start:end].numpy()


def render_utterance(plan: UtterancePlan, out_dir: Path, workdir: str) -> dict:
    """Synthesise, assemble and write one utterance; return its manifest row with exact language segments."""
    rng = np.random.default_rng(zlib.crc32(plan.uid.encode()))
    pieces, segments, cursor = [], [], 0
    for j, phrase in enumerate(plan.phrases):
        pause = np.zeros(plan.pauses_ms[j] * SAMPLE_RATE // 1000, dtype=np.float32)
        pieces.append(pause)
        cursor += pause.size
        clip = _synthesise(phrase, plan, workdir)
        pieces.append(clip)
        segments.append([cursor, cursor + clip.size, phrase.lang])
        cursor += clip.size
    pieces.append(np.zeros(plan.pauses_ms[-1] * SAMPLE_RATE // 1000, dtype=np.float32))
    wave = np.concatenate(pieces)
    wave = wave / max(1e-6, float(np.abs(wave).max())) * plan.gain
    wave = wave + rng.normal(0.0, 1e-3, wave.size).astype(np.float32)  # a faint noise floor, no digital silence
    path = out_dir / plan.split / f"{plan.uid}.wav"
    sf.write(path, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    return {
        "id": plan.uid,
        "split": plan.split,
        "audio": f"{plan.split}/{plan.uid}.wav",
        "text": " ".join(p.text for p in plan.phrases),
        "kind": plan.kind,
        "language": "+".join(dict.fromkeys(p.lang for p in plan.phrases)),
        "segments": segments,
        "num_samples": int(wave.size),
        "voice": f"{plan.engine}:{plan.voice}",
        "speed": plan.speed,
        "pitch": plan.pitch,
    }


def corpus_dir(spec: CorpusSpec, root: str | Path | None = None) -> Path:
    return (Path(root) if root is not None else default_root()) / spec.name


def is_complete(path: Path) -> bool:
    return (path / "spec.json").is_file() and (path / "manifest.jsonl").is_file()


def generate_corpus(
    spec: CorpusSpec, root: str | Path | None = None, num_workers: int = 2, progress: bool = True
) -> Path:
    """Generate the corpus into ``<root>/<spec.name>`` unless it is already complete; return that folder."""
    target = corpus_dir(spec, root)
    if is_complete(target):
        return target
    require_engines()
    plans = plan_corpus(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=target.parent))
    try:
        for split in ("train", "val", "test"):
            (staging / split).mkdir()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plans), desc=f"speech corpus {spec.name}", unit="utt", file=sys.stderr)
        rows = []
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            for row in pool.map(lambda p: render_utterance(p, staging, str(staging)), plans):
                rows.append(row)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        with open(staging / "manifest.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (staging / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))
        if is_complete(target):  # another process finished first
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the embedded multilingual speech corpus")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--root", default=None, help=f"cache root (default {default_root()})")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        path = generate_corpus(PRESETS[args.preset], args.root, args.num_workers)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
