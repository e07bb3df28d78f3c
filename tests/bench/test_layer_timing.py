"""The interleaved timing harness (``moezoo.bench.timing``), on fake clocks: its logic, not the machine's speed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from moezoo.bench.timing import (
    CLOCKS,
    Interleaved,
    balanced_orders,
    cpu_ms,
    format_load,
    interleave,
    quartiles,
    wall_ms,
)


class FakeClock:
    """A timer that records the call order and returns scripted milliseconds per candidate call."""

    def __init__(self, ms: dict[str, list[float]]) -> None:
        self.ms = {name: iter(values) for name, values in ms.items()}
        self.order: list[str] = []

    def candidates(self, names: list[str]) -> dict[str, Callable[[], object]]:
        return {name: (lambda name=name: self.order.append(name)) for name in names}  # type: ignore[misc]

    def timer(self, fn: Callable[[], object]) -> float:
        fn()
        return next(self.ms[self.order[-1]])


def fake_load() -> Callable[[], tuple[float, float, float]]:
    values = iter([(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)])
    return lambda: next(values)


def test_rounds_interleave_after_warmup_and_ratios_pair_rounds() -> None:
    # round 0 is warm-up; the load doubles in round 2: paired ratios do not see it; the order rotates every round
    clock = FakeClock({"dense": [99.0, 10.0, 20.0, 10.0], "a": [99.0, 12.0, 24.0, 12.0], "b": [1.0, 5.0, 10.0, 6.0]})
    result = interleave(
        clock.candidates(["dense", "a", "b"]), "dense", rounds=3, warmup=1, timer=clock.timer, loadavg=fake_load()
    )
    # the balanced square for three candidates: the warm-up takes the last row, the timed rounds the first three
    assert clock.order == ["a", "dense", "b", "dense", "a", "b", "a", "b", "dense", "b", "dense", "a"]
    assert result.times_ms == {"dense": [10.0, 20.0, 10.0], "a": [12.0, 24.0, 12.0], "b": [5.0, 10.0, 6.0]}
    assert result.rounds == 3 and result.warmup == 1
    assert result.ratios("a") == pytest.approx([1.2, 1.2, 1.2])
    a = result.summary("a")
    assert (a.median_ratio, a.q1_ratio, a.q3_ratio, a.min_ratio, a.max_ratio) == pytest.approx((1.2,) * 5)
    assert a.median_ms == 12.0
    b = result.summary("b")
    assert b.median_ratio == pytest.approx(0.5) and (b.min_ratio, b.max_ratio) == pytest.approx((0.5, 0.6))
    assert result.summary("dense").median_ratio == 1.0
    assert (result.load_start, result.load_end) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert format_load(result) == "load average (1, 5, 15 min) 1.0 2.0 3.0 -> 4.0 5.0 6.0"


def test_unpaired_medians_would_differ() -> None:
    """The ratio of medians of unpaired times can mislead; the median of paired ratios cannot be fooled by load."""
    clock = FakeClock({"dense": [10.0, 10.0, 30.0, 30.0, 30.0], "a": [11.0, 11.0, 33.0, 33.0, 33.0]})
    result = interleave(clock.candidates(["dense", "a"]), "dense", rounds=5, warmup=0, timer=clock.timer)
    assert result.summary("a").median_ratio == pytest.approx(1.1)
    assert result.summary("a").max_ratio == pytest.approx(1.1)


def test_per_candidate_baselines_and_before_hook() -> None:
    clock = FakeClock({"dense": [10.0], "dense+c": [5.0], "m+c": [6.0], "m": [15.0]})
    seen: list[str] = []
    result = interleave(
        clock.candidates(["dense", "dense+c", "m+c", "m"]),
        {"m+c": "dense+c"},
        rounds=1,
        warmup=0,
        timer=clock.timer,
        before=seen.append,
    )
    assert seen == clock.order == ["dense", "dense+c", "m", "m+c"]  # the hook runs before each call, in its order
    assert result.baselines == {"dense": "dense", "dense+c": "dense", "m+c": "dense+c", "m": "dense"}
    assert result.summary("m+c").median_ratio == pytest.approx(1.2)
    assert result.summary("dense+c").median_ratio == pytest.approx(0.5)


def test_quartiles_inclusive() -> None:
    assert quartiles([3.0]) == (3.0, 3.0, 3.0)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert quartiles([4.0, 1.0]) == (1.75, 2.5, 3.25)
    with pytest.raises(ValueError, match="no values"):
        quartiles([])


def test_json_round_trip_recomputes_the_summary() -> None:
    clock = FakeClock({"dense": [10.0, 20.0, 40.0], "a": [13.0, 22.0, 60.0]})
    result = interleave(clock.candidates(["dense", "a"]), "dense", rounds=3, warmup=0, timer=clock.timer)
    result.extra = {"saved_mib": {"dense": 1.5}}
    data = json.loads(json.dumps(result.as_dict()))
    assert data["summary"]["a"]["median_ratio"] == pytest.approx(1.3)
    back = Interleaved.from_dict(data)
    assert back.times_ms == result.times_ms and back.extra == result.extra and back.rounds == 3
    assert back.summary("a") == result.summary("a")
    assert result.summary("a").ratio_cell() == "1.30x [1.20-1.40] (1.10-1.50)"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(candidates={}, baseline="dense", rounds=1), "at least one candidate"),
        (dict(baseline="dense", rounds=0), "rounds must be an integer >= 1, got 0"),
        (dict(baseline="dense", rounds=2, warmup=-1), "warmup must be an integer >= 0, got -1"),
        (dict(baseline="other", rounds=1), "baseline 'other' of candidate 'dense' is not a candidate"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    kwargs.setdefault("candidates", {"dense": lambda: None})
    with pytest.raises(ValueError, match=match):
        interleave(**kwargs)  # type: ignore[arg-type]


def test_wall_ms_calls_once_and_is_non_negative() -> None:
    calls: list[int] = []
    assert wall_ms(lambda: calls.append(1)) >= 0.0 and calls == [1]


def test_cpu_ms_counts_work_not_sleep() -> None:
    """``cpu_ms`` is the process's CPU time: a sleep costs (almost) none of it, a busy loop does."""
    calls: list[int] = []
    assert cpu_ms(lambda: calls.append(1)) >= 0.0 and calls == [1]
    assert cpu_ms(lambda: time.sleep(0.2)) < 100.0
    assert cpu_ms(lambda: sum(i * i for i in range(300_000))) > 0.0
    assert CLOCKS == {"wall": wall_ms, "cpu": cpu_ms}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_balanced_orders_put_each_candidate_in_each_position_and_after_each_other_equally_often(n: int) -> None:
    orders = balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n) and all(sorted(o) == list(range(n)) for o in orders)
    per_position = {(o[p], p) for o in orders for p in range(n)}
    assert len(per_position) == n * n  # every (candidate, position)
    follows = [(o[p - 1], o[p]) for o in orders for p in range(1, n)]
    counts = {pair: follows.count(pair) for pair in set(follows)}
    assert len(counts) == n * (n - 1) and len(set(counts.values())) <= 1  # every ordered pair, equally often


def test_interleave_follows_the_balanced_orders() -> None:
    clock = FakeClock({n: [1.0] * 8 for n in ["dense", "a", "b", "c"]})
    interleave(clock.candidates(["dense", "a", "b", "c"]), "dense", rounds=6, warmup=2, timer=clock.timer)
    names = ["dense", "a", "b", "c"]
    expected = [names[i] for r in range(-2, 6) for i in balanced_orders(4)[r % 4]]
    assert clock.order == expected
