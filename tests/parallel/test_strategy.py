"""ExpertParallelStrategy's settings (the multi-process runs are in test_lightning.py, marked slow)."""

from __future__ import annotations

import pytest

from moezoo.tasks.parallel import ExpertParallelStrategy


@pytest.mark.parametrize("size", [0, -2, 1.5])
def test_bad_expert_parallel_size(size):
    with pytest.raises(ValueError, match=f"expert_parallel_size must be a positive integer or None, got {size}"):
        ExpertParallelStrategy(expert_parallel_size=size)


def test_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        ExpertParallelStrategy(timeout_s=0)


def test_settings_are_kept():
    strategy = ExpertParallelStrategy(expert_parallel_size=2, timeout_s=30)
    assert strategy.expert_parallel_size == 2 and strategy.timeout_s == 30 and strategy.groups is None
