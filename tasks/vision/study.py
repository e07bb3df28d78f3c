"""Router-study helpers: a training budget in CPU time (process user + system seconds, all threads).

``CPUTimeBudget(max_cpu_minutes=15)`` stops ``fit`` once the process has used that much CPU time since training
started and prints what was used, so "accuracy within N CPU minutes" is measured by the run itself.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class CPUTimeBudget(L.Callback):
    """Stop training after ``max_cpu_minutes`` of process CPU time; report CPU and wall time at the end."""

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
