"""Manifests for the forgetting experiment: fine-tune the speech release on a voice engine it never heard and measure
CER on that engine and on its original test voices (``configs/forgetting/speech_festival_*.yaml``).

The release (``moe_conformer_tiny.numbers_omni``) was trained on the ``default`` corpus: espeak-ng and flite voices.
The ``loeo_flite`` corpus (:mod:`.corpus`) adds festival's English voices to training and keeps flite for its test
split (espeak-ng and flite test voices: the release's engines, voices held out from its training). From it this writes
JSONL manifests (:class:`~moezoo.tasks.speech.data.ManifestDataModule`), every audio path absolute:

- ``new_train.jsonl`` / ``new_test.jsonl``: festival utterances of the training split, shuffled (``seed``) and cut
  into ``num_new_test`` held-out ones and the rest (the new voices: same speakers, other utterances);
- ``orig_test.jsonl``: the test split's espeak-ng and flite utterances (the release's test voices, held out from
  its training; mono and code-switched, en/de/es/fr);
- ``mix_train.jsonl``: ``new_train`` plus ``mix_fraction`` as many espeak-ng/flite training utterances (the remedy
  of rehearsing the original corpus).

``python -m moezoo.tasks.speech.forgetting --out runs/forgetting`` (the corpus is generated first if missing).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moezoo.io import write_text_atomic

NEW_ENGINE = "festival"
ORIGINAL_ENGINES = ("espeak", "flite")


def manifest_row(row: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A corpus manifest row as a :class:`ManifestDataModule` row; a code-switched utterance keeps its first
    language (the manifest has one language per utterance)."""
    return {"audio": str(folder / row["audio"]), "text": row["text"], "language": str(row["language"]).split("+")[0]}


def forgetting_sets(
    rows: Sequence[dict[str, Any]], num_new_test: int = 50, mix_fraction: float = 0.5, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """The four sets from the ``engines`` corpus's manifest rows (see the module docstring)."""
    if not 0 <= mix_fraction <= 1:
        raise ValueError(f"mix_fraction must be in [0, 1], got {mix_fraction}")
    rng = random.Random(seed)
    new = [r for r in rows if r["split"] == "train" and r["engine"] == NEW_ENGINE]
    if len(new) <= num_new_test:
        raise ValueError(
            f"num_new_test={num_new_test} leaves no {NEW_ENGINE} utterance to train on ({len(new)} in all)"
        )
    rng.shuffle(new)
    new_test, new_train = new[:num_new_test], new[num_new_test:]
    original_train = [r for r in rows if r["split"] == "train" and r["engine"] in ORIGINAL_ENGINES]
    rehearsal = rng.sample(original_train, round(mix_fraction * len(new_train)))
    mix = new_train + rehearsal
    rng.shuffle(mix)
    original_test = [r for r in rows if r["split"] == "test" and r["engine"] in ORIGINAL_ENGINES]
    return {"new_train": new_train, "new_test": new_test, "orig_test": original_test, "mix_train": mix}


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    from moezoo.tasks.speech.corpus import PRESETS, generate_corpus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the manifests")
    parser.add_argument("--num-new-test", type=int, default=50)
    parser.add_argument("--mix-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = generate_corpus(PRESETS["loeo_flite"], None, 2, progress=False)
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]
    written = {}
    for name, subset in forgetting_sets(rows, args.num_new_test, args.mix_fraction, args.seed).items():
        text = "".join(json.dumps(manifest_row(r, folder), ensure_ascii=False) + "\n" for r in subset)
        written[name] = write_text_atomic(Path(args.out) / f"{name}.jsonl", text)
        print(f"{written[name]}: {len(subset)} utterances")
    return written


if __name__ == "__main__":
    main()
