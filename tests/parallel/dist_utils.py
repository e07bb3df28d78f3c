"""Run a function on several local gloo ranks (127.0.0.1, a free port), bounded by a wall-clock timeout."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dist_env(rank: int, world_size: int, port: int) -> None:
    """Environment of one rank for ``init_process_group`` (and for Lightning, which reads the same variables)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )


def run_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 120.0) -> None:
    """``fn(rank, world_size, port, *args)`` in ``world_size`` spawned processes; raise if one fails or hangs."""
    port = free_port()
    context = mp.start_processes(fn, args=(world_size, port, *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def run_ranks_expecting_failure(
    fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 60.0
) -> list[int | None]:
    """Like :func:`run_ranks` but some ranks are meant to die: wait for all, return their exit codes."""
    port = free_port()
    context = mp.start_processes(fn, args=(world_size, port, *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        for process in context.processes:
            process.join(max(0.1, deadline - time.monotonic()))
        return [process.exitcode for process in context.processes]
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
