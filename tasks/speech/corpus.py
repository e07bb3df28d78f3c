"""The embedded speech corpus: multilingual and code-switched spoken numbers, synthesised offline and cached.

Text: numbers written out by ``num2words`` (cardinals, some ordinals) in English, German, Spanish and French
(Italian and Portuguese on request). Audio from five independent engines: ``espeak-ng`` (formant synthesis, every
language, 30 voice variants), ``flite`` (English, 4 voices), ``festival`` (English diphone and HTS voices,
Italian diphone voices), ``pico`` (SVOX Pico's ``pico2wave``, one voice per locale: en-US, en-GB, de-DE, es-ES,
fr-FR, it-IT) and ``mbrola`` (MBROLA diphone voices, recorded speakers, with espeak-ng's text analysis and prosody:
4 English, 7 German, 7 French), with per-utterance speed and pitch perturbation and random gain. Pico and MBROLA come
from Debian contrib/non-free and are used by the five-engine presets only. An utterance is 1-3 phrases of one
language (``mono``) or 2-4 phrases alternating between two languages (``cs``, code-switched; only espeak speaks
several languages with one voice); each phrase is synthesised on its own, trimmed and concatenated
with short pauses, so every sample's language is known exactly (pauses are ``-1``). Optional acoustic conditions
(:mod:`.augment`: speed, pitch, reverberation, noise, band-limiting, codec) are planned per utterance.

Two protocols decide which voices go where (:func:`split_voices`):

- held-out voices (``holdout_engine=None``, the default): every voice has a fixed split (``Voice.split``); val and
  test voices never occur in training.
- leave one engine out (``holdout_engine="flite"`` ...): every voice of that engine is in test only; the other
  engines keep their voice splits. A test utterance is from the held-out engine with probability
  ``heldout_test_frac`` (``unseen_engine`` in the manifest), else from the other engines' test voices.

Either way a *speaker* lives in one split: festival's ``kal_diphone`` and flite's ``kal16`` are the same recorded
speaker, and so are festival's ``cmu_us_slt_arctic_hts`` and flite's ``slt`` (CMU ARCTIC SLT); a voice of a
training engine whose speaker is held out is dropped, and :func:`split_voices` checks the result. Every Pico and
MBROLA voice is a speaker of its own (MBROLA's are other recorded people than espeak's variants; en1 is CSTR's Roger,
whose festival voice the corpus does not use).

The corpus is written once to ``<root>/<name>/`` (``$MOEZOO_DATA_DIR/speech`` or ``~/.cache/moezoo/speech``):
``{train,val,test}/*.wav`` (16 kHz PCM) and ``manifest.jsonl`` (text, language, segments, engine, voice, speaker,
augmentation of every utterance); ``spec.json`` is written last and marks a complete corpus.
``python -m moezoo.tasks.speech.corpus --preset default`` generates it with a progress bar. The presets
``default``, ``quick`` and ``smoke`` are the original espeak + flite corpora (released checkpoints are evaluated on
``default``: their plans must not change); ``engines`` adds festival, ``loeo_<engine>`` leaves one of those three
engines out (their plans are fixed too: the leave-one-engine-out benchmark's rows were measured on them);
``engines5`` and ``loeo5_<engine>`` are the same with all five engines (:data:`ENGINES`).

Why one long file: planning (voices, splits, acoustic conditions) and rendering (the five engines, caching, the
manifest) share one utterance plan whose fields must agree; the DSP of the acoustic conditions lives apart in
:mod:`.augment`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from moezoo.tasks.speech.augment import apply_steps, check_ops, plan_steps
from moezoo.tasks.speech.text import CharVocab, normalize_text

SAMPLE_RATE = 16000
SPLITS = ("train", "val", "test")
LANGUAGES = ("en", "de", "es", "fr")
ESPEAK_LANG = {"en": "en", "de": "de", "es": "es", "fr": "fr", "it": "it", "pt": "pt"}
#: every engine the generator knows; :data:`ENGINES3` are those of the presets ``engines`` and ``loeo_<engine>``
ENGINES = ("espeak", "flite", "festival", "pico", "mbrola")
ENGINES3 = ENGINES[:3]
ESPEAK_VARIANTS = {
    "train": (
        "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "adam", "david", "edward", "john", "linda", "max", "paul",
        "robert", "steph", "victor", "zac", "annie", "Andy", "boris",
    ),
    "val": ("m6", "f4", "michel"),
    "test": ("m7", "f5", "belinda", "benjamin", "pedro"),
}  # fmt: skip
# Every other variant espeak-ng 1.51 ships (Klatt synthesis, whisper, ...): more training voices with espeak_extra.
ESPEAK_EXTRA_VARIANTS = (
    "Alex", "Alicia", "Andrea", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco",
    "Mario", "Michael", "Mike", "Nguyen", "Storm", "Tweaky", "anika", "announcer", "antonio", "aunty", "caleb", "ed",
    "edward2", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "kaukovalta", "klatt", "klatt2",
    "klatt3", "klatt4", "klatt5", "klatt6", "m8", "marcelo", "miguel", "norbert", "pablo", "quincy", "rob", "sandro",
    "shelby", "steph2", "steph3", "travis", "whisper", "whisperf",
)  # fmt: skip
# The programs each engine runs and the Debian packages that provide them (MBROLA voices speak through espeak-ng).
ENGINE_PROGRAMS = {
    "espeak": (("espeak-ng", "espeak-ng"),),
    "flite": (("flite", "flite"),),
    "festival": (("text2wave", "festival"),),
    "pico": (("pico2wave", "libttspico-utils"),),
    "mbrola": (("espeak-ng", "espeak-ng"), ("mbrola", "mbrola")),
}
# SVOX Pico: one voice per locale (its data files, Debian non-free libttspico-data), the corpus language it speaks and
# its split. Held out: de-DE (val) and fr-FR (test), whose languages keep natural-sounding training voices in MBROLA's
# German and French; both English voices and the only Spanish one train (no other engine has a natural-sounding
# Spanish voice, and the leave-flite-out study needs every natural English voice in training).
PICO_VOICES = {"en-US": ("en", "train"), "en-GB": ("en", "train"), "de-DE": ("de", "val"), "es-ES": ("es", "train"),
               "fr-FR": ("fr", "test"), "it-IT": ("it", "train")}  # fmt: skip
PICO_LANG_DIR = "/usr/share/pico/lang"
# MBROLA diphone voices (Debian non-free mbrola-<voice>) whose every corpus number espeak-ng 1.51 can say: es1-es4,
# it1-it4 and de8 lack diphones espeak-ng asks for (mbrola replaces them with silence, so vowels vanish) and are left
# out. Held out: one German and one French voice each for val and test; all four English voices train (as Pico's).
MBROLA_VOICES = {
    "us1": ("en", "train"), "us2": ("en", "train"), "us3": ("en", "train"), "en1": ("en", "train"),
    "de1": ("de", "train"), "de2": ("de", "train"), "de3": ("de", "train"), "de4": ("de", "test"),
    "de5": ("de", "val"), "de6": ("de", "train"), "de7": ("de", "train"),
    "fr1": ("fr", "train"), "fr2": ("fr", "test"), "fr3": ("fr", "train"), "fr4": ("fr", "train"),
    "fr5": ("fr", "train"), "fr6": ("fr", "val"), "fr7": ("fr", "train"),
}  # fmt: skip
MBROLA_DIRS = ("/usr/share/mbrola", "/usr/share/mbrola/voices")


@dataclass(frozen=True)
class Voice:
    """One voice of one engine: the languages it speaks, the recorded speaker behind it (one id for the same
    person in two engines), its split under the held-out-voice protocol, the Debian package that ships it,
    for festival the range of mean f0 it can be given (``None``: its own intonation only), and whether it is one of
    the extra espeak variants (used with ``CorpusSpec.espeak_extra`` only)."""

    engine: str
    name: str
    languages: tuple[str, ...]
    speaker: str
    split: str
    package: str
    f0_range: tuple[float, float] | None = None
    extra: bool = False


VOICES: tuple[Voice, ...] = (
    *(
        Voice("espeak", v, tuple(ESPEAK_LANG), f"espeak:{v}", split, "espeak-ng")
        for split, variants in ESPEAK_VARIANTS.items()
        for v in variants
    ),
    Voice("flite", "kal16", ("en",), "kal", "train", "flite"),
    Voice("flite", "awb", ("en",), "awb", "train", "flite"),
    Voice("flite", "rms", ("en",), "rms", "val", "flite"),
    Voice("flite", "slt", ("en",), "slt", "test", "flite"),
    Voice("festival", "kal_diphone", ("en",), "kal", "train", "festvox-kallpc16k", (80.0, 150.0)),
    Voice("festival", "ked_diphone", ("en",), "ked", "train", "festvox-kdlpc16k", (80.0, 150.0)),
    Voice("festival", "cmu_us_slt_arctic_hts", ("en",), "slt", "test", "festvox-us-slt-hts"),
    Voice("festival", "pc_diphone", ("it",), "pc", "train", "festvox-itapc16k"),
    Voice("festival", "lp_diphone", ("it",), "lp", "test", "festvox-italp16k"),
    *(
        Voice("espeak", v, tuple(ESPEAK_LANG), f"espeak:{v}", "train", "espeak-ng", extra=True)
        for v in ESPEAK_EXTRA_VARIANTS
    ),
    # new engines after every earlier voice: split_voices keeps VOICES order, and the earlier presets' plans with it
    *(Voice("pico", v, (lang,), f"pico:{v}", split, "libttspico-data") for v, (lang, split) in PICO_VOICES.items()),
    *(Voice("mbrola", v, (lang,), f"mbrola:{v}", split, f"mbrola-{v}") for v, (lang, split) in MBROLA_VOICES.items()),
)
INSTALL_HINT = "install them with `apt-get install {packages}` (Debian/Ubuntu) or `make system-deps`"


@dataclass(frozen=True)
class CorpusSpec:
    """What to generate; the name of the cache folder is derived from every field.

    ``non_espeak_frac``: share of monolingual utterances given to another engine than espeak when one of its voices
    speaks the language (uniformly between those engines). ``engines``: the engines used; ``holdout_engine``: leave
    that engine out of train and val (see the module docstring); ``heldout_test_frac``: share of its test utterances
    then.
    ``augment``: acoustic conditions (:data:`moezoo.tasks.speech.augment.AUGMENTATIONS`), each applied to an
    utterance of ``augment_splits`` with probability ``augment_prob``. ``espeak_extra``: train on the 53 other
    espeak variants too (:data:`ESPEAK_EXTRA_VARIANTS`).
    """

    languages: tuple[str, ...] = LANGUAGES
    num_train: int = 3000
    num_val: int = 200
    num_test: int = 400
    code_switch_frac: float = 0.4
    non_espeak_frac: float = 0.5
    max_number: int = 1000
    seed: int = 0
    engines: tuple[str, ...] = ("espeak", "flite")
    holdout_engine: str | None = None
    heldout_test_frac: float = 0.5
    augment: tuple[str, ...] = ()
    augment_prob: float = 0.35
    augment_splits: tuple[str, ...] = ("train",)
    espeak_extra: bool = False

    def __post_init__(self) -> None:
        unknown = [lang for lang in self.languages if lang not in ESPEAK_LANG]
        if unknown or len(self.languages) < 1:
            raise ValueError(f"languages must be a non-empty subset of {sorted(ESPEAK_LANG)}, got {self.languages}")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.code_switch_frac <= 1 or (self.code_switch_frac > 0 and len(self.languages) < 2):
            raise ValueError(f"code_switch_frac must be in [0, 1] (0 with one language), got {self.code_switch_frac}")
        if not 0 <= self.non_espeak_frac <= 1:
            raise ValueError(f"non_espeak_frac must be in [0, 1], got {self.non_espeak_frac}")
        if self.max_number < 10:
            raise ValueError(f"max_number must be >= 10, got {self.max_number}")
        if not self.engines or len(set(self.engines)) != len(self.engines) or set(self.engines) - set(ENGINES):
            raise ValueError(f"engines must be distinct names out of {list(ENGINES)}, got {list(self.engines)}")
        if self.holdout_engine is not None and (self.holdout_engine not in self.engines or len(self.engines) < 2):
            raise ValueError(
                f"holdout_engine must be None or one of engines={list(self.engines)} (with at least one other), "
                f"got {self.holdout_engine!r}"
            )
        if not 0 < self.heldout_test_frac < 1:
            raise ValueError(f"heldout_test_frac must be in (0, 1), got {self.heldout_test_frac}")
        check_ops(self.augment)
        if not 0 < self.augment_prob <= 1:
            raise ValueError(f"augment_prob must be in (0, 1], got {self.augment_prob}")
        if not self.augment_splits or set(self.augment_splits) - set(SPLITS):
            raise ValueError(f"augment_splits must be a non-empty subset of {list(SPLITS)}, got {self.augment_splits}")
        split_voices(self)  # every split must have a voice

    @property
    def name(self) -> str:
        langs = "-".join(self.languages)
        name = (
            f"numbers_{langs}_n{self.num_train}-{self.num_val}-{self.num_test}_cs{self.code_switch_frac:g}"
            f"_fl{self.non_espeak_frac:g}_max{self.max_number}_s{self.seed}"
        )  # the original corpora's names (engines espeak + flite, no augmentation) are kept
        if self.engines != ("espeak", "flite"):
            name += f"_eng-{'-'.join(self.engines)}"
        if self.holdout_engine is not None:
            name += f"_loeo-{self.holdout_engine}{self.heldout_test_frac:g}"
        if self.espeak_extra:
            name += "_espx"
        if self.augment:
            ops = "-".join(check_ops(self.augment))
            name += f"_aug-{ops}-p{self.augment_prob:g}-{'-'.join(s for s in SPLITS if s in self.augment_splits)}"
        return name


def split_voices(spec: CorpusSpec) -> dict[str, list[Voice]]:
    """The voices of each split (in :data:`VOICES` order) under ``spec``'s protocol.

    Only voices of ``spec.engines`` that speak one of ``spec.languages`` take part. With ``holdout_engine`` its
    voices are all in test, and a voice of another engine whose speaker is one of them leaves train and val.
    ValueError when a split is left without a voice; AssertionError if a speaker would sit in two splits.
    """
    voices = [
        v
        for v in VOICES
        if v.engine in spec.engines and set(v.languages) & set(spec.languages) and (spec.espeak_extra or not v.extra)
    ]
    held = {v.speaker for v in voices if v.engine == spec.holdout_engine}
    out: dict[str, list[Voice]] = {s: [] for s in SPLITS}
    for v in voices:
        if v.engine == spec.holdout_engine:
            out["test"].append(v)
        elif v.split == "test" or v.speaker not in held:
            out[v.split].append(v)
    for split, members in out.items():
        if not members:
            raise ValueError(
                f"engines={list(spec.engines)} with holdout_engine={spec.holdout_engine!r} leave the {split} split "
                f"without a voice for languages={list(spec.languages)}"
            )
    if spec.holdout_engine is not None:
        trained = {lang for v in out["train"] for lang in v.languages} & set(spec.languages)
        if not any(v.engine != spec.holdout_engine for v in out["test"]) or not any(
            set(v.languages) & trained for v in out["test"] if v.engine == spec.holdout_engine
        ):
            raise ValueError(
                f"holdout_engine={spec.holdout_engine!r} with engines={list(spec.engines)} and "
                f"languages={list(spec.languages)} needs test voices of another engine and a held-out voice that "
                "speaks a language of the training voices"
            )
    speakers = {s: {v.speaker for v in out[s]} for s in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not speakers[a] & speakers[b], f"speakers {speakers[a] & speakers[b]} in both {a} and {b}"
    return out


PRESETS = {
    "default": CorpusSpec(),
    "smoke": CorpusSpec(num_train=24, num_val=8, num_test=8, max_number=100),
    "quick": CorpusSpec(num_train=1200, num_val=100, num_test=240, max_number=100),
    "engines": CorpusSpec(engines=ENGINES3),
    **{f"loeo_{e}": CorpusSpec(engines=ENGINES3, holdout_engine=e) for e in ENGINES3},
    "engines5": CorpusSpec(engines=ENGINES),
    **{f"loeo5_{e}": CorpusSpec(engines=ENGINES, holdout_engine=e) for e in ENGINES},
}


def default_root() -> Path:
    """``$MOEZOO_DATA_DIR/speech``, else ``$XDG_CACHE_HOME/moezoo/speech``, else ``~/.cache/moezoo/speech``."""
    if os.environ.get("MOEZOO_DATA_DIR"):
        return Path(os.environ["MOEZOO_DATA_DIR"]) / "speech"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "moezoo" / "speech"


def missing_engines(engines: Sequence[str] = ("espeak-ng", "flite")) -> list[str]:
    """The programs of ``engines`` (program names, e.g. ``espeak-ng``, ``text2wave``) that are not on PATH."""
    return [e for e in engines if shutil.which(e) is None]


@functools.cache
def festival_voices() -> frozenset[str]:
    """The voices festival finds (``voice.list``); empty without festival."""
    if shutil.which("festival") is None:
        return frozenset()
    result = subprocess.run(["festival", "--batch", "(print (voice.list))"], capture_output=True, timeout=60)
    return frozenset(result.stdout.decode(errors="replace").strip().strip("()").split())


def pico_voices() -> frozenset[str]:
    """The Pico locales whose two data files (text analysis ``_ta``, speaker ``_sg``) are installed."""
    folder = Path(PICO_LANG_DIR)
    return frozenset(
        locale
        for locale in PICO_VOICES
        if (folder / f"{locale}_ta.bin").is_file() and any(folder.glob(f"{locale}_*_sg.bin"))
    )


def mbrola_voices() -> frozenset[str]:
    """The MBROLA voices installed where espeak-ng looks for them (``<dir>/<voice>`` or ``<dir>/<voice>/<voice>``)."""
    return frozenset(
        v for v in MBROLA_VOICES for d in MBROLA_DIRS if (Path(d) / v).is_file() or (Path(d) / v / v).is_file()
    )


def installed_voices(engine: str) -> frozenset[str] | None:
    """The installed voices of an engine whose voices are packaged apart from its program; ``None`` for espeak and
    flite (their voices come with the program)."""
    listers: dict[str, Callable[[], frozenset[str]]] = {
        "festival": festival_voices,
        "pico": pico_voices,
        "mbrola": mbrola_voices,
    }
    return listers[engine]() if engine in listers else None


def missing_packages(spec: CorpusSpec) -> dict[str, str]:
    """``{what is missing: Debian package}`` for the programs and voices ``spec`` needs."""
    used = {v for members in split_voices(spec).values() for v in members}
    missing = {}
    for engine in spec.engines:
        absent = False
        for program, package in ENGINE_PROGRAMS[engine]:
            if missing_engines([program]):
                missing[f"the program {program}"] = package
                absent = True
        have = None if absent else installed_voices(engine)
        if have is not None:
            for v in sorted(used, key=VOICES.index):
                if v.engine == engine and v.name not in have:
                    missing[f"the {engine} voice {v.name}"] = v.package
    return missing


def require_engines(spec: CorpusSpec | None = None) -> None:
    """RuntimeError naming every missing program and voice of ``spec`` and the Debian packages that provide them."""
    missing = missing_packages(spec if spec is not None else CorpusSpec())
    if missing:
        packages = " ".join(dict.fromkeys(missing.values()))
        programs = [k.removeprefix("the program ") for k in missing if k.startswith("the program ")]
        what = f"the TTS programs {programs}, which are not on PATH" if programs else "TTS voices that are missing"
        raise RuntimeError(
            f"generating the speech corpus needs {what} ({'; '.join(f'{k}: package {p}' for k, p in missing.items())}"
            f"); {INSTALL_HINT.format(packages=packages)}. Alternatively train on your own data "
            "(LibriSpeechDataModule, CommonVoiceDataModule, ManifestDataModule)."
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
    engine: str  # one of ENGINES
    voice: str
    speed: float  # espeak / mbrola words per minute, or flite / festival / pico duration stretch
    pitch: float  # espeak / mbrola pitch 0-99, flite / festival mean f0 (Hz; 0 = the festival voice's own), pico %
    gain: float
    pauses_ms: list[int]
    speaker: str = ""
    unseen_engine: bool | None = None  # leave-one-engine-out corpora: is the engine absent from train and val?
    augment: list[dict[str, Any]] = field(default_factory=list)  # planned steps of :mod:`.augment`


def number_phrase(rng: random.Random, lang: str, max_number: int) -> str:
    from num2words import num2words

    n = rng.randrange(0, 100) if rng.random() < 0.6 else rng.randrange(0, max_number)
    to = "ordinal" if rng.random() < 0.1 and n > 0 else "cardinal"
    return normalize_text(num2words(n, lang=lang, to=to))


def plan_corpus(spec: CorpusSpec) -> list[UtterancePlan]:
    """Every utterance's text, voice, perturbation and acoustic conditions, deterministically from ``spec.seed``.

    Per utterance (one random stream each): under leave-one-engine-out, a test utterance first draws whether it
    comes from the held-out engine (then only in languages the training voices speak); then code-switching, the
    languages, the texts, the engine (espeak, or another with probability ``non_espeak_frac`` where one of its voices
    speaks the language), the voice, speed, pitch, pauses and gain; the acoustic conditions come from streams of
    their own (:func:`moezoo.tasks.speech.augment.plan_steps`), so switching them leaves the rest unchanged.
    """
    voices = split_voices(spec)
    trained = {lang for v in voices["train"] for lang in v.languages}
    plans = []
    counts = {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}
    vocab = CharVocab()
    for split, count in counts.items():
        for i in range(count):
            rng = random.Random(f"{spec.seed}-{split}-{i}")
            pool, allowed, unseen = voices[split], set(spec.languages), None
            if spec.holdout_engine is not None and split == "test":
                unseen = rng.random() < spec.heldout_test_frac
                pool = [v for v in pool if (v.engine == spec.holdout_engine) == unseen]
                if unseen:
                    allowed &= trained
            covered = [lang for lang in spec.languages if lang in allowed and any(lang in v.languages for v in pool)]
            multilingual = [lang for lang in covered if any(set(covered) <= set(v.languages) for v in pool)]
            code_switch = rng.random() < spec.code_switch_frac and len(multilingual) >= 2
            if code_switch:
                pair = rng.sample(multilingual, 2)
                langs = [pair[j % 2] for j in range(rng.randint(2, 4))]
            else:
                langs = [rng.choice(covered)] * rng.randint(1, 3)
            phrases = [Phrase(lang, number_phrase(rng, lang, spec.max_number)) for lang in langs]
            for p in phrases:
                vocab.encode(p.text)  # num2words output must fit the vocabulary
            candidates = [v for v in pool if set(langs) <= set(v.languages)]
            engines = list(dict.fromkeys(v.engine for v in candidates))
            others = [e for e in engines if e != "espeak"]
            engine = "espeak"
            if others and ("espeak" not in engines or rng.random() < spec.non_espeak_frac):
                engine = others[0] if len(others) == 1 else rng.choice(others)
            voice = rng.choice([v for v in candidates if v.engine == engine])
            if engine in ("espeak", "mbrola"):
                speed, pitch = float(rng.randint(130, 200)), float(rng.randint(25, 75))
            elif engine == "flite":
                speed, pitch = rng.uniform(0.85, 1.2), rng.uniform(90.0, 180.0)
            elif engine == "pico":
                speed, pitch = rng.uniform(0.85, 1.2), rng.uniform(85.0, 120.0)
            else:
                speed, pitch = rng.uniform(0.85, 1.2), rng.uniform(*voice.f0_range) if voice.f0_range else 0.0
            pauses = [rng.randint(40, 250) for _ in range(len(phrases) + 1)]
            steps = []
            if split in spec.augment_splits and spec.augment:
                steps = plan_steps(spec.augment, spec.augment_prob, f"{spec.seed}-{split}-{i}")
            plans.append(
                UtterancePlan(
                    f"{split}-{i:05d}", split, "cs" if code_switch else "mono", phrases, engine, voice.name,
                    speed, pitch, rng.uniform(0.4, 1.0), pauses, voice.speaker, unseen, steps,
                )
            )  # fmt: skip
    return plans


def _tts_command(phrase: Phrase, plan: UtterancePlan, path: str) -> tuple[list[str], bytes | None]:
    """The command line that writes ``phrase`` to ``path``, and what to send on its stdin."""
    if plan.engine == "flite":
        cmd = ["flite", "-voice", plan.voice, "--setf", f"duration_stretch={plan.speed:.3f}"]
        return cmd + ["--setf", f"int_f0_target_mean={plan.pitch:.1f}", "-t", phrase.text, "-o", path], None
    if plan.engine == "festival":
        # Diphone voices stretch durations; the HTS voice takes a speech rate (its engine ignores Duration_Stretch).
        # Festival reads Latin-1: UTF-8 accents ("ventitré") fail its letter-to-sound rules and write no file.
        cmd = ["text2wave", "-o", path, "-eval", f"(voice_{plan.voice})"]
        if plan.voice.endswith("_hts"):
            cmd += ["-eval", f'(set! hts_engine_params (append hts_engine_params \'(("-r" {1 / plan.speed:.3f}))))']
        else:
            cmd += ["-eval", f"(Parameter.set 'Duration_Stretch {plan.speed:.3f})"]
        if plan.pitch > 0:
            cmd += ["-eval", f"(set! int_lr_params '((target_f0_mean {plan.pitch:.1f}) (target_f0_std 14) "
                    "(model_f0_mean 170) (model_f0_std 34)))"]  # fmt: skip
        return cmd, phrase.text.encode("latin-1")
    if plan.engine == "pico":
        # Pico's markup: speed and pitch in percent of the voice's own (speed is a rate: the inverse of the stretch).
        speed, pitch = round(100 / plan.speed), round(plan.pitch)
        text = f"<speed level='{speed}'><pitch level='{pitch}'>{phrase.text}</pitch></speed>"
        return ["pico2wave", "-l", plan.voice, "-w", path, text], None
    if plan.engine == "mbrola":
        cmd = ["espeak-ng", "-v", f"mb-{plan.voice}", "-s", str(int(plan.speed)), "-p", str(int(plan.pitch))]
        return cmd + ["-w", path, phrase.text], None
    voice = f"{ESPEAK_LANG[phrase.lang]}+{plan.voice}"
    cmd = ["espeak-ng", "-v", voice, "-s", str(int(plan.speed)), "-p", str(int(plan.pitch)), "-w", path]
    return cmd + [phrase.text], None


def _synthesise(phrase: Phrase, plan: UtterancePlan, workdir: str) -> np.ndarray:
    """One phrase as float32 mono at 16 kHz, leading and trailing silence trimmed."""
    fd, path = tempfile.mkstemp(suffix=".wav", dir=workdir)
    os.close(fd)
    os.unlink(path)  # festival exits 0 without writing a file when it fails: only a new file counts
    cmd, stdin = _tts_command(phrase, plan, path)
    try:
        result = subprocess.run(cmd, input=stdin, capture_output=True, timeout=60)
        # mbrola exits 0 after putting silence where its voice lacks a diphone espeak-ng asked for: the audio would
        # miss a sound its transcript has
        dropped = plan.engine == "mbrola" and b"unknown, replaced with" in result.stderr
        if result.returncode != 0 or not os.path.exists(path) or dropped:
            raise RuntimeError(
                f"{cmd[0]} ({plan.engine} voice {plan.voice}) failed on {phrase.text!r} (exit status "
                f"{result.returncode}, output path {path!r}"
                f"{', the voice lacks diphones of the text' if dropped else ''}): "
                f"{result.stderr.decode(errors='replace')[-500:]}"
            )
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    finally:
        if os.path.exists(path):
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
    """Synthesise, assemble, condition and write one utterance; return its manifest row with exact language
    segments (rescaled when a ``speed`` step changes the length)."""
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
    if plan.augment:
        clean_size = wave.size
        seed = zlib.crc32(f"{plan.uid}-augment".encode())
        wave = apply_steps(torch.from_numpy(wave), plan.augment, SAMPLE_RATE, seed).numpy()
        if wave.size != clean_size:  # speed: every boundary moves with the time axis
            scale = wave.size / clean_size
            segments = [[round(a * scale), min(wave.size, round(b * scale)), lang] for a, b, lang in segments]
    wave = wave / max(1e-6, float(np.abs(wave).max())) * plan.gain
    wave = wave + rng.normal(0.0, 1e-3, wave.size).astype(np.float32)  # a faint noise floor, no digital silence
    path = out_dir / plan.split / f"{plan.uid}.wav"
    sf.write(path, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    row = {
        "id": plan.uid,
        "split": plan.split,
        "audio": f"{plan.split}/{plan.uid}.wav",
        "text": " ".join(p.text for p in plan.phrases),
        "kind": plan.kind,
        "language": "+".join(dict.fromkeys(p.lang for p in plan.phrases)),
        "segments": segments,
        "num_samples": int(wave.size),
        "engine": plan.engine,
        "voice": plan.voice,
        "speaker": plan.speaker,
        "speed": plan.speed,
        "pitch": plan.pitch,
        "augment": plan.augment,
    }
    if plan.unseen_engine is not None:
        row["unseen_engine"] = plan.unseen_engine
    return row


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
    require_engines(spec)
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
        # The engines write into a short-named folder: espeak-ng exits 0 and writes nothing when its output path is
        # longer than about 200 characters (corpus names with every option are long).
        with tempfile.TemporaryDirectory(prefix="moezoo-tts-") as workdir:
            with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
                for row in pool.map(lambda p: render_utterance(p, staging, workdir), plans):
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
    parser.add_argument("--augment", nargs="*", default=None, metavar="OP", help="acoustic conditions to switch on")
    parser.add_argument("--augment-prob", type=float, default=None, help="each condition's probability")
    args = parser.parse_args(argv)
    try:
        spec = PRESETS[args.preset]
        if args.augment is not None:
            spec = dataclasses.replace(spec, augment=tuple(args.augment))
        if args.augment_prob is not None:
            spec = dataclasses.replace(spec, augment_prob=args.augment_prob)
        path = generate_corpus(spec, args.root, args.num_workers)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
