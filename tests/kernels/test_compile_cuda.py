"""Every kernel compiles for sm_90 without a GPU (a subprocess with the interpreter off); slow tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import moezoo.kernels as kernels

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_cuda", "90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
