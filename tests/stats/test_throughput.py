"""``moezoo.stats.RateMeter`` and ``median_rate`` on a fake clock: which intervals count, and the arithmetic."""

from __future__ import annotations

import pytest

from moezoo.stats import RateMeter, median_rate, median_rates, throughput


class FakeClock:
    """Wall and CPU time that advance only when told to."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def advance(self, wall: float, cpu: float | None = None) -> None:
        self.wall += wall
        self.cpu += wall if cpu is None else cpu


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: fake.wall)
    monkeypatch.setattr(throughput.time, "process_time", lambda: fake.cpu)
    return fake


def test_rate_meter_skips_warmup_intervals(clock: FakeClock) -> None:
    meter = RateMeter(warmup=2)
    for seconds, cpu, items in ((10.0, 10.0, 1), (10.0, 10.0, 1), (2.0, 4.0, 8), (2.0, 4.0, 8)):
        meter.start()
        clock.advance(seconds, cpu)
        meter.stop(items)
        clock.advance(100.0)  # time between intervals (data loading, validation) is not counted
    assert meter.wall_rate == pytest.approx(16 / 4.0) and meter.cpu_rate == pytest.approx(16 / 8.0)
    assert meter.as_dict()["timed_intervals"] == 2 and meter.as_dict()["items"] == 16
    empty = RateMeter(warmup=3)
    assert empty.wall_rate is None and empty.cpu_rate is None
    with pytest.raises(RuntimeError, match="without start"):
        empty.stop(1)
    with pytest.raises(ValueError, match="warmup"):
        RateMeter(warmup=-1)


def test_median_rate_times_repeats_after_warmup(clock: FakeClock) -> None:
    durations = iter([50.0, 1.0, 4.0, 2.0])  # the first call is the warm-up

    def run() -> int:
        clock.advance(next(durations))
        return 8

    assert median_rate(run, repeats=3, warmup=1) == pytest.approx(8 / 2.0)
    with pytest.raises(ValueError, match="repeats"):
        median_rate(run, repeats=0)


def test_median_rates_time_wall_and_cpu_of_the_same_calls(clock: FakeClock) -> None:
    # (wall, cpu) per call: a preempted call takes long on the wall clock but not in CPU time
    durations = iter([(50.0, 50.0), (1.0, 1.0), (8.0, 2.0), (2.0, 2.0)])

    def run() -> int:
        clock.advance(*next(durations))
        return 8

    wall, cpu = median_rates(run, repeats=3, warmup=1)
    assert wall == pytest.approx(8 / 2.0) and cpu == pytest.approx(8 / 2.0)
    durations = iter([(1.0, 1.0), (4.0, 1.0), (4.0, 1.0), (4.0, 4.0)])
    wall, cpu = median_rates(run, repeats=3, warmup=1)
    assert wall == pytest.approx(8 / 4.0) and cpu == pytest.approx(8 / 1.0)
    with pytest.raises(ValueError, match="warmup"):
        median_rates(run, repeats=1, warmup=-1)
