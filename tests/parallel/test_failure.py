"""A rank that stalls or dies mid-step ends the run with a clear error on its peers, not a hang."""

from __future__ import annotations

import time

from tests.parallel.dist_utils import run_ranks_expecting_failure
from tests.parallel.workers import failure_worker


def test_peer_stall_and_death_raise_collective_errors(tmp_path):
    start = time.monotonic()
    exitcodes = run_ranks_expecting_failure(failure_worker, 2, args=(str(tmp_path),), timeout_s=90)
    elapsed = time.monotonic() - start
    assert exitcodes[1] == 3, f"rank 1 should have died with exit code 3, got {exitcodes}"
    # rank 0 re-raises the error (exit code 1; gloo's teardown with a dead peer may abort instead): it must end
    assert exitcodes[0] not in (None, 0), f"rank 0 hung or went on as if nothing happened: {exitcodes}"
    stalled, died = (tmp_path / "rank0.txt").read_text().strip().splitlines()
    for line in (stalled, died):
        assert "expert-parallel" in line and "failed on global rank 0" in line and "Another rank" in line, line
        assert float(line.split("s ", 1)[0]) < 10.0, f"the error took too long: {line}"
    assert "Timed out" in stalled or "timed out" in stalled.lower(), stalled
    assert elapsed < 90
