"""``moezoo bench generation``: class-conditional DiT-MoE on Fashion-MNIST, run as ``moezoo fit`` of its configs.

Rows (``configs/vision/dit_fmnist_<variant>.yaml``, equal active FFN width per token): the dense twin, softmax
top-2 token choice, expert choice and ProMoE. Metric: FD-FMNIST of the final EMA weights' class-balanced samples
(Frechet distance in the features of the shipped Fashion-MNIST CNN against the 10k test images; lower is better;
not FID); extra: the CNN's accuracy on the samples and the routing purity of the test batches; inference
throughput = class-conditional sampling (the config's sampler, steps and guidance), images/s.

- ``--full``: 2000 steps of 64, 2000 samples, seeds 0 and 1 (``--trainer.max_steps 2000
  --model.init_args.eval_num_samples 2000 --model.init_args.sample_every_n_steps 0``).
- ``--quick``: 100 steps of 32, 200 samples with 8 sampler steps, no validation, seeds 0 and 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning as L
import torch

from moezoo.stats import median_rates
from moezoo.tasks.bench.runner import Rates
from moezoo.tasks.bench.suite import BenchSpec, Budget, Variant
from moezoo.tasks.bench.suite import main as run_main

DOMAIN = "generation"
NAMES = ("dense", "topk", "expert_choice", "promoe")
VARIANTS = tuple(Variant(n, f"configs/vision/dit_fmnist_{n}.yaml", n) for n in NAMES)
SAMPLES = 50


def infer(task: L.LightningModule, datamodule: L.LightningDataModule) -> Rates:
    """Class-conditional samples per wall and per CPU second of the task's sampler (EMA weights)."""
    from moezoo.tasks.generation import ImageGenerationTask

    if not isinstance(task, ImageGenerationTask):
        raise TypeError(f"the generation benchmark runs ImageGenerationTask configs, got {type(task).__name__}")
    y = torch.arange(SAMPLES) % task.num_classes

    def sample() -> int:
        task.generate(y)
        return SAMPLES

    return median_rates(sample, repeats=2, warmup=1)


SPEC = BenchSpec(
    domain=DOMAIN,
    description=__doc__ or "",
    dataset="Fashion-MNIST (IDX files), 28x28, 10 classes; FD-FMNIST against the 10k test images",
    metric="fd_fmnist",
    metric_key="test/fd_fmnist",
    higher_is_better=False,
    throughput_unit="images/CPU-s",
    variants=VARIANTS,
    quick=Budget(
        seeds=(0, 1),
        variants=NAMES,
        overrides=(
            "--trainer.max_steps",
            "100",
            "--data.init_args.batch_size",
            "32",
            "--trainer.limit_val_batches",
            "0",
            "--model.init_args.eval_num_samples",
            "200",
            "--model.init_args.num_sampling_steps",
            "8",
            "--model.init_args.sample_every_n_steps",
            "0",
        ),
    ),  # fmt: skip
    full=Budget(
        seeds=(0, 1),
        variants=NAMES,
        overrides=(
            "--trainer.max_steps",
            "2000",
            "--model.init_args.eval_num_samples",
            "2000",
            "--model.init_args.sample_every_n_steps",
            "0",
        ),
    ),  # fmt: skip
    extra_metrics=("test/sample_acc", "test/routing_purity"),
    infer=infer,
    notes="inference throughput = class-conditional sampling with the config's sampler, steps and guidance",
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
