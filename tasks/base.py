"""The base Lightning task: builds a model by name, adds and logs MoE losses and statistics, updates router state.

Domain tasks subclass :class:`MoETask` and implement :meth:`MoETask.compute_loss`; ``training_step``,
``validation_step`` and ``test_step`` share :meth:`MoETask._shared_step`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from moezoo.layers import MoEAux, summarize_aux, total_aux_loss, update_router_states
from moezoo.models import create_model
from moezoo.stats import RoutingStats, TokenGroups


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, embeddings and tokens (1-D or named *_token/*_embed)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2 or name.endswith(("_token", "pos_embed")) or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RoutingSummary(RoutingStats):
    """The test split's :class:`~moezoo.stats.RoutingStats` (``MoETask.routing_summary``).

    ``load`` and ``stats`` are the earlier attributes that ``moezoo.zoo`` still reads; they go once the zoo reads
    :meth:`RoutingStats.layers` (see the bench branch's report).
    """

    @property
    def load(self) -> dict[int, Tensor]:
        return {layer.layer: torch.tensor(layer.expert_counts) for layer in self.layers()}

    @property
    def stats(self) -> dict[int, list[tuple[float, float]]]:
        return {layer.layer: [(layer.dropped_frac, layer.router_entropy)] for layer in self.layers()}


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
        tmp = path.with_name(path.name + ".tmp")
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
        model_kwargs: constructor arguments of that model.
        lr: peak AdamW learning rate (linear warmup, cosine decay to ``lr * min_lr_ratio``).
        weight_decay: AdamW weight decay on matrices.
        warmup_frac: fraction of the training steps used for warmup.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        aux_loss_coef: multiplier on the sum of the routers' (already weighted) auxiliary losses.
    """

    def __init__(
        self,
        model: str,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_frac: float = 0.05,
        min_lr_ratio: float = 0.01,
        aux_loss_coef: float = 1.0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
        self.save_hyperparameters()
        self.model_name = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_frac = warmup_frac
        self.min_lr_ratio = min_lr_ratio
        self.aux_loss_coef = aux_loss_coef
        self.model_kwargs = dict(model_kwargs or {})  # as passed to create_model (releases record these)
        self.model = create_model(model, **self.model_kwargs)
        self.routing_summary = RoutingSummary()

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
        """Routing analytics and training throughput in every run, unless the trainer already has them."""
        from moezoo.tasks.callbacks import RoutingAnalytics, ThroughputMonitor

        have = [type(c) for c in getattr(self._trainer, "callbacks", [])]
        return [cls() for cls in (RoutingAnalytics, ThroughputMonitor) if not any(issubclass(t, cls) for t in have)]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        update_router_states(self.model)

    def on_train_end(self) -> None:
        save_final_checkpoint(self.trainer)

    def on_test_epoch_start(self) -> None:
        self.routing_summary.reset()

    def on_test_epoch_end(self) -> None:
        if self.trainer.is_global_zero and self.routing_summary:
            print(f"\nRouting summary ({self.model_name}, test set)\n{self.routing_summary.table()}")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(param_groups(self.model, self.weight_decay), lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.warmup_frac * total))
        min_ratio = self.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
