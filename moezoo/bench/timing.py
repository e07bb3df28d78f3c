"""Interleaved timing: the one way every ``moezoo bench`` micro benchmark times its candidates.

On a shared machine the load changes while a benchmark runs. Timing each candidate's repeats back to back puts
any change of load on one candidate; :func:`interleave` instead times the candidates in rounds, after ``warmup``
untimed rounds, and compares each candidate with its baseline *of the same round*. A change of load between rounds
then moves a candidate and its baseline together, and the per-round ratios stay comparable. The order changes from
round to round after a balanced Latin square (:func:`balanced_orders`): over a cycle of rounds every candidate is
timed equally often in every position and right after every other candidate. A fixed order lets what the previous
call leaves behind (memory the allocator returned to the system and page faults back in, cache contents) land on
the same candidate every round: about 1 ms per step at the small layer shape here, more than the differences the
layer table is about. The summary of a candidate (:meth:`Interleaved.summary`) is the median of its per-round
ratios with their spread (interquartile range and min-max) and its median milliseconds; the machine's load
average (``os.getloadavg``: 1, 5 and 15 minutes) at the start and the end is kept with the raw times, so a table
can be re-rendered from :meth:`Interleaved.as_dict` (``Interleaved.from_dict`` reads it back).

The clock is a parameter: ``timer(fn)`` calls ``fn`` once and returns milliseconds. :func:`wall_ms` (the default) is
``time.perf_counter`` around the call, :func:`cpu_ms` the process's CPU time (``CLOCKS`` names both); a CUDA
benchmark passes a timer on CUDA events. Tests pass a fake timer, so the logic is tested without timing anything.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Timer = Callable[[Callable[[], object]], float]


def wall_ms(fn: Callable[[], object]) -> float:
    """Wall-clock milliseconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cpu_ms(fn: Callable[[], object]) -> float:
    """CPU milliseconds of this process (all its threads) during one call of ``fn``: at one torch thread, what
    the call costs regardless of other processes sharing the cores (a busy machine stretches wall time, not this)."""
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


CLOCKS: dict[str, Timer] = {"wall": wall_ms, "cpu": cpu_ms}


def load_average() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15 minute load averages; ``(nan, nan, nan)`` where the OS has none."""
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - platforms without getloadavg
        nan = float("nan")
        return nan, nan, nan


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``values`` (inclusive method: a single value is its own quartiles)."""
    if not values:
        raise ValueError("quartiles of no values")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass(frozen=True)
class Summary:
    """One candidate over the rounds: ratios are per round, to the baseline's time of the same round."""

    name: str
    baseline: str
    median_ms: float
    median_ratio: float
    q1_ratio: float
    q3_ratio: float
    min_ratio: float
    max_ratio: float

    def ratio_cell(self) -> str:
        """``1.23x [1.20-1.27] (1.15-1.31)``: median ratio, interquartile range, min-max."""
        return (
            f"{self.median_ratio:.2f}x [{self.q1_ratio:.2f}-{self.q3_ratio:.2f}] "
            f"({self.min_ratio:.2f}-{self.max_ratio:.2f})"
        )


