"""The base Lightning task: builds a model by name, adds and logs MoE losses and statistics, updates router state.

Domain tasks subclass :class:`MoETask` and implement :meth:`MoETask.compute_loss`; ``training_step``,
``validation_step`` and ``test_step`` share :meth:`MoETask._shared_step`. They declare only their own arguments
and forward the rest (``optimizer``, ``lr_scheduler``, ``aux_loss_coef``) with ``**kwargs``, which LightningCLI
resolves, so ``moezoo fit --help`` and ``--print_config`` list them for every task.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from moezoo import surgery
from moezoo.io import remove_stale_temporaries, temporary_beside
from moezoo.layers import MoEAux, summarize_aux, total_aux_loss, update_router_states
from moezoo.models.registry import build_task_model
from moezoo.models.spec import upgrade_model_kwargs, warn_legacy
from moezoo.stats import RoutingStats, TokenGroups
from moezoo.tasks.optim import (
    DEFAULT_LR_SCHEDULER,
    DEFAULT_OPTIMIZER,
    as_factory,
    build_optimizer,
    interval,
    param_groups,
    warmup_cosine,
)

log = logging.getLogger(__name__)
__all__ = [
    "MoETask",
    "data_settings_of",
    "freeze_all_but",
    "merge_data_settings",
    "param_groups",
    "save_final_checkpoint",
    "warmup_cosine",
]


def merge_data_settings(model_kwargs: dict[str, Any], data_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model_kwargs`` with the settings the data decides filled in (``moezoo fit`` links them from the data
    module's ``model_settings()``: ``{kwarg: {"value": v, "from": data key}}``).

    A setting given in both places must agree: a conflict raises ``ValueError`` naming both keys.
    """
    merged = dict(model_kwargs)
    for name, setting in (data_settings or {}).items():
        if not isinstance(setting, Mapping) or "value" not in setting:
            raise TypeError(f"data_settings[{name!r}] must be a mapping with 'value' (and 'from'), got {setting!r}")
        value, source = setting["value"], setting.get("from", "data")
        if name in merged and merged[name] != value:
            raise ValueError(
                f"model.init_args.model_kwargs.{name}={merged[name]!r} conflicts with {source}={value!r}: the data "
                f"decides this setting; remove model.init_args.model_kwargs.{name} from the config (it then follows "
                f"the data) or change {source}"
            )
        merged[name] = value
    return merged


