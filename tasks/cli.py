"""``moezoo fit|validate|test|predict --config FILE``: LightningCLI in omegaconf mode.

The model and data are given by ``class_path`` in the config (subclass mode), so one entry point serves
every domain. After ``fit``, the test set is evaluated on the best checkpoint unless ``--test_after_fit false``.
"""

from __future__ import annotations

import importlib

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Domain packages whose tasks and data modules the CLI can name by class_path.
DOMAINS = ("moezoo.tasks.vision",)


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
        checkpoint = next((c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=datamodule, ckpt_path=ckpt_path)


def cli_main(args: list[str] | None = None) -> MoEZooCLI:
    for module in DOMAINS:
        importlib.import_module(module)
    return MoEZooCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )
