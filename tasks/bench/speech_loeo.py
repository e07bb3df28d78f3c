"""``moezoo bench speech-loeo``: the rows of ``moezoo bench speech`` (dense, Switch, Omni-router, LR-MoE, global
embedding; equal active parameters) trained on a leave-one-engine-out corpus and tested on the engine they never
heard (issue 21), each ``moezoo fit`` of ``configs/speech/numbers_<variant>_conformer.yaml``.

Cells (``--engines``): the held-out TTS engine, ``espeak``, ``flite`` or ``festival``; the cell selects the corpus
preset ``loeo_<engine>`` (:data:`moezoo.tasks.speech.corpus.PRESETS`: the three engines, that one only in test;
half the test utterances are the held-out engine's, half held-out voices of the training engines). ``--corpus loeo5``
selects the five-engine presets ``loeo5_<engine>`` instead (``pico`` and ``mbrola`` added, from Debian contrib/
non-free; cells out of all five engines, every one of them by default; runs under ``bench_results/runs/speech-loeo5``
unless ``--out`` says otherwise; keep its ``--json`` apart from the three-engine one's; no ``--readme``: the README
block is the three-engine table). Every row trains
under the six acoustic conditions (speed, pitch, reverb, noise, band-limit, codec), each with probability 0.35 per
training utterance (the pilot ``configs/speech/loeo_flite_aug_omni_conformer_cpu20.yaml``); ``--variants noaug``
adds Omni-router and dense without them (an ablation: ``omni_noaug``, ``dense_noaug``).

Metric: CER on the held-out engine's test utterances (``test/cer_unseen_engine``); extra: CER/WER of the held-out
voices of the training engines (``*_seen_engine``), of the whole test set and of its code-switched utterances, LID
frame accuracy (LR-MoE), cross-layer routing agreement, the out-of-domain recordings of ``moezoo bench speech``. Every
run's other test metrics (per engine, voice, language) stay in the ``--json`` file's ``runs[].metrics``.

What the three cells are, with the default languages (en, de, es, fr): only espeak speaks several languages with one
voice, and flite and festival speak English only, so the held-out engine's test utterances are English and
monolingual in every cell, and nothing code-switched is ever held out (``cer_cs`` is of the training engines'
held-out voices). Without espeak (``--engines espeak``) train, val and test hold English monolingual utterances
only: no code-switching, and LR-MoE's language-ID head has one language to learn. In the five-engine corpus pico and
mbrola speak German, Spanish or French too (one language a voice): held-out pico or mbrola test utterances are in
several languages, and held-out espeak code-switches, between languages the training voices speak apart.

- ``--full``: the default corpus size, 6 epochs of 16 (the released recipe; the best validation-CER checkpoint
  tested), seeds 0 and 1, the three engines (30 runs; omni on flite: 7.8 CPU minutes, 10 minutes wall).
- ``--quick`` (the default): 160/24/64 utterances (numbers below 100), 120 steps of 8, no validation, seed 0, the
  three engines; each corpus is generated once (the ``espeak`` cell's, festival-heavy, takes longest). A check that
  the benchmark runs, not a result: at 120 steps the models still emit blanks only (CER 1.0 measured, omni on flite).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Sequence
from typing import Any

from moezoo.tasks.bench import speech
from moezoo.tasks.bench.suite import BenchSpec, Budget, cell_verdicts, cells_markdown
from moezoo.tasks.bench.suite import main as run_main
from moezoo.tasks.speech.augment import AUGMENTATIONS
from moezoo.tasks.speech.corpus import ENGINES, ENGINES3

DOMAIN = "speech-loeo"
AUGMENT_PROB = 0.35
#: the acoustic conditions every row trains under (the pilot's), as ``moezoo fit`` overrides
AUGMENT = ("--data.init_args.augment", f"[{', '.join(AUGMENTATIONS)}]", "--data.init_args.augment_prob",
           str(AUGMENT_PROB))  # fmt: skip
NO_AUGMENT = ("--data.init_args.augment", "[]")
#: the ablation: Omni-router and the dense twin without acoustic conditions (``--variants noaug``)
NOAUG = tuple(
    dataclasses.replace(v, name=f"{v.name}_noaug", overrides=NO_AUGMENT, description="no acoustic conditions")
    for v in speech.VARIANTS
    if v.name in ("omni", "dense")
)
VARIANTS = speech.VARIANTS + NOAUG
#: Omni-router against these rows, per held-out engine, in the README's verdicts
COMPARED = ("switch", "dense")
QUICK_OVERRIDES = (
    *AUGMENT,
    "--data.init_args.num_train", "160",
    "--data.init_args.num_val", "24",
    "--data.init_args.num_test", "64",
    "--data.init_args.max_number", "100",
    "--data.init_args.batch_size", "8",
    "--trainer.max_steps", "120",
    "--trainer.max_epochs", "-1",
    "--trainer.limit_val_batches", "0",
)  # fmt: skip


#: ``--corpus``: the family of presets ``<corpus>_<engine>`` a cell selects, and the engines it can hold out
CORPORA = {"loeo": ENGINES3, "loeo5": ENGINES}


def engine_overrides(engine: str, corpus: str = "loeo") -> tuple[str, ...]:
    """The cell: the corpus of the family ``corpus`` that leaves ``engine`` out of train and val."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r} is not a leave-one-engine-out corpus; choose from {list(CORPORA)}")
    if engine not in CORPORA[corpus]:
        raise ValueError(
            f"engine={engine!r} is not a TTS engine of the corpus {corpus!r}; choose from {list(CORPORA[corpus])}"
        )
    return ("--data.init_args.preset", f"{corpus}_{engine}")


