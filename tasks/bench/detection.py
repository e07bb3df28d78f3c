"""``moezoo bench detection``: YOLO-MoE against a single detector and an equal-compute single detector, run as
``moezoo fit`` of ``configs/bench/detection/canvas_<variant>.yaml``.

Rows: ``dense`` (one expert), ``wide2``/``wide4`` (one detector widened to the FLOPs of 2/4 experts),
``moe2``/``moe4`` (2/4 experts blended per scale by the learned router). Every variant trains from scratch for the
same steps on the same seeded canvases (real digits, a clean and a degraded domain) and its final weights are
tested with COCO metrics per domain on canvases whose items come from a disjoint pool. Metric: mAP@[.5:.95] on the
clean test canvases; extra: mAP, mAP50 and AR100 overall and per domain, forward MFLOPs per image. Routing
shares per domain (the blend router's per-image weights; its three scales are its three layers). Inference
throughput on 64 test canvases. Every expert runs on every image, so active parameters equal total parameters.

- ``--full``: nano models, 1000 steps of 32, 4000 training and 1000 test canvases, all five variants, seeds 0, 1.
- ``--quick``: debug models, 150 steps of 16, 512 training and 200 test canvases, lr 3e-3, no validation,
  dense / wide4 / moe2 / moe4, seeds 0 and 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import lightning as L

from moezoo.tasks.bench.runner import test_set_throughput
from moezoo.tasks.bench.suite import BenchSpec, Budget, Variant
from moezoo.tasks.bench.suite import main as run_main

DOMAIN = "detection"
NAMES = ("dense", "wide2", "wide4", "moe2", "moe4")
VARIANTS = tuple(Variant(n, f"configs/bench/detection/canvas_{n}.yaml", n) for n in NAMES)
INFER_IMAGES = 64


def image_forward(task: L.LightningModule, batch: Any) -> int:
    task(batch["images"])
    return image_count(batch)


def image_count(batch: Any) -> int:
    return int(batch["images"].shape[0])


def size(cli: Any) -> dict[str, Any]:
    """Forward MFLOPs per image and the detector's base width."""
    from moezoo.models.yolo import count_flops

    model, data = cli.model.model, cli.datamodule
    return {"mflops_per_image": count_flops(model, data.img_size, model.in_chans) / 1e6, "width": model.width}


SPEC = BenchSpec(
    domain=DOMAIN,
    description=__doc__ or "",
    dataset="digit canvases 64px (half clean, half degraded; test items from a disjoint pool), mAP on the clean "
    "test canvases",
    metric="map",
    metric_key="test/mAP_clean",
    higher_is_better=True,
    throughput_unit="images/CPU-s",
    variants=VARIANTS,
    quick=Budget(
        seeds=(0, 1),
        variants=("dense", "wide4", "moe2", "moe4"),
        overrides=(
            "--model.init_args.model",
            "moe_yolo_debug",
            "--trainer.max_steps",
            "150",
            "--data.init_args.batch_size",
            "16",
            "--data.init_args.num_train",
            "512",
            "--data.init_args.num_test",
            "200",
            "--model.init_args.optimizer.init_args.lr",
            "0.003",
            "--trainer.limit_val_batches",
            "0",
        ),
    ),  # fmt: skip
    full=Budget(seeds=(0, 1), variants=NAMES),
    extra_metrics=(
        "test/mAP",
        "test/mAP50",
        "test/AR100",
        "test/mAP50_clean",
        "test/AR100_clean",
        "test/mAP_degraded",
        "test/mAP50_degraded",
        "test/AR100_degraded",
        "mflops_per_image",
    ),  # fmt: skip
    infer=test_set_throughput(INFER_IMAGES, image_forward, image_count),
    extras=size,
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
