"""Long-term forecasting with ``moe_patchtst`` or any registered forecaster with ``forward_with_aux``: the baselines
(``last_value``, ``seasonal_naive``, ``nlinear``, ``dlinear``, ``patchtst``) train and test through the same task."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.layers import MoEAux
from moezoo.stats import TokenGroups, forecast_errors
from moezoo.tasks.base import MoETask

LOSSES = ("mse", "huber")


class ForecastingTask(MoETask):
    """MSE or Huber loss on the normalised scale plus the routers' balance losses; logs ``mse``, ``mae`` and
    ``mase`` (:func:`moezoo.stats.forecast_errors`).

    Args:
        loss: ``"mse"`` or ``"huber"`` (``huber_delta``); the metrics are MSE and MAE whatever the loss.
        num_plot_windows: at the end of a test, plot the first window of each of the first n test batches
            (look-back, truth, forecast of the last channel, the target) into ``<log dir>/forecasts.png``.
        mase_period: the season of MASE's in-sample naive scale (24 for hourly data with a daily cycle; 1: the
            last-value scale), an integer in ``[1, seq_len)``.
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
        mase_period: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, model_kwargs, **kwargs)
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown; choose one of {list(LOSSES)}")
        if huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
        if num_plot_windows < 0:
            raise ValueError(f"num_plot_windows must be >= 0, got {num_plot_windows}")
        if not isinstance(mase_period, int) or isinstance(mase_period, bool) or mase_period < 1:
            raise ValueError(f"mase_period must be a positive integer, got {mase_period!r}")
        self.mase_period = mase_period
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
        metrics = forecast_errors(pred.detach(), y, x, self.mase_period)
        if stage == "test" and len(self._plot_windows) < self.num_plot_windows:
            # The first window of each test batch: windows spread over the test period.
            self._plot_windows.append((x[0, :, -1].cpu(), y[0, :, -1].cpu(), pred[0, :, -1].detach().cpu()))
        return loss, auxes, metrics, x.shape[0]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss = self._shared_step(batch, "train")
        return loss if self.trainable else None  # None: Lightning skips backward and the optimiser step

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the base task's clean-up of a killed run's temporary files
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

    # -- the training series' columns and scaler travel in checkpoints -----------------------------------
    #: ``{"columns": [...], "mean": [...] | None, "std": [...] | None}`` restored from a checkpoint
    saved_series: dict[str, Any] | None = None

    def series_state(self) -> dict[str, Any] | None:
        """The columns (target last) and the training scaler the model expects: the checkpoint's, else the data
        module's (once set up), else ``None``."""
        if self.saved_series is not None:
            return self.saved_series
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        scaler = getattr(datamodule, "scaler", None)
        columns = list(getattr(datamodule, "columns", None) or [])
        if not columns:
            return None
        mean = None if scaler is None else [float(v) for v in scaler.mean]
        std = None if scaler is None else [float(v) for v in scaler.std]
        return {"columns": columns, "mean": mean, "std": std}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.series_state()
        if state is not None:
            checkpoint["series"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.saved_series = checkpoint.get("series")

    # -- predict -----------------------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Forecast from unscaled look-backs (a ``predict_path`` CSV): scale with the training scaler, forecast,
        unscale. ``batch``: ``(look-back (B, L, C), rows read)``."""
        x_raw = batch[0] if isinstance(batch, (tuple, list)) else batch
        state = self.series_state()
        if state is None:
            raise ValueError(
                "predict needs the training series' columns and scaler: pass --ckpt_path of a checkpoint written by "
                "moezoo fit (it carries them)"
            )
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        columns = list(getattr(datamodule, "columns", None) or state["columns"])
        if columns != list(state["columns"]):
            raise ValueError(f"predict_path has the columns {columns} but the model was trained on {state['columns']}")
        if state["mean"] is None:
            mean, std = x_raw.new_zeros(()), x_raw.new_ones(())
        else:
            mean, std = x_raw.new_tensor(state["mean"]), x_raw.new_tensor(state["std"])
        forecast = self.model((x_raw - mean) / std) * std + mean
        out: dict[str, Any] = {"lookback": x_raw, "forecast": forecast}
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            out["rows_read"] = batch[1]
        return out

    def prediction_rows(self, prediction: Any, batch: Any) -> list[dict[str, Any]]:
        """Per window: ``forecast`` (H x C, the data's units), ``lookback`` (L x C) and ``rows_read``."""
        rows = super().prediction_rows(prediction, batch)
        state = self.series_state() or {}
        for row in rows:
            row["columns"] = list(state.get("columns", []))
        return rows

    def write_predictions(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """``forecasts.csv`` (window, step, date when the CSV had dates, one column per channel) and
        ``forecasts.png`` (look-back and forecast of the target channel, the last)."""
        from moezoo.tasks.predict import write_csv_atomic

        datamodule = self.trainer.datamodule if self._trainer is not None else None
        dates = future_dates(getattr(datamodule, "predict_dates", None), len(rows[0]["forecast"]) if rows else 0)
        table = []
        for row in rows:
            columns = row["columns"] or [f"channel {c}" for c in range(len(row["forecast"][0]))]
            for step, values in enumerate(row["forecast"], start=1):
                entry: dict[str, Any] = {"window": row["index"], "step": step}
                if dates is not None:
                    entry["date"] = dates[step - 1]
                entry.update({name: round(float(v), 6) for name, v in zip(columns, values)})
                table.append(entry)
        written = [write_csv_atomic(out_dir / "forecasts.csv", table)]
        if rows:
            windows = [(torch.tensor(r["lookback"])[:, -1], None, torch.tensor(r["forecast"])[:, -1]) for r in rows]
            target = (rows[0]["columns"] or ["target"])[-1]
            written.append(
                plot_forecasts(windows, out_dir / "forecasts.png", str(self.hparams.model), f"{target} (data units)")
            )
        return written

    def prediction_summary(self, rows: list[dict[str, Any]]) -> str:
        lines = [f"{len(rows)} forecast(s) of {len(rows[0]['forecast']) if rows else 0} steps"]
        for row in rows[:3]:
            target = (row["columns"] or ["target"])[-1]
            values = [v[-1] for v in row["forecast"]]
            shown = ", ".join(f"{v:.4g}" for v in values[:6]) + (" ..." if len(values) > 6 else "")
            lines.append(f"  window {row['index']} (after row {row.get('rows_read', '?')}): {target} {shown}")
        return "\n".join(lines)


def future_dates(dates: Any, steps: int) -> list[str] | None:
    """``steps`` ISO time stamps continuing ``dates`` at its last interval, or ``None`` without (two valid) dates."""
    import numpy as np

    if dates is None or len(dates) < 2 or steps < 1:
        return None
    last, step = dates[-1], dates[-1] - dates[-2]
    if np.isnat(last) or np.isnat(step):
        return None
    return [str(np.datetime_as_string(last + step * k, unit="s")) for k in range(1, steps + 1)]


def plot_forecasts(
    windows: Sequence[tuple[Tensor, Tensor | None, Tensor]], path: Path, title: str = "", unit: str = "normalised scale"
) -> Path:
    """One panel per window: the look-back, the true future (when known) and the forecast (matplotlib, Agg
    backend), written atomically."""
    import matplotlib

    from moezoo.stats.heatmaps import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(windows), 1, figsize=(9, 2.4 * len(windows)), squeeze=False)
    for ax, (past, truth, pred) in zip(axes[:, 0], windows):
        lookback = past.shape[0]
        future = torch.arange(lookback, lookback + pred.shape[0])
        ax.plot(torch.arange(lookback), past, color="0.4", lw=1, label="look-back")
        if truth is not None:
            ax.plot(future, truth, color="C0", lw=1.2, label="truth")
        ax.plot(future, pred, color="C3", lw=1.2, label="forecast")
        ax.axvline(lookback - 0.5, color="0.7", lw=0.8, ls="--")
        ax.set_xlabel("time step")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[0, 0].set_title(f"{title}: target channel, {unit}")
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


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
