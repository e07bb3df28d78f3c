"""The synthetic series of ``moe_tsfm``'s pretraining mixture: deterministic per (seed, index), standardised, and
seasonal at the periods asked for."""

from __future__ import annotations

import numpy as np
import pytest

from moezoo.tasks.timeseries.synthetic import (
    DEFAULT_PERIODS,
    SyntheticSpec,
    build_synthetic,
    seasonal_waveform,
    synthetic_series,
)


def _acf(values: np.ndarray, lag: int) -> float:
    centred = values - values.mean()
    return float((centred[:-lag] * centred[lag:]).sum() / (centred * centred).sum())


def test_series_are_deterministic_and_independent_of_the_count() -> None:
    spec = SyntheticSpec(num_series=6, length=200)
    first, rows = build_synthetic(spec)
    again, rows_again = build_synthetic(spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and rows == rows_again
    # series i depends on (seed, i) only: a longer set starts with the same series
    longer, _ = build_synthetic(SyntheticSpec(num_series=9, length=200))
    assert all(np.array_equal(a, b) for a, b in zip(first, longer[:6]))
    other, _ = build_synthetic(SyntheticSpec(num_series=6, length=200, seed=1))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))
    assert SyntheticSpec(num_series=6).key() != SyntheticSpec(num_series=6, seed=1).key()


def test_series_are_standardised_float32_of_the_length_asked_for() -> None:
    series, rows = build_synthetic(SyntheticSpec(num_series=20, length=300))
    assert len(series) == 20 and all(s.dtype == np.float32 and s.shape == (300,) for s in series)
    assert all(abs(float(s.mean())) < 1e-4 and abs(float(s.std()) - 1) < 1e-3 for s in series)
    assert {row["table"] for row in rows} <= {"synthetic/components", "synthetic/kernel"}
    assert sum(row["series"] for row in rows) == 20 and sum(row["points"] for row in rows) == 20 * 300
    assert all(set(row["periods"]) == {str(p) for p in DEFAULT_PERIODS} for row in rows)


@pytest.mark.parametrize("period", [7, 24, 168])
def test_a_seasonal_component_repeats_exactly_at_its_period(period: int) -> None:
    wave = seasonal_waveform(np.random.default_rng(period), period, 4 * period + 5)
    np.testing.assert_allclose(wave[period:], wave[:-period], atol=1e-9)


@pytest.mark.parametrize("period", [7, 24, 168])
def test_series_are_seasonal_at_the_period_asked_for(period: int) -> None:
    """Every composite series with one seasonal period P correlates more with itself P steps back than P/2 steps
    back (trends, random walks, AR noise and level shifts on top); GP draws with a periodic kernel do on average
    (a product with a short RBF kernel may leave little of the period, as in KernelSynth)."""
    for kernel_share, generator, count, need in ((0.0, "components", 40, 0.9), (1.0, "kernel", 100, 0.5)):
        spec = SyntheticSpec(num_series=count, length=512, periods=(period,), kernel_share=kernel_share)
        gaps = []
        for index in range(spec.num_series):
            values, meta = synthetic_series(spec, index)
            assert meta["generator"] == generator
            if meta["periods"] == [period]:
                gaps.append(_acf(values, period) - _acf(values, period // 2))
        assert len(gaps) >= 5, f"too few {generator} series with period {period}"
        assert np.mean(np.array(gaps) > 0) >= need and np.mean(gaps) > 0, (generator, gaps)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="num_series"):
        SyntheticSpec(num_series=-1)
    with pytest.raises(ValueError, match="periods"):
        SyntheticSpec(num_series=1, periods=(1, 24))
    with pytest.raises(ValueError, match="kernel_share"):
        SyntheticSpec(num_series=1, kernel_share=1.5)