@dataclass
class Interleaved:
    """The raw result of :func:`interleave`: every round's milliseconds per candidate."""

    times_ms: dict[str, list[float]]
    baselines: dict[str, str]  # candidate -> the candidate its ratios divide by (itself for a baseline)
    warmup: int
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    extra: dict[str, Any] = field(default_factory=dict)  # what a benchmark adds per candidate (e.g. memory)

    @property
    def names(self) -> list[str]:
        return list(self.times_ms)

    @property
    def rounds(self) -> int:
        return len(next(iter(self.times_ms.values()), []))

    def ratios(self, name: str) -> list[float]:
        """``name``'s time over its baseline's time, round by round."""
        base = self.times_ms[self.baselines[name]]
        return [t / b for t, b in zip(self.times_ms[name], base, strict=True)]

    def summary(self, name: str) -> Summary:
        ratios = self.ratios(name)
        q1, median, q3 = quartiles(ratios)
        return Summary(
            name=name,
            baseline=self.baselines[name],
            median_ms=statistics.median(self.times_ms[name]),
            median_ratio=median,
            q1_ratio=q1,
            q3_ratio=q3,
            min_ratio=min(ratios),
            max_ratio=max(ratios),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "times_ms": self.times_ms,
            "baselines": self.baselines,
            "warmup": self.warmup,
            "rounds": self.rounds,
            "load_start": list(self.load_start),
            "load_end": list(self.load_end),
            "extra": self.extra,
            "summary": {name: vars(self.summary(name)) for name in self.names},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Interleaved:
        """Read back :meth:`as_dict` (the summary is recomputed from the raw times)."""
        return cls(
            times_ms={k: [float(t) for t in v] for k, v in data["times_ms"].items()},
            baselines=dict(data["baselines"]),
            warmup=int(data["warmup"]),
            load_start=tuple(data["load_start"]),  # type: ignore[arg-type]
            load_end=tuple(data["load_end"]),  # type: ignore[arg-type]
            extra=dict(data.get("extra", {})),
        )


def balanced_orders(n: int) -> list[list[int]]:
    """The call orders of n candidates, one per round, cycled: a Williams balanced Latin square. Each candidate
    takes each position, and follows each other candidate, equally often over the cycle (n rounds for even n; 2n for
    odd n, the square and its mirror). Row 0 is ``0, 1, n-1, 2, n-2, ...``, row r adds r modulo n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    first = [0]
    for j in range(1, n):
        first.append((j + 1) // 2 if j % 2 else n - j // 2)
    rows = [[(v + r) % n for v in first] for r in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def interleave(
    candidates: Mapping[str, Callable[[], object]],
    baseline: str | Mapping[str, str],
    rounds: int,
    warmup: int = 1,
    timer: Timer = wall_ms,
    loadavg: Callable[[], tuple[float, float, float]] = load_average,
    before: Callable[[str], object] | None = None,
) -> Interleaved:
    """Time ``candidates`` (name -> a call to time) in ``rounds`` interleaved rounds after ``warmup`` untimed ones,
    in the orders of :func:`balanced_orders`: timed round ``r`` takes order ``r`` modulo their number (warm-up
    rounds the last ones), so ``rounds`` equal to a multiple of the cycle is exactly balanced.

    ``baseline``: the candidate every ratio divides by, or a mapping candidate -> its baseline (candidates not in
    it use ``"dense"`` if present, else the first candidate). ``before(name)``, when given, runs untimed before
    each call of ``name`` (e.g. clearing gradients).
    """
    if not candidates:
        raise ValueError("interleave needs at least one candidate")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    names = list(candidates)
    if isinstance(baseline, str):
        baselines = {name: baseline for name in names}
    else:
        default = "dense" if "dense" in candidates else names[0]
        baselines = {name: baseline.get(name, default) for name in names}
    for name, base in baselines.items():
        if base not in candidates:
            raise ValueError(f"baseline {base!r} of candidate {name!r} is not a candidate; candidates: {names}")
    orders = balanced_orders(len(names))
    load_start = loadavg()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for i in orders[(r - warmup) % len(orders)]:
            name = names[i]
            if before is not None:
                before(name)
            ms = timer(candidates[name])
            if r >= warmup:
                times[name].append(ms)
    return Interleaved(times, baselines, warmup, load_start, loadavg())


def format_load(result: Interleaved) -> str:
    """``load average 8.1 7.9 6.5 -> 9.0 8.2 6.7`` (1, 5, 15 min, at the start and the end)."""
    start = " ".join(f"{v:.1f}" for v in result.load_start)
    end = " ".join(f"{v:.1f}" for v in result.load_end)
    return f"load average (1, 5, 15 min) {start} -> {end}"
