"""``python -m moezoo.bench.routers`` on a tiny shape, and its argument errors."""

from __future__ import annotations

import pytest

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
    assert {"topk", "xmoe", "expert_race"} <= set(routers.sparse_routers())


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--shape", "1,2,3"], "five integers T,D,F,E,K"),
        (["--routers", "soft"], "are not sparse routers without side inputs"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, match, capsys) -> None:
    with pytest.raises(SystemExit):
        routers.main(argv)
    assert match in capsys.readouterr().err
