"""Callbacks every task gets (``MoETask.configure_callbacks``) and the CPU-time budget.

- :class:`RoutingAnalytics`: at each validation end and test end, the split's routing statistics
  (:class:`moezoo.stats.RoutingStats`, fed by the task) as JSON and heatmaps under ``<log dir>/routing/``, and as
  scalars and images in TensorBoard when that logger is used. The benchmarks read these files.
- :class:`ThroughputMonitor`: training samples per second (wall and CPU) of optimiser-step time
  (:class:`moezoo.stats.RateMeter`), logged as ``train/samples_per_s`` and written to ``<log dir>/throughput.json``.
- :class:`CPUTimeBudget`: stop ``fit`` after a number of CPU minutes.
- :class:`ResumableRandomState`: the global random state (torch, numpy, Python) saved in every checkpoint and put
  back when a fit resumes, so that a run resumed from an end-of-epoch checkpoint draws the same shuffles,
  augmentations, dropout and noise as an uninterrupted one (``tests/tasks/test_soak.py``).

Under DDP each rank counts its own batches; rank 0 writes its statistics (no collective in these callbacks).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

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


RANDOM_STATE_KEY = "moezoo_random_state"


class ResumableRandomState(L.Callback):
    """Save the process's global random state (torch CPU and CUDA, numpy, Python) in every checkpoint and restore it
    when ``fit`` resumes from one (before the resumed epoch's DataLoader iterator draws its seed); the sanity check
    leaves the state as it found it.

    Without it a resumed run reseeds from ``seed_everything`` and then draws the next epoch's shuffle, augmentation
    and noise from another point of the stream than the uninterrupted run did. With it, a single-process run
    resumed from a checkpoint written at the end of an epoch (or at its last training batch) ends with the same
    weights as one never interrupted; one resumed from the middle of an epoch does not, because Lightning then
    restarts the epoch's DataLoader from its first batch (it warns so). Under DDP each rank restores rank 0's state.
    """

    def __init__(self) -> None:
        self._outside_sanity: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RANDOM_STATE_KEY] = random_state()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(RANDOM_STATE_KEY)
        if state is not None and trainer.state.fn == TrainerFn.FITTING:
            set_random_state(state)  # before the resumed epoch's DataLoader iterator is made (FitLoop.setup_data)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outside_sanity = random_state()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The sanity check draws (its DataLoader's seed): put the state back, so that it is the same in a fresh
        # run, where the sanity check ran before the first epoch, and in a resumed one.
        if self._outside_sanity is not None:
            set_random_state(self._outside_sanity)
            self._outside_sanity = None


def random_state() -> dict[str, Any]:
    """The process's global random state (torch CPU and CUDA, numpy, Python) in types ``torch.load`` reads with
    ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (
        str(kind),
        torch.from_numpy(np.asarray(keys).astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(gauss),
    )
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Put back a :func:`random_state` (CUDA only on as many devices as it was taken on)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