def data_settings_of(datamodule: Any, defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The model settings a data module decides, as ``MoETask(data_settings=...)`` takes them: its
    ``model_settings()`` (``{model kwarg: (value, data key)}``) as ``{kwarg: {"value": v, "from": "data.<key>"}}``
    over ``defaults`` (a checkpoint's: a predict-only data module does not know the class count);
    ``None`` for a data module without ``model_settings``.

    ``moezoo fit`` links it to ``model.init_args.data_settings`` (:mod:`moezoo.tasks.cli`); tasks built from specs
    outside the command line (``moezoo zoo release``) apply it through :func:`moezoo.tasks.specs.with_data_settings`.
    """
    settings = getattr(datamodule, "model_settings", None)
    if not callable(settings):
        return defaults or None
    init_args = inspect.signature(type(datamodule)).parameters

    def source(key: str) -> str:
        return f"data.init_args.{key}" if key in init_args else f"{type(datamodule).__name__}.{key} (fixed by the data)"

    own = {name: {"value": value, "from": source(key)} for name, (value, key) in settings().items()}
    return {**(defaults or {}), **own}


def freeze_all_but(model: Any, patterns: Sequence[str]) -> list[str]:
    """Freeze every parameter of ``model`` whose name matches none of the ``fnmatch`` ``patterns``; returns the
    names left trainable. A pattern that matches no parameter is a ``ValueError`` (a typo would freeze everything)."""
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"trainable must be a list of name patterns, got {patterns!r}")
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(
            f"trainable: {unmatched} match no parameter of the model; its parameters are named like {names[:6]} ..."
        )
    kept = []
    for name, param in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, p) for p in patterns)
        param.requires_grad_(keep)
        if keep:
            kept.append(name)
    return kept


def save_final_checkpoint(trainer: L.Trainer) -> list[Path]:
    """Write each ``save_last`` checkpoint callback's ``last.ckpt`` at the end of fit.

    A run that stops on ``max_steps`` or ``max_time`` between two checkpoint events would otherwise keep only the
    weights of the last validation. Written through a temporary file and a rename; returns the paths written.
    """
    written: list[Path] = []
    if trainer.interrupted or trainer.sanity_checking:
        return written
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.save_last or not callback.dirpath:
            continue
        if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
            continue  # already saved at this step
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        with temporary_beside(path) as tmp:  # a kill leaves a ".last.ckpt.*.part" that the next fit removes
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero:
                os.replace(tmp, path)
            trainer.strategy.barrier("save_final_checkpoint")
        written.append(path)
    return written


class MoETask(L.LightningModule):
    """Shared training logic for every domain.

    Args:
        model: a registered model name (``moezoo.list_models()``).
        model_kwargs: constructor arguments of that model (its MoE settings under ``moe``).
        optimizer: a callable ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``) or a
            ``{class_path, init_args}`` mapping; default AdamW, lr 1e-3, weight decay 0.05 on matrices only
            (:func:`~moezoo.tasks.optim.param_groups`).
        lr_scheduler: a callable ``optimizer -> LRScheduler`` or a mapping, stepped once per optimiser step (once
            per epoch for a class with ``interval = "epoch"``, :class:`~moezoo.tasks.optim.StepDecayLR`);
            default :class:`~moezoo.tasks.optim.WarmupCosineLR` (5% warmup, cosine to 1% of the peak over the
            trainer's steps); ``None`` keeps the learning rate constant.
        aux_loss_coef: multiplier on the sum of the routers' (already weighted) auxiliary losses.
        pretrained: start from the released weights of ``model`` (a release name ``<model>.<tag>``): fine-tuning.
            A changed head argument in ``model_kwargs`` (``num_classes``, ``vocab_size``, ``pred_len``) loads every
            other tensor and re-initialises the head. A release name without it builds the release's architecture
            with random weights, and says so in the log.
        upcycle_from: start from an upcycled dense model: ``{weights: <release name | weights file | checkpoint>,
            num_experts, top_k, ...}`` (the options of :func:`moezoo.surgery.upcycle_from`); ``model`` and
            ``model_kwargs`` then describe the dense model (e.g. ``moe: {dense: true}``).
        data_settings: model settings the data decides (image size, channels, classes, vocabulary, look-back ...):
            ``{model kwarg: {"value": v, "from": "<the data module's key>"}}``, filled by ``moezoo fit`` from the data
            module's ``model_settings()`` (:func:`merge_data_settings`); not meant to be written by hand.
        trainable: train only the model's parameters whose names match one of these ``fnmatch`` patterns (e.g.
            ``["*router*", "head.*"]``: the routers and the head, a remedy against forgetting when fine-tuning);
            the others are frozen. ``None`` (the default) trains every parameter.
    """

    def __init__(
        self,
        model: str,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | Mapping[str, Any] = DEFAULT_OPTIMIZER,
        lr_scheduler: LRSchedulerCallable | Mapping[str, Any] | None = DEFAULT_LR_SCHEDULER,
        aux_loss_coef: float = 1.0,
        pretrained: bool = False,
        upcycle_from: Mapping[str, Any] | None = None,
        data_settings: dict[str, Any] | None = None,
        trainable: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name = model
        self.optimizer_factory = as_factory(optimizer, "optimizer", Optimizer, DEFAULT_OPTIMIZER)
        self.lr_scheduler_factory = (
            None
            if lr_scheduler is None
            else as_factory(lr_scheduler, "lr_scheduler", LRScheduler, DEFAULT_LR_SCHEDULER)
        )
        self.aux_loss_coef = aux_loss_coef
        # As passed to create_model (releases record these), in the current form.
        self.model_kwargs, old_keys = upgrade_model_kwargs(model, model_kwargs or {})
        if old_keys:
            warn_legacy(f"{type(self).__name__}: model_kwargs", old_keys, f"model_kwargs: {self.model_kwargs}")
        self.model_kwargs = merge_data_settings(self.model_kwargs, data_settings)
        self.model = build_task_model(model, self.model_kwargs, pretrained)
        # Releases and saved folders record the complete constructor arguments (a release's own included).
        self.model_kwargs = dict(getattr(self.model, "moezoo_kwargs", self.model_kwargs))
        if upcycle_from is not None:
            self.upcycle_report = surgery.upcycle_from(self.model, **dict(upcycle_from))
        if trainable is not None:
            freeze_all_but(self.model, trainable)
        self.routing_summary = RoutingStats()

    #: where, in a Lightning checkpoint's ``state_dict``, the weights a zoo release ships start
    release_prefix = "model."

    def load_release_weights(self, state: dict[str, Tensor]) -> None:
        """Load released weights (a state dict of ``self.model``); tasks holding another copy update it too."""
        self.model.load_state_dict(state, strict=True)

    # -- to implement in domain tasks ---------------------------------------------------------------
    def compute_loss(self, batch: Any, stage: str) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        """Return ``(task loss, MoE aux results, extra metrics to log, batch size)``."""
        raise TypeError(f"{type(self).__name__} must override compute_loss")

    # -- shared -------------------------------------------------------------------------------------
    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        task_loss, auxes, metrics, batch_size = self.compute_loss(batch, stage)
        aux_loss = total_aux_loss(auxes)
        loss = task_loss if aux_loss is None else task_loss + self.aux_loss_coef * aux_loss
        on_step = stage == "train"
        # Validation/test epoch values are averaged over processes under DDP (a no-op in one process).
        log: dict[str, Any] = dict(on_step=on_step, on_epoch=True, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        self.log(f"{stage}/task_loss", task_loss, **log)
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "acc", **log)
        for name, scalar in summarize_aux(auxes).items():
            self.log(f"{stage}/{name}", scalar, **log)
        self.last_batch_size = batch_size
        if stage != "train":
            self.routing_stats(stage).update(auxes, self.routing_groups(batch))
        return loss

    # -- routing statistics of the evaluation splits (written by moezoo.tasks.callbacks.RoutingAnalytics) -------
    #: samples in the last batch of ``_shared_step`` (the throughput callback counts them)
    last_batch_size: int = 0

    def routing_groups(self, batch: Any) -> TokenGroups | None:
        """The group of each sample of ``batch`` (class, language, domain, channel ...) for the per-group routing
        shares; ``None`` (the default) counts no groups."""
        return None

    def routing_stats(self, stage: str) -> RoutingStats:
        """The accumulator of ``stage`` (``"val"`` or ``"test"``; the test one is :attr:`routing_summary`)."""
        if stage == "test":
            return self.routing_summary
        stats: dict[str, RoutingStats] = self.__dict__.setdefault("_routing_stats", {})
        return stats.setdefault(stage, RoutingStats())

    def configure_callbacks(self) -> list[L.Callback]:
        """Routing analytics, training throughput, the prediction writer and the resumable random state in every
        run, unless the trainer already has them."""
        from moezoo.tasks.callbacks import ResumableRandomState, RoutingAnalytics, ThroughputMonitor
        from moezoo.tasks.predict import PredictionWriter

        have = [type(c) for c in getattr(self._trainer, "callbacks", [])]
        wanted = (RoutingAnalytics, ThroughputMonitor, PredictionWriter, ResumableRandomState)
        return [cls() for cls in wanted if not any(issubclass(t, cls) for t in have)]

    # -- predict (written by moezoo.tasks.predict.PredictionWriter) ----------------------------------------
    def prediction_rows(self, prediction: Any, batch: Any) -> list[dict[str, Any]]:
        """One JSON-able dict per item of a predict batch, from :meth:`predict_step`'s output ``prediction``.
        The default: a dict of per-item tensors or lists, split into rows."""
        from moezoo.tasks.predict import as_list

        if not isinstance(prediction, Mapping):
            return []
        columns = {key: as_list(value) for key, value in prediction.items()}
        size = min((len(v) for v in columns.values()), default=0)
        return [{key: values[i] for key, values in columns.items()} for i in range(size)]

    def write_predictions(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """Write the rows of a predict run under ``out_dir``; returns the paths (default ``predictions.jsonl``)."""
        from moezoo.tasks.predict import write_jsonl_atomic

        return [write_jsonl_atomic(out_dir / "predictions.jsonl", rows)]

    def prediction_summary(self, rows: list[dict[str, Any]]) -> str:
        """A line or a few for stdout after predict."""
        return f"{len(rows)} items"

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        update_router_states(self.model)

    def on_fit_start(self) -> None:
        """Remove the temporary files a killed run left in this run's folders (its logger and checkpoint folders,
        and ``default_root_dir`` unless that is the working directory; :func:`moezoo.io.remove_stale_temporaries`),
        before anything is written."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        folders: set[Path] = set()
        if Path(trainer.default_root_dir).resolve() != Path.cwd().resolve():
            folders.add(Path(trainer.default_root_dir))
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None)
            if root:
                folders.add(Path(root))
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                folders.add(Path(callback.dirpath))
        for folder in sorted(folders):
            for path in remove_stale_temporaries(folder):
                log.warning("removed %s, a temporary file left by a run that was killed while writing", path)

    def on_train_end(self) -> None:
        save_final_checkpoint(self.trainer)

    def on_test_epoch_start(self) -> None:
        self.routing_summary.reset()

    def on_test_epoch_end(self) -> None:
        if self.trainer.is_global_zero and self.routing_summary:
            print(f"\nRouting summary ({self.model_name}, test set)\n{self.routing_summary.table()}")

    def build_optimizer(self, total_steps: int) -> tuple[Optimizer, LRScheduler | None]:
        """This task's optimiser over its model and the scheduler for a run of ``total_steps`` optimiser steps."""
        return build_optimizer(self.model, self.optimizer_factory, self.lr_scheduler_factory, total_steps)

    def configure_optimizers(self) -> Any:
        optimizer, scheduler = self.build_optimizer(int(self.trainer.estimated_stepping_batches))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval(scheduler)}}
