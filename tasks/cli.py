"""``moezoo fit|validate|test|predict --config FILE``: LightningCLI in omegaconf mode.

The model and data are given by ``class_path`` in the config (subclass mode), so one entry point serves
every domain. After ``fit``, the test set is evaluated on the best checkpoint (the final weights when the
checkpoint callback monitors no metric) unless ``--test_after_fit false``. Configs in the old form (flat MoE
arguments, ``lr``/``weight_decay``/``warmup_frac``/``min_lr_ratio``) are upgraded as they are loaded, with one
warning (:mod:`moezoo.tasks.legacy`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from moezoo.extras import MissingExtraError, require

require("train", "moezoo fit|validate|test|predict")  # before the imports it guards

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from moezoo.io import write_json_atomic
from moezoo.stats import count_parameters
from moezoo.tasks.base import data_settings_of
from moezoo.tasks.legacy import register_config_loader
from moezoo.tasks.optim import class_options_as_specs, config_own_defaults

# The domain packages whose tasks and data modules configs name (one per folder of moezoo.tasks). Add a domain here.
DOMAINS = (
    "moezoo.tasks.vision",
    "moezoo.tasks.generation",
    "moezoo.tasks.speech",
    "moezoo.tasks.timeseries",
    "moezoo.tasks.detection",
)
log = logging.getLogger(__name__)
# Lightning annotates these Union[float, int, None], so the parser reads "1" as 1.0 (100 % of the batches); with int
# tried first, 1 means one batch and 1.0 all of them, as in Lightning's own documentation.
INT_FIRST_TRAINER_ARGS = tuple(f"limit_{stage}_batches" for stage in ("train", "val", "test", "predict"))


def import_domains() -> list[str]:
    """Import the domain packages so that configs can name their classes (also by their short names).

    A domain whose extra is not installed is skipped (noted in the debug log): a config that names one of its
    classes then fails with the error that names the extra to install.
    """
    imported = []
    for name in DOMAINS:
        try:
            importlib.import_module(name)
        except MissingExtraError as err:
            log.debug("skipped %s: %s", name, err)
            continue
        imported.append(name)
    return imported


def checkpoint_data_settings(ckpt_path: str | None) -> dict[str, Any]:
    """The ``data_settings`` a Lightning checkpoint of a :class:`~moezoo.tasks.base.MoETask` was trained with
    (``{}`` for another file), marked as coming from that checkpoint."""
    if not ckpt_path or not Path(ckpt_path).is_file() or Path(ckpt_path).suffix != ".ckpt":
        return {}
    import torch

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    settings = (checkpoint.get("hyper_parameters") or {}).get("data_settings") or {}
    return {name: {"value": s["value"], "from": f"the checkpoint {ckpt_path}"} for name, s in settings.items()}


class MoEZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in INT_FIRST_TRAINER_ARGS:
            action = parser._option_string_actions.get(f"--trainer.{name}")
            if action is not None and hasattr(action, "_typehint"):
                action._typehint = Union[int, float, None]  # noqa: UP007 (a runtime type hint object)
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="evaluate the test set after fit (best checkpoint)"
        )
        # Model settings follow the data (image size, channels, classes, vocabulary, look-back ...): known once the
        # data module is built; a conflicting explicit model_kwargs entry fails in MoETask.__init__, before fit.
        parser.link_arguments("data", "model.init_args.data_settings", self._data_settings, apply_on="instantiate")

    _checkpoint_settings: dict[str, Any] = {}

    def _data_settings(self, datamodule: L.LightningDataModule) -> dict[str, Any] | None:
        return data_settings_of(datamodule, self._checkpoint_settings)

    def before_instantiate_classes(self) -> None:
        """With ``--ckpt_path``, the checkpoint's data-decided settings are the defaults of the link (a
        predict-only data module knows the image size but not the class count the model was trained with)."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        self._checkpoint_settings = checkpoint_data_settings(config.get("ckpt_path"))

    #: the task arguments named on the command line (``--model.init_args.<name>``), kept over a checkpoint's
    _command_line_model_args: tuple[str, ...] = ()

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        command_line = sys.argv[1:] if args is None else args
        self._command_line_model_args = model_args_named(command_line)
        # model_kwargs set two or more levels deep are merged in after parsing (the parser would replace the
        # config's sub-dict and keep the value as text); the rest is parsed as usual.
        argv, nested = split_nested_model_kwargs(command_line)
        # --print_config waits for that merge (jsonargparse's own action, private API, pinned in constraints.txt)
        from jsonargparse._actions import _ActionPrintConfig

        with _ActionPrintConfig.skip_print_config() if nested else contextlib.nullcontext():
            if args is None and (nested or class_options_as_specs(argv) != argv):
                # An optimiser or scheduler class named on the command line gets its own defaults, as in a config.
                self.config = parser.parse_args(class_options_as_specs(argv))  # as LightningCLI parses sys.argv
            else:
                args = class_options_as_specs(argv) if isinstance(argv, list) else argv
                super().parse_arguments(parser, args)  # type: ignore[arg-type]
        # Before LightningCLI reads --ckpt_path's hyperparameters (a safetensors release is no checkpoint).
        from moezoo.tasks.zoo.finetune import check_ckpt_path

        subcommand = self.config.get("subcommand")
        merge_nested_model_kwargs(self.config.get(subcommand) if subcommand else self.config, nested)
        if nested:
            _ActionPrintConfig.print_config_if_requested(parser, self.config)
        if subcommand is not None:
            check_ckpt_path(self.config.get(subcommand, {}).get("ckpt_path"), subcommand)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the config's model by the checkpoint's: first make sure both are the same task, so
        that a checkpoint of another task is an error naming both instead of a failure deep in the run."""
        check_checkpoint_task(self.config)
        # Lightning lets the checkpoint's hyperparameters overwrite the command line too; what the user typed for
        # this run (a score threshold, an output folder, an evaluation setting) wins over what training saved.
        subcommand = self.config.get("subcommand")
        typed: dict[str, Any] = {}
        if subcommand and self._command_line_model_args:
            init_args = self.config[subcommand]["model"].get("init_args") or {}
            typed = {name: init_args[name] for name in self._command_line_model_args if name in init_args}
        super()._parse_ckpt_path()
        if typed:
            init_args = self.config[subcommand]["model"].get("init_args") or {}
            for name, value in typed.items():
                if name in init_args:
                    init_args[name] = value

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


def model_option_path(arg: object) -> tuple[list[str], str | None]:
    """The task argument path a command-line token sets, and its ``=value`` if it carries one:
    ``--model.init_args.model_kwargs.moe.dense=true`` (or the short ``--model.model_kwargs...``) gives
    ``(["model_kwargs", "moe", "dense"], "true")``; a token that is not a ``--model.`` option gives ``([], None)``."""
    if not isinstance(arg, str) or not arg.startswith("--model."):
        return [], None
    option, eq, value = arg.partition("=")
    path = option.split(".")[1:]
    if path and path[0] == "init_args":
        path = path[1:]
    return path, (value if eq else None)


def model_args_named(args: object) -> tuple[str, ...]:
    """The task's arguments a command line sets: ``--model.init_args.predict_conf 0.1`` (or ``=0.1``, or the short
    ``--model.predict_conf``) names ``predict_conf``; nested ones (``--model.init_args.optimizer.init_args.lr``)
    name their top-level argument."""
    if not isinstance(args, (list, tuple)):
        return ()
    names = []
    for arg in args:
        path, _ = model_option_path(arg)
        if path and path[0] not in ("class_path", "init_args", "dict_kwargs"):
            names.append(path[0])
    return tuple(dict.fromkeys(names))


def split_nested_model_kwargs(args: object) -> tuple[object, list[tuple[tuple[str, ...], str]]]:
    """``args`` without the ``model_kwargs`` entries they set two or more levels deep, and those entries as (key
    path, text): ``--model.init_args.model_kwargs.moe.dense true`` (or ``=true``, or the short
    ``--model.model_kwargs.moe.dense``) gives ``(("moe", "dense"), "true")``. One level deep
    (``--model.init_args.model_kwargs.depth 3``) stays with the parser, which types and merges it."""
    if not isinstance(args, (list, tuple)):
        return args, []
    rest: list[Any] = []
    nested = []
    i = 0
    while i < len(args):
        path, text = model_option_path(args[i])
        if len(path) >= 3 and path[0] == "model_kwargs" and (text is not None or i + 1 < len(args)):
            if text is None:
                i, text = i + 1, args[i + 1]
            nested.append((tuple(path[1:]), text))
        else:
            rest.append(args[i])
        i += 1
    return (rest if isinstance(args, list) else tuple(rest)), nested


def merge_nested_model_kwargs(config: Any, nested: Sequence[tuple[tuple[str, ...], str]]) -> None:
    """Set each (key path, text) of :func:`split_nested_model_kwargs` in the config's ``model_kwargs``, typed as
    YAML (``true`` is ``True``, ``2`` is 2, ``[3, 5]`` a list) and merged into what the config already holds there:
    ``--model.init_args.model_kwargs.moe.top_k 1`` keeps the config's other ``moe`` entries."""
    if not nested or config is None:
        return
    import yaml

    kwargs = dict(config.get("model.init_args.model_kwargs") or {})
    for path, text in nested:
        node = kwargs
        for key in path[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ValueError(
                    f"--model.init_args.model_kwargs.{'.'.join(path)}: model_kwargs.{key} is {child!r}, not a mapping"
                )
            else:
                child = node[key] = dict(child)
            node = child
        try:
            node[path[-1]] = yaml.safe_load(text)
        except yaml.YAMLError:
            node[path[-1]] = text  # not YAML: the model's own check names the argument
    config["model.init_args.model_kwargs"] = kwargs


def check_checkpoint_task(config: Any) -> None:
    """ValueError when ``ckpt_path`` holds a checkpoint of another task than the config's ``model``."""
    subcommand = config.get("subcommand")
    ckpt_path = config[subcommand].get("ckpt_path") if subcommand else None
    if not ckpt_path or not Path(ckpt_path).is_file():
        return
    import torch

    saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {}).get("_class_path")
    wanted = config[subcommand].get("model", {}).get("class_path")
    if not saved or not wanted:
        return
    same = saved == wanted if "." in wanted else saved.rsplit(".", 1)[-1] == wanted
    if not same:
        raise ValueError(
            f"ckpt_path={str(ckpt_path)!r} is a checkpoint of the task {saved}, but the config's model is {wanted}: "
            "use a checkpoint of this task, or the config the checkpoint was trained with"
        )


def cli_main(args: list[str] | None = None, run: bool = True) -> MoEZooCLI:
    import_domains()
    return MoEZooCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # omegaconf, the legacy shim, then the optimiser's and scheduler's own defaults for a class named in a config
        parser_kwargs={"parser_mode": register_config_loader(config_own_defaults)},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
