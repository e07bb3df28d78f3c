"""``moezoo fit|validate|test|predict --config FILE``: LightningCLI in omegaconf mode.

The model and data are given by ``class_path`` in the config (subclass mode), so one entry point serves
every domain. After ``fit``, the test set is evaluated on the best checkpoint (the final weights when the
checkpoint callback monitors no metric) unless ``--test_after_fit false``.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from moezoo.stats import count_parameters


def import_domains() -> list[str]:
    """Import every domain package of ``moezoo.tasks`` so that configs can name their classes."""
    import moezoo.tasks

    names = [f"moezoo.tasks.{info.name}" for info in pkgutil.iter_modules(moezoo.tasks.__path__) if info.ispkg]
    for name in names:
        importlib.import_module(name)
    return names


class MoEZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="evaluate the test set after fit (best checkpoint)"
        )

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        if not config.get("test_after_fit", True) or self.trainer.interrupted:
            return
        datamodule = self.datamodule
        if datamodule is None or not hasattr(datamodule, "test_dataloader"):
            return
        checkpoint = self.trainer.checkpoint_callback
        # "best" only means something when a metric is monitored; otherwise test the final weights (in memory).
        monitored = isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor is not None
        best = checkpoint.best_model_path if monitored else ""  # type: ignore[union-attr]
        ckpt_path = "best" if best else None
        results = self.trainer.test(self.model, datamodule=datamodule, ckpt_path=ckpt_path)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a broadcast under DDP: on every rank
        if results and self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in results[0].items()}
            metrics["params/total"] = float(count_parameters(self.model).total)  # sharded experts at full size
            write_json_atomic(Path(log_dir) / "test_metrics.json", metrics)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def cli_main(args: list[str] | None = None, run: bool = True) -> MoEZooCLI:
    import_domains()
    return MoEZooCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
