"""Long-term forecasting with ``moe_patchtst`` or any registered forecaster with ``forward_with_aux``: the baselines
(``last_value``, ``seasonal_naive``, ``nlinear``, ``dlinear``, ``patchtst``) train and test through the same task."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.layers import MoEAux
from moezoo.stats import TokenGroups
from moezoo.tasks.base import MoETask

LOSSES = ("mse", "huber")


class ForecastingTask(MoETask):
    """MSE or Huber loss on the normalised scale plus the routers' balance losses; logs ``mse`` and ``mae``.

    Args:
        loss: ``"mse"`` or ``"huber"`` (``huber_delta``); the metrics are MSE and MAE whatever the loss.
        num_plot_windows: at the end of a test, plot the first window of each of the first n test batches
            (look-back, truth, forecast of the last channel, the target) into ``<log dir>/forecasts.png``.
        model, model_kwargs, **kwargs (``optimizer``, ``lr_scheduler``, ``aux_loss_coef``): as in
            :class:`moezoo.tasks.base.MoETask`. The public PatchTST / LTSF-Linear recipes use
            ``optimizer: torch.optim.Adam`` and ``lr_scheduler: moezoo.tasks.optim.StepDecayLR`` (per epoch).

    A model without trainable parameters (``last_value``, ``seasonal_naive``) gets no optimiser: ``fit`` runs its
    epochs without an optimisation step (validation and checkpoints as usual) and says so once; ``test`` scores it.
    """

    def __init__(
        self,
        model: str = "moe_patchtst_debug",
        model_kwargs: dict[str, Any] | None = None,
        loss: str = "mse",
        huber_delta: float = 1.0,
        num_plot_windows: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, model_kwargs, **kwargs)
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown; choose one of {list(LOSSES)}")
        if huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
        if num_plot_windows < 0:
            raise ValueError(f"num_plot_windows must be >= 0, got {num_plot_windows}")
        self.loss_name = loss
        self.huber_delta = huber_delta
        self.num_plot_windows = num_plot_windows
        self.trainable = any(p.requires_grad for p in self.model.parameters())
        self._plot_windows: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def compute_loss(self, batch: Any, stage: str) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        x, y = batch
        pred, auxes = self.model.forward_with_aux(x)
        if pred.shape != y.shape:
            raise ValueError(
                f"the model forecasts shape {tuple(pred.shape)} but the targets have shape {tuple(y.shape)}; "
                f"set model_kwargs pred_len and num_channels to the data's horizon and channel count"
            )
        if self.loss_name == "mse":
            loss = F.mse_loss(pred, y)
        else:
            loss = F.huber_loss(pred, y, delta=self.huber_delta)
        metrics = {"mse": F.mse_loss(pred.detach(), y), "mae": F.l1_loss(pred.detach(), y)}
        if stage == "test" and len(self._plot_windows) < self.num_plot_windows:
            # The first window of each test batch: windows spread over the test period.
            self._plot_windows.append((x[0, :, -1].cpu(), y[0, :, -1].cpu(), pred[0, :, -1].detach().cpu()))
        return loss, auxes, metrics, x.shape[0]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss = self._shared_step(batch, "train")
        return loss if self.trainable else None  # None: Lightning skips backward and the optimiser step

    def on_fit_start(self) -> None:
        if not self.trainable and self.trainer.is_global_zero:
            print(
                f"{self.model_name} has no trainable parameters: fit runs no optimisation step (the training "
                f"epochs only log the training error; validation and test score the model as it is)"
            )

    def configure_optimizers(self) -> Any:
        return super().configure_optimizers() if self.trainable else None  # None: Lightning runs without one

    def routing_groups(self, batch: Any) -> TokenGroups:
        """Routing shares per channel: the channel-independent model routes each window's C channel series as
        samples ``window * C + channel``, so a sample's group is its channel."""
        x_WLC = batch[0]
        channels = x_WLC.shape[-1]
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        names = list(getattr(datamodule, "columns", None) or [])
        if len(names) != channels:
            names = [f"channel {c}" for c in range(channels)]
        return TokenGroups(torch.arange(x_WLC.shape[0] * channels) % channels, tuple(names), "channel")

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._plot_windows = []

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self._plot_windows and self.trainer.is_global_zero:
            out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            path = plot_forecasts(self._plot_windows, out_dir / "forecasts.png", title=str(self.hparams.model))
            print(f"forecast plots: {path}")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x)


def plot_forecasts(windows: list[tuple[Tensor, Tensor, Tensor]], path: Path, title: str = "") -> Path:
    """One panel per window: the look-back, the true future and the forecast (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(windows), 1, figsize=(9, 2.4 * len(windows)), squeeze=False)
    for ax, (past, truth, pred) in zip(axes[:, 0], windows):
        lookback = past.shape[0]
        future = torch.arange(lookback, lookback + truth.shape[0])
        ax.plot(torch.arange(lookback), past, color="0.4", lw=1, label="look-back")
        ax.plot(future, truth, color="C0", lw=1.2, label="truth")
        ax.plot(future, pred, color="C3", lw=1.2, label="forecast")
        ax.axvline(lookback - 0.5, color="0.7", lw=0.8, ls="--")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[0, 0].set_title(f"{title}: target channel, normalised scale")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class BestValWeights(L.Callback):
    """Keep an in-memory copy of the weights of the epoch with the lowest ``monitor`` (no checkpoint files)."""

    def __init__(self, monitor: str = "val/mse") -> None:
        self.monitor = monitor
        self.best = float("inf")
        self.epoch = -1
        self.state: dict[str, Any] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if value < self.best:
            self.best, self.epoch = value, trainer.current_epoch
            self.state = copy.deepcopy(pl_module.state_dict())