def _label(engine: str) -> str:
    return f"held-out {engine}"


def unseen_languages(runs: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per cell, the languages of the held-out engine's monolingual test utterances (the ``test/cer_engine_<cell>_
    <language>`` metrics its runs logged)."""
    out: dict[str, list[str]] = {}
    for run in runs:
        pattern = re.compile(rf"test/cer_engine_{re.escape(run['cell'])}_([a-z]+)$")
        found = [m.group(1) for key in run["metrics"] if (m := pattern.match(key))]
        out.setdefault(run["cell"], [])
        out[run["cell"]] += [lang for lang in found if lang not in out[run["cell"]]]
    return out


def per_engine(runs: Sequence[dict[str, Any]]) -> str:
    """The README's result: the held-out-engine and the seen-engine CER (mean ± std over seeds) per variant and
    held-out engine; then Omni-router against Switch and dense on the held-out engine, and LR-MoE against Switch on
    the code-switched utterances, by the seed-spread rule of ``moezoo compare``
    (:func:`moezoo.tasks.compare.verdict`)."""
    seen = dataclasses.replace(SPEC, metric_key="test/cer_seen_engine")
    code_switched = dataclasses.replace(SPEC, metric_key="test/cer_cs")
    heard, by_variant = cells_markdown(SPEC, runs, ENGINES, _label)
    seen_table, _ = cells_markdown(seen, runs, ENGINES, _label)
    _, by_cs = cells_markdown(code_switched, runs, ENGINES, _label)
    engines = [e for e in ENGINES if any(r["cell"] == e for r in runs)]
    languages = unseen_languages(runs)
    lines = [
        "CER on the held-out engine's test utterances (`cer_unseen_engine`, mean ± std over seeds):", "", heard, "",
        "CER on the held-out voices of the training engines (`cer_seen_engine`):", "", seen_table, "",
        "The held-out engine's test utterances are in "
        + "; ".join(f"{e}: {', '.join(languages.get(e) or ['-'])}" for e in engines)
        + " (monolingual ones; only espeak code-switches, and held out only in the five-engine corpus).",
    ]  # fmt: skip
    rule = "(within the seed spread: |mean diff| <= the larger std over seeds; a plain screen at two seeds, not a test)"
    if "omni" in by_variant:
        lines += ["", f"Omni-router against Switch and dense on the held-out engine {rule}:", ""]
        lines += cell_verdicts(SPEC, by_variant, "omni", COMPARED, engines) or ["- (no run to compare with)"]
    if "lrmoe" in by_cs:
        lines += ["", f"LR-MoE against Switch on the code-switched test utterances (`cer_cs`) {rule}:", ""]
        lines += cell_verdicts(code_switched, by_cs, "lrmoe", ("switch",), engines) or ["- (no run to compare with)"]
    return "\n".join(lines)


SPEC = BenchSpec(
    domain=DOMAIN,
    description=__doc__ or "",
    dataset="generated spoken numbers (en, de, es, fr), espeak-ng / flite / festival with one engine left out of "
    "train and val, six acoustic conditions in training (p=0.35 each); CER on the held-out engine's test utterances "
    "(the row: mean over held-out engines of the mean over seeds; per engine below)",
    metric="cer_unseen_engine",
    metric_key="test/cer_unseen_engine",
    higher_is_better=False,
    throughput_unit="utterances/CPU-s",
    variants=VARIANTS,
    quick=Budget(seeds=(0,), variants=speech.NAMES, overrides=QUICK_OVERRIDES, cells=ENGINES3),
    full=Budget(seeds=(0, 1), variants=speech.NAMES, overrides=(*AUGMENT, "--trainer.max_epochs", "6"), cells=ENGINES3),
    extra_metrics=(
        "test/cer_seen_engine",
        "test/wer_unseen_engine",
        "test/wer_seen_engine",
        "test/cer",
        "test/wer",
        "test/cer_cs",
        "test/lid_acc",
        "test/routing_agreement",
        "test/routing_agreement_matched",
        "ood_cer",
    ),  # fmt: skip
    infer=speech.SPEC.infer,
    extras=speech.SPEC.extras,
    cell_option="engines",
    cell_overrides=engine_overrides,
    readme_extra=per_engine,
    groups=(("noaug", tuple(v.name for v in NOAUG)),),
)


def corpus_spec(corpus: str) -> BenchSpec:
    """:data:`SPEC` with its cells selecting the presets ``<corpus>_<engine>`` (every engine of the family by
    default)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r} is not a leave-one-engine-out corpus; choose from {list(CORPORA)}")
    if corpus == "loeo":
        return SPEC
    engines = CORPORA[corpus]
    return dataclasses.replace(
        SPEC,
        dataset=SPEC.dataset.replace("espeak-ng / flite / festival", " / ".join(("espeak-ng", *engines[1:]))),
        quick=dataclasses.replace(SPEC.quick, cells=engines),
        full=dataclasses.replace(SPEC.full, cells=engines),
        cell_overrides=functools.partial(engine_overrides, corpus=corpus),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    corpus = "loeo"
    if "--corpus" in args:  # this benchmark's own option: taken out before the common arguments are parsed
        at = args.index("--corpus")
        corpus = args[at + 1] if at + 1 < len(args) else ""
        if corpus not in CORPORA:
            print(f"moezoo bench {DOMAIN}: --corpus {corpus!r} unknown; choose from {list(CORPORA)}", file=sys.stderr)
            return 2
        del args[at : at + 2]
        if corpus != "loeo" and "--readme" in args:
            print(f"moezoo bench {DOMAIN}: --readme holds the three-engine table; --corpus {corpus} has no README "
                  "block (write --json and report from it)", file=sys.stderr)  # fmt: skip
            return 2
        if corpus != "loeo" and "--out" not in args:
            args += ["--out", f"bench_results/runs/{DOMAIN}{corpus.removeprefix('loeo')}"]
    engines = CORPORA[corpus]
    if "--engines" in args:  # fail before any run, naming the choices
        named: list[str] = []
        for value in args[args.index("--engines") + 1 :]:
            if value.startswith("--"):
                break
            named += [e for e in value.split(",") if e]
        bad = [e for e in named if e not in engines]
        if bad:
            print(
                f"moezoo bench {DOMAIN}: --engines {bad} unknown for --corpus {corpus}; choose from {list(engines)}",
                file=sys.stderr,
            )
            return 2
    return run_main(corpus_spec(corpus), args)


if __name__ == "__main__":
    sys.exit(main())
