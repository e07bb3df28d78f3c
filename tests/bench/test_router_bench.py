"""``moezoo bench routers`` (``python -m moezoo.bench.routers``) on a tiny shape, its place in the ``moezoo bench``
table, and its argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moezoo import cli
from moezoo.bench import routers


def test_router_bench_prints_a_row_per_router(capsys: pytest.CaptureFixture[str]) -> None:
    assert routers.main(["--shape", "32,8,8,4,2", "--repeats", "1", "--routers", "topk,top_p,thor"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| router")]
    assert [r.split("|")[1].strip() for r in rows] == ["topk", "top_p", "thor"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].endswith("x") and float(cells[1][:-1]) > 0
        assert 0 < float(cells[2]) <= 2.0  # pairs per token: K = 2 (top-p caps at K)


def test_soft_and_side_input_routers_are_not_offered() -> None:
    assert "soft" not in routers.sparse_routers() and "language" not in routers.sparse_routers()
    assert {"topk", "xmoe", "expert_race", "aoe", "erc", "smear"} <= set(routers.sparse_routers())


def test_sequences_split_the_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    """SMEAR merges once per sequence: ``--sequences`` is the batch of examples the T tokens come in."""
    argv = ["--shape", "32,8,8,4,2", "--sequences", "4", "--repeats", "1", "--routers", "topk,smear"]
    assert routers.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 sequence(s)" in out and "| smear |" in out and "| 1.00 |" in out  # one merged expert per token


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--shape", "1,2,3"], "five integers T,D,F,E,K"),
        (["--routers", "soft"], "are not token routers without side inputs"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--shape", "32,8,8,4,2", "--sequences", "5"], "--sequences must be a positive divisor of T=32, got 5"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, match, capsys) -> None:
    with pytest.raises(SystemExit):
        routers.main(argv)
    assert match in capsys.readouterr().err


def test_moezoo_bench_routers_is_a_listed_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.BENCHMARKS["routers"][0] == "moezoo.bench.routers"
    assert cli.main(["bench", "--help"]) == 0
    listing = capsys.readouterr().out
    assert "  routers " in listing and cli.BENCHMARKS["routers"][1] in listing
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "routers", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moezoo bench routers") and "--shape" in out and "--routers" in out
    # dispatched through the table: the same rows as the module's own main
    assert cli.main(["bench", "routers", "--shape", "16,8,8,4,2", "--repeats", "1", "--routers", "topk"]) == 0
    assert "| topk |" in capsys.readouterr().out


def test_python_dash_m_still_works() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "moezoo.bench.routers", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--shape" in done.stdout, done.stderr
