"""The callbacks every task gets: routing analytics (JSON, heatmaps, TensorBoard) at each validation and test end,
training throughput; both added once, and not when the trainer already has them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from moezoo.stats import count_parameters
from moezoo.tasks.callbacks import RoutingAnalytics, ThroughputMonitor
from moezoo.tasks.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke" / "vision_digits_moe_vit.yaml")


def _task_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[L.LightningModule, L.LightningDataModule]:
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", SMOKE, "--trainer.logger", "false"], run=False)
    return cli.model, cli.datamodule


def test_routing_files_at_every_validation_and_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task, data = _task_and_data(tmp_path, monkeypatch)
    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    trainer = L.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(task, datamodule=data)
    trainer.test(task, datamodule=data, verbose=False)
    assert sum(isinstance(c, RoutingAnalytics) for c in trainer.callbacks) == 1
    assert sum(isinstance(c, ThroughputMonitor) for c in trainer.callbacks) == 1
    folder = Path(logger.log_dir) / "routing"
    names = sorted(p.name for p in folder.iterdir())
    for stem in ("val_step000004", "val_step000008", "test_step000008"):  # no file for the sanity check
        assert {f"{stem}.json", f"{stem}_expert_load.png", f"{stem}_specialisation.png"} <= set(names)
    assert len(names) == 9
    record = json.loads((folder / "test_step000008.json").read_text())
    assert (record["stage"], record["global_step"], record["model"]) == ("test", 8, "moe_vit_debug")
    assert record["params"]["total"] == count_parameters(task.model).total
    assert record["params"]["active"] == count_parameters(task.model).active
    test_images = 2 * 32
    tokens = test_images * (16 + 1)  # 8x8 digits in 2x2 patches + the class token
    assert record["groups"] == [str(c) for c in range(10)] and record["group_by"] == "class"
    for layer in record["layers"]:  # dropless top-2: every token makes two pairs
        assert layer["tokens"] == tokens and sum(layer["expert_counts"]) == 2 * tokens
        assert all(sum(row) == pytest.approx(1.0) or sum(row) == 0 for row in layer["group_share"])
    assert record["specialisation"]["layer"] == len(record["layers"]) - 1
    throughput = json.loads((Path(logger.log_dir) / "throughput.json").read_text())
    assert throughput["train"]["items"] == (8 - 3) * 32 and throughput["train"]["items_per_s"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"routing/val/layer0/load_cv", "routing/test/layer1/router_entropy", "train/samples_per_s"} <= scalars
    assert {"routing/val/expert_load", "routing/val/specialisation", "routing/test/expert_load"} <= images
    assert [e.step for e in events.Scalars("routing/val/layer0/dropped_frac")] == [4, 8]


def test_callbacks_given_to_the_trainer_are_not_doubled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task, data = _task_and_data(tmp_path, monkeypatch)
    mine = RoutingAnalytics(plots=False, dirname="mine")
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, limit_test_batches=1, logger=False, callbacks=[mine],
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(task, datamodule=data)
    trainer.test(task, datamodule=data, verbose=False)
    assert [c for c in trainer.callbacks if isinstance(c, RoutingAnalytics)] == [mine]
    assert mine.written["test"] == tmp_path / "mine" / "test_step000002.json"
    assert not list((tmp_path / "mine").glob("*.png")) and not (tmp_path / "routing").exists()
