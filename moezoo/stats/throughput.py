"""Throughput, timed one way: items per second of wall-clock time and of process CPU time.

- :class:`RateMeter` sums timed intervals (``start``/``stop(items)``), skipping the first ``warmup`` intervals
  (allocator and kernel warm-up). The training-throughput callback times each optimiser step with it: forward,
  backward, clipping and the optimiser update, not data loading or validation.
- :func:`median_rates` times a whole pass (e.g. inference over a fixed set of batches) ``repeats`` times after
  ``warmup`` untimed passes and returns the median rates per wall and per CPU second (:func:`median_rate`: wall).

CPU time is the process's user + system time over all threads: steadier than wall time on a shared machine, and
what a budget in "CPU minutes" counts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


class RateMeter:
    """Items per wall second and per CPU second over timed intervals, the first ``warmup`` intervals excluded."""

    def __init__(self, warmup: int = 3) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.reset()

    def reset(self) -> None:
        self.intervals = 0  # every stopped interval, timed or not
        self.items = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self._start: tuple[float, float] | None = None

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def stop(self, items: int) -> None:
        """End the interval begun by :meth:`start`; it processed ``items`` items."""
        if self._start is None:
            raise RuntimeError("RateMeter.stop() without start()")
        wall0, cpu0 = self._start
        self._start = None
        self.intervals += 1
        if self.intervals > self.warmup:
            self.wall_s += time.perf_counter() - wall0
            self.cpu_s += time.process_time() - cpu0
            self.items += items

    @property
    def wall_rate(self) -> float | None:
        return self.items / self.wall_s if self.wall_s > 0 else None

    @property
    def cpu_rate(self) -> float | None:
        return self.items / self.cpu_s if self.cpu_s > 0 else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"items_per_s": self.wall_rate, "items_per_cpu_s": self.cpu_rate, "items": self.items,
                "timed_intervals": max(0, self.intervals - self.warmup), "warmup_intervals": self.warmup}  # fmt: skip


def median_rates(run: Callable[[], int], repeats: int = 3, warmup: int = 1) -> tuple[float, float]:
    """Median items per wall second and median items per CPU second of ``run()`` (which returns the number of items
    it processed) over ``repeats`` timed calls, after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        run()
    wall_rates, cpu_rates = [], []
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        items = run()
        wall_rates.append(items / max(time.perf_counter() - wall0, 1e-12))
        cpu_rates.append(items / max(time.process_time() - cpu0, 1e-12))
    return statistics.median(wall_rates), statistics.median(cpu_rates)


def median_rate(run: Callable[[], int], repeats: int = 3, warmup: int = 1) -> float:
    """Median items per wall second of ``run()`` (see :func:`median_rates`)."""
    return median_rates(run, repeats, warmup)[0]
