"""``moezoo bench vision [--quick] [--tables-json PATH]``: ViT-MoE routers and their dense twin on scikit-learn digits.

Each row trains ``moe_vit_tiny`` at the settings of ``configs/vision/digits_moe_vit.yaml`` (8 experts, top-2,
every other block; AdamW lr 2e-3, weight decay 0.05, label smoothing 0.1, batch 64, seed 0) for ``--epochs``
epochs and reports, on the seeded test split (359 images): accuracy of the final weights, parameters active per
token and total, training throughput (images/s over the timed optimiser steps), inference throughput (median
images/s in eval mode, batch 256), expert-load CV, dropped fraction and the class x expert routing shares.

``--quick``: the top-k MoE and its dense twin, 20 epochs each. Default (full): every built-in router (top-k, expert
choice, Sinkhorn, loss-free sigmoid, ReLU, Soft MoE) and the dense twin, 150 epochs each (the config's schedule).
Output follows the contract of :mod:`moezoo.bench.tables`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from moezoo.bench.tables import BenchRow, inference_throughput, routing_stats, write_domain_json

DOMAIN = "vision"
MODEL = "moe_vit_tiny"
MODEL_KWARGS: dict[str, Any] = dict(
    img_size=8, patch_size=2, in_chans=1, num_classes=10, dim=64, depth=4, num_heads=4, num_experts=8, top_k=2
)
QUICK_ROUTERS = ("topk", "dense")
FULL_ROUTERS = ("topk", "expert_choice", "sinkhorn", "sigmoid_lossfree", "relu", "soft", "dense")
QUICK_EPOCHS, FULL_EPOCHS = 20, 150


def run_one(router: str, epochs: int, seed: int = 0) -> BenchRow:
    """Train one model (a router, or ``"dense"`` for the twin) and measure it."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from moezoo.tasks.vision import DigitsDataModule, ImageClassificationTask
    from moezoo.zoo import count_params

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.seconds = 0.0
            self.samples = 0
            self._start = 0.0

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.seconds += time.perf_counter() - self._start
            self.samples += int(batch[0].shape[0])

    L.seed_everything(seed, verbose=False)
    kwargs = dict(MODEL_KWARGS, dense=True) if router == "dense" else dict(MODEL_KWARGS, router=router)
    task = ImageClassificationTask(MODEL, kwargs, lr=0.002, weight_decay=0.05, label_smoothing=0.1)
    data = DigitsDataModule(batch_size=64, seed=seed)
    timer = StepTimer()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    model = task.model.eval()
    assert data.test_set is not None
    x_test, y_test = (torch.stack(t) for t in zip(*(data.test_set[i] for i in range(len(data.test_set)))))
    with torch.no_grad():
        acc = float((model(x_test).argmax(-1) == y_test).float().mean())
    batches = list(zip(x_test.split(128), y_test.split(128)))
    stats = routing_stats(model.forward_with_aux, batches, [str(c) for c in range(10)], "class")
    params = count_params(model)
    return BenchRow(
        model=MODEL,
        router=router,
        metric=acc,
        active_params=params["active"],
        total_params=params["total"],
        train_throughput=timer.samples / max(timer.seconds, 1e-9),
        infer_throughput=inference_throughput(model, x_test),
        expert_load_cv=stats.get("expert_load_cv"),
        dropped_frac=stats.get("dropped_frac"),
        expert_load=stats.get("expert_load"),
        specialisation=stats.get("specialisation"),
        extra={"epochs": epochs, "seed": seed, "test_images": int(x_test.shape[0])},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moezoo bench vision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="top-k and dense, 20 epochs (default: all, 150)")
    parser.add_argument("--tables-json", default=None, help="write the result here (moezoo bench tables format)")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs of the chosen settings")
    parser.add_argument("--routers", default=None, help="comma-separated routers (and/or 'dense') to run")
    args = parser.parse_args(argv)
    routers = args.routers.split(",") if args.routers else (QUICK_ROUTERS if args.quick else FULL_ROUTERS)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else FULL_EPOCHS)
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    from moezoo.layers import ROUTERS

    unknown = [r for r in routers if r != "dense" and r not in ROUTERS]
    if unknown:
        raise ValueError(f"--routers {unknown} are not registered; choose from {sorted(ROUTERS)} or 'dense'")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    for router in routers:
        start = time.perf_counter()
        row = run_one(router, epochs)
        rows.append(row)
        print(
            f"{router:18s} acc={row.metric:.4f} active/total={row.active_params}/{row.total_params} "
            f"train={row.train_throughput:.0f}/s infer={row.infer_throughput:.0f}/s "
            f"cv={row.expert_load_cv if row.expert_load_cv is not None else '-'} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    if args.tables_json:
        write_domain_json(
            args.tables_json, DOMAIN, "quick" if args.quick else "full",
            f"scikit-learn digits (8x8, 10 classes), seeded split, {rows[0].extra['test_images']} test images",
            "acc", True, "images/s", rows,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
