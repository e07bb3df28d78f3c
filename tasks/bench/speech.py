"""``moezoo bench speech``: dense vs Switch vs Omni-router vs LR-MoE vs global-embedding routing on the generated
multilingual / code-switched spoken-number corpus, run as ``moezoo fit`` of the speech configs.

Rows (``configs/speech/numbers_<variant>_conformer.yaml``: ``moe_conformer_tiny``, 4 experts top-1, equal active
parameters, AdamW with warmup-cosine, gradient clipping at 1.0, SpecAugment). Metric: CER on the held-out test
voices; extra: WER, CER/WER of monolingual and code-switched utterances, LID frame accuracy (LR-MoE), cross-layer
agreement of top-1 routing (raw and after the best relabelling of experts), and the CER/WER of the 10 real
recordings of ``pocketsphinx-testdata`` (out of domain: a second ``test`` of the fitted task). Routing shares per
language (code-switched utterances form the group ``"cs"``). Inference throughput: up to 128 test utterances.

- ``--full``: the default corpus, 6 epochs of 16 (1128 steps, validation each epoch, the best validation-CER
  checkpoint tested), seeds 0 and 1: ``moezoo fit --config configs/speech/numbers_<variant>_conformer.yaml
  --seed_everything <seed> --trainer.max_epochs 6``.
- ``--quick``: the ``quick`` corpus preset, 400 steps of 8, no validation, seed 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import lightning as L

from moezoo.tasks.bench.runner import test_set_throughput
from moezoo.tasks.bench.suite import BenchSpec, Budget, Variant
from moezoo.tasks.bench.suite import main as run_main
from moezoo.tasks.callbacks import log_dir_of

DOMAIN = "speech"
VARIANTS = (
    Variant("dense", "configs/speech/numbers_dense_conformer.yaml", "dense"),
    Variant("switch", "configs/speech/numbers_switch_conformer.yaml", "topk"),
    Variant("omni", "configs/speech/numbers_omni_conformer.yaml", "omni"),
    Variant("lrmoe", "configs/speech/numbers_lrmoe_conformer.yaml", "language"),
    Variant("global", "configs/speech/numbers_global_conformer.yaml", "global_embedding"),
)
NAMES = tuple(v.name for v in VARIANTS)
INFER_UTTERANCES = 128


def utterance_forward(task: L.LightningModule, batch: Any) -> int:
    task(batch["features"], batch["lengths"])
    return utterance_count(batch)


def utterance_count(batch: Any) -> int:
    return len(batch["lengths"])


def out_of_domain(cli: Any) -> dict[str, Any]:
    """``ood_cer``/``ood_wer``: a ``test`` of the fitted task on the recordings of pocketsphinx-testdata (its own
    trainer and folder, so the run's test files stay those of the corpus)."""
    from torch.utils.data import DataLoader

    from moezoo.tasks.speech.data import SpeechDataset, collate_speech, pocketsphinx_entries

    try:
        entries = pocketsphinx_entries()
    except ValueError as err:
        print(f"note: no out-of-domain test ({err})")
        return {}
    task, datamodule = cli.model, cli.datamodule
    dataset = SpeechDataset(entries, datamodule.vocab, datamodule.languages, preload=True)
    root = str(log_dir_of(cli.trainer) / "ood")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=root, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    (result,) = trainer.test(task, dataloaders=DataLoader(dataset, batch_size=10, collate_fn=collate_speech),
                             verbose=False)  # fmt: skip
    return {"ood_cer": float(result["test/cer"]), "ood_wer": float(result["test/wer"])}


SPEC = BenchSpec(
    domain=DOMAIN,
    description=__doc__ or "",
    dataset="generated spoken numbers (en, de, es, fr; monolingual and code-switched), CER on the held-out test voices",
    metric="cer",
    metric_key="test/cer",
    higher_is_better=False,
    throughput_unit="utterances/CPU-s",
    variants=VARIANTS,
    quick=Budget(
        seeds=(0,),
        variants=NAMES,
        overrides=(
            "--data.init_args.preset",
            "quick",
            "--data.init_args.batch_size",
            "8",
            "--trainer.max_steps",
            "400",
            "--trainer.max_epochs",
            "-1",
            "--trainer.limit_val_batches",
            "0",
        ),
    ),  # fmt: skip
    full=Budget(seeds=(0, 1), variants=NAMES, overrides=("--trainer.max_epochs", "6")),
    extra_metrics=(
        "test/wer",
        "test/cer_mono",
        "test/cer_cs",
        "test/wer_mono",
        "test/wer_cs",
        "test/lid_acc",
        "test/routing_agreement",
        "test/routing_agreement_matched",
        "ood_cer",
        "ood_wer",
    ),  # fmt: skip
    infer=test_set_throughput(INFER_UTTERANCES, utterance_forward, utterance_count),
    extras=out_of_domain,
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
