"""``moezoo bench routers`` (``python -m moezoo.bench.routers``) on a tiny shape, its place in the ``moezoo bench``
table, and its argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moezoo import cli
from moezoo.bench import routers
from moezoo.layers import ROUTERS, MoE
from moezoo.layers.moe import check_side

SIDE_ROUTERS = sorted(n for n, c in ROUTERS.items() if c.needs_side)  # routers that need side inputs


def test_router_bench_prints_a_row_per_router(capsys: pytest.CaptureFixture[str]) -> None:
    assert routers.main(["--shape", "32,8,8,4,2", "--repeats", "1", "--routers", "topk,top_p,thor"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| router")]
    assert [r.split("|")[1].strip() for r in rows] == ["topk", "top_p", "thor"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].endswith("x") and float(cells[1][:-1]) > 0
        assert 0 < float(cells[2]) <= 2.0  # pairs per token: K = 2 (top-p caps at K)


def test_every_router_but_soft_moe_is_offered_side_input_routers_too() -> None:
    """The default list: every registered router except Soft MoE, the routers with side inputs included."""
    assert routers.sparse_routers() == sorted(n for n, c in ROUTERS.items() if c.kind != "soft")
    assert "soft" not in routers.sparse_routers()
    assert {"topk", "xmoe", "expert_race", "aoe", "erc", "smear"} <= set(routers.sparse_routers())
    assert {"language", "global_embedding", "attention_graph", "promoe"} <= set(SIDE_ROUTERS)
    assert set(SIDE_ROUTERS) <= set(routers.sparse_routers())


@pytest.mark.parametrize("sequences", [1, 4])
def test_side_input_routers_get_a_finite_row(sequences: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--shape", "32,8,8,4,2", "--sequences", str(sequences), "--repeats", "1"]
    assert routers.main([*argv, "--routers", ",".join(SIDE_ROUTERS)]) == 0
    out = capsys.readouterr().out
    rows = {r.split("|")[1].strip(): r for r in out.splitlines() if r.startswith("| ") and "| router" not in r}
    assert sorted(rows) == SIDE_ROUTERS
    for row in rows.values():
        cells = [c.strip() for c in row.strip("|").split("|")]
        ratio, pairs = float(cells[1].removesuffix("x")), float(cells[2])
        assert cells[1].endswith("x") and 0 < ratio < float("inf")
        assert 0 < pairs <= 2.0  # K = 2; ProMoE: one pair for a token whose label is dropped


@pytest.mark.parametrize("name", SIDE_ROUTERS)
def test_synthetic_side_inputs_are_what_the_layer_takes(name: str) -> None:
    """The benchmark's side inputs pass ``check_side`` and the layer's shape checks (per sequence: S = 3); cut by
    one token they are refused, so the shapes are checked and not merely accepted."""
    moe = MoE(8, 8, num_experts=4, top_k=2, router=name, backend="torch").train()
    x = torch.randn(3, 5, 8, requires_grad=True)
    side = routers.bench_side(moe, x)
    assert side is not None and sorted(side) == sorted(moe.router.needs_side)
    check_side(moe.router, side)
    y, aux = moe(x, side=side)
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(aux.aux_loss)
    (y.square().mean() + aux.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for key, value in side.items():
        if value.is_floating_point() and key != "global_embedding":  # posteriors and attention rows sum to 1
            torch.testing.assert_close(value.sum(-1), torch.ones(value.shape[:-1]))
        again = routers.bench_side(moe, x)
        assert again is not None and torch.equal(again[key], value)  # drawn from a fixed seed
        with pytest.raises(ValueError):
            moe(x, side={**side, key: value[:, :-1]})


def test_top_k_gets_no_side_input() -> None:
    moe = MoE(8, 8, num_experts=4, top_k=2, router="topk", backend="torch")
    assert routers.bench_side(moe, torch.randn(2, 3, 8)) is None


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
        (["--routers", "soft"], "are not token routers (Soft MoE is not timed"),
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
