"""Callbacks every task gets (``MoETask.configure_callbacks``) and the CPU-time budget.

- :class:`RoutingAnalytics`: at each validation end and test end, the split's routing statistics
  (:class:`moezoo.stats.RoutingStats`, fed by the task) as JSON and heatmaps under ``<log dir>/routing/``, and as
  scalars and images in TensorBoard when that logger is used. The benchmarks read these files.
- :class:`ThroughputMonitor`: training samples per second (wall and CPU) of optimiser-step time
  (:class:`moezoo.stats.RateMeter`), logged as ``train/samples_per_s`` and written to ``<log dir>/throughput.json``.
- :class:`CPUTimeBudget`: stop ``fit`` after a number of CPU minutes.

Under DDP each rank counts its own batches; rank 0 writes its statistics (no collective in these callbacks).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from moezoo.io import write_bytes_atomic, write_json_atomic
from moezoo.stats import RateMeter, RoutingStats, count_parameters
from moezoo.stats.heatmaps import (
    LOAD_LABEL,
    expert_load_panel,
    heatmap_figure,
    png_bytes,
    share_label,
    specialisation_panel,
)


def log_dir_of(trainer: L.Trainer) -> Path:
    """Where a run writes its files: the logger's folder, else ``default_root_dir`` (a collective under DDP: call
    it on every rank)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def _routing_stats(pl_module: L.LightningModule, stage: str) -> RoutingStats | None:
    getter = getattr(pl_module, "routing_stats", None)
    return getter(stage) if callable(getter) else None


def routing_figures(summary: dict[str, Any], title: str) -> dict[str, Any]:
    """``{"expert_load": Figure, "specialisation": Figure}`` of a :meth:`RoutingStats.summary` (the second only
    when some layer has group counts)."""
    figures: dict[str, Any] = {}
    layers = summary["layers"]
    if not layers:
        return figures
    load = expert_load_panel([layer["expert_load"] for layer in layers], "expert load per MoE layer")
    figures["expert_load"] = heatmap_figure([load], f"{title}: expert load", LOAD_LABEL)
    grouped = [layer for layer in layers if layer["group_share"] is not None]
    if grouped:
        by, groups = summary["group_by"], summary["groups"]
        panels = [specialisation_panel(layer["group_share"], groups, by, f"MoE layer {layer['layer']}")
                  for layer in grouped]  # fmt: skip
        figures["specialisation"] = heatmap_figure(panels, f"{title}: routing per {by}", share_label(by), "magma")
    return figures


class RoutingAnalytics(L.Callback):
    """Write each validation's and test's routing statistics: ``<log dir>/<dirname>/<stage>_step<step>.json`` and,
    with ``plots``, ``..._expert_load.png`` (expert load per MoE layer) and ``..._specialisation.png`` (each group's
    routing shares, one panel per layer with group counts). TensorBoard gets ``routing/<stage>/layer<i>/load_cv``,
    ``.../dropped_frac``, ``.../router_entropy`` and both images. ``written[stage]`` is the last JSON written.
    """

    def __init__(self, plots: bool = True, dirname: str = "routing") -> None:
        super().__init__()
        self.plots = plots
        self.dirname = dirname
        self.written: dict[str, Path] = {}

    def _reset(self, pl_module: L.LightningModule, stage: str) -> None:
        stats = _routing_stats(pl_module, stage)
        if stats is not None:
            stats.reset()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module, "test")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module, "test")

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> Path | None:
        stats = _routing_stats(pl_module, stage)
        if stats is None:
            return None
        folder = log_dir_of(trainer) / self.dirname
        if not trainer.is_global_zero or not stats:
            return None
        step = trainer.global_step
        model = getattr(pl_module, "model", pl_module)
        counts = count_parameters(model)
        summary = stats.summary()
        record = {
            "stage": stage, "epoch": trainer.current_epoch, "global_step": step,
            "model": str(getattr(pl_module, "model_name", type(model).__name__)),
            "params": {**counts.as_dict(), "components": {k: vars(v) for k, v in counts.components.items()}},
            **summary,
        }  # fmt: skip
        stem = f"{stage}_step{step:06d}"
        path = write_json_atomic(folder / f"{stem}.json", record)
        self.written[stage] = path
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in tensorboards:
            for layer in summary["layers"]:
                for name in ("load_cv", "dropped_frac", "router_entropy"):
                    logger.experiment.add_scalar(f"routing/{stage}/layer{layer['layer']}/{name}", layer[name], step)
        if self.plots or tensorboards:
            title = f"{record['model']} ({stage}, step {step})"
            for kind, fig in routing_figures(summary, title).items():
                png = png_bytes(fig)  # drawn once, for the file and for TensorBoard
                if self.plots:
                    write_bytes_atomic(folder / f"{stem}_{kind}.png", png)
                for logger in tensorboards:
                    logger.experiment.add_image(f"routing/{stage}/{kind}", _png_array(png), step, dataformats="HWC")
        return path


def _png_array(png: bytes) -> Any:
    """PNG bytes -> an ``(H, W, 3)`` uint8 array (what TensorBoard's ``add_image`` takes)."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


class ThroughputMonitor(L.Callback):
    """Training samples per second of optimiser-step time (forward, backward, clipping, update; not data loading or
    validation), after ``warmup`` steps, in wall and CPU time. Samples per step are the task's ``last_batch_size``.
    """

    def __init__(self, warmup: int = 3) -> None:
        super().__init__()
        self.meter = RateMeter(warmup)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meter.reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.last_batch_size = 0  # type: ignore[assignment]
        self.meter.start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.meter.stop(int(getattr(pl_module, "last_batch_size", 0)))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.meter.wall_rate is not None:
            pl_module.log("train/samples_per_s", self.meter.wall_rate)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = log_dir_of(trainer) / "throughput.json"
        if trainer.is_global_zero:
            write_json_atomic(path, {"train": self.meter.as_dict(), "global_step": trainer.global_step})


class CPUTimeBudget(L.Callback):
    """Stop training after ``max_cpu_minutes`` of process CPU time (user + system, all threads) since training
    started; report CPU and wall time at the end. On a shared machine wall-clock limits measure the neighbours;
    this measures the work done."""

    def __init__(self, max_cpu_minutes: float = 15.0) -> None:
        super().__init__()
        if max_cpu_minutes <= 0:
            raise ValueError(f"max_cpu_minutes must be > 0, got {max_cpu_minutes}")
        self.max_cpu_seconds = 60.0 * max_cpu_minutes
        self.cpu_start = 0.0
        self.wall_start = 0.0
        self.cpu_used = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.cpu_start = time.process_time()
        self.wall_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.cpu_used = time.process_time() - self.cpu_start
        if self.cpu_used >= self.max_cpu_seconds:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.cpu_used = time.process_time() - self.cpu_start
        wall = time.perf_counter() - self.wall_start
        print(
            f"CPUTimeBudget: training used {self.cpu_used / 60:.2f} CPU minutes ({wall / 60:.2f} wall minutes) "
            f"in {trainer.global_step} steps; budget {self.max_cpu_seconds / 60:.1f} CPU minutes",
            flush=True,
        )
