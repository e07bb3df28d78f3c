"""``moezoo bench layer`` end to end on a tiny shape, and its argument errors."""

from __future__ import annotations

import pytest

from moezoo.bench import layer


def test_layer_bench_prints_every_column(capsys: pytest.CaptureFixture[str]) -> None:
    assert layer.main(["--shape", "64,16,8,4,2", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| (T, D, F, E, K)"))
    for column in ("moezoo/dense", "reference/dense", "naive/dense", "dense MiB", "expert GEMMs / one GEMM"):
        assert column in header
    row = next(line for line in out.splitlines() if line.startswith("| (64, 16, 8, 4, 2)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(header.strip("|").split("|"))
    assert all(c.endswith("x") and float(c[:-1]) > 0 for c in cells if c.endswith("x"))


def test_gemm_floor_is_a_positive_ratio() -> None:
    assert layer.gemm_floor((256, 32, 16, 8, 2), "gelu", repeats=1) > 0


@pytest.mark.parametrize("shape", ["1,2,3", "a,b,c,d,e"])
def test_bad_shape_is_a_clear_error(shape: str) -> None:
    with pytest.raises(SystemExit, match="five integers T,D,F,E,K"):
        layer.main(["--shape", shape])


def test_breakdown_parts_account_for_the_layer(capsys: pytest.CaptureFixture[str]) -> None:
    parts = layer.breakdown((256, 32, 16, 8, 2), "swiglu", repeats=1)
    assert set(parts) == {"dense", "dense GEMMs", "balanced bmm", "gather/scatter", "moezoo", *layer.BREAKDOWN_PARTS}
    positive = ("dense", "dense GEMMs", "balanced bmm", "gather/scatter", "moezoo", "router", "expert GEMMs")
    assert all(parts[k] > 0 for k in positive)
    assert layer.breakdown((128, 16, 8, 4, 2), "gelu", repeats=1)["expert GEMMs"] > 0
    assert layer.main(["--shape", "64,16,8,4,2", "--repeats", "1", "--threads", "1", "--breakdown"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| (T, D, F, E, K)"))
    assert "expert GEMMs/dense" in header and "router/dense" in header
    row = next(line for line in out.splitlines() if line.startswith("| (64, 16, 8, 4, 2)"))
    assert len(row.strip("|").split("|")) == len(header.strip("|").split("|"))


def _row_cells(out: str, shape: str) -> dict[str, str]:
    header = next(line for line in out.splitlines() if line.startswith("| (T, D, F, E, K)"))
    row = next(line for line in out.splitlines() if line.startswith(f"| {shape}"))
    names = [c.strip() for c in header.strip("|").split("|")]
    return dict(zip(names, (c.strip() for c in row.strip("|").split("|")), strict=True))


def _assert_compiled_columns(out: str) -> None:
    cells = _row_cells(out, "(64, 16, 8, 4, 2)")
    for column in ("dense+compile/dense", "moezoo+compile/dense+compile", "moezoo+compile MiB"):
        assert column in cells
    for column in ("dense+compile/dense", "moezoo+compile/dense+compile"):
        assert float(cells[column].rstrip("x")) > 0


def test_layer_bench_compile_adds_the_compiled_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    """``--compile`` times the compiled dense FFN and MoE layer in the same run (aot_eager here: no codegen)."""
    args = ["--shape", "64,16,8,4,2", "--repeats", "1", "--threads", "1", "--no-naive"]
    assert layer.main([*args, "--compile", "--compile-backend", "aot_eager"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile backend aot_eager" in out
    _assert_compiled_columns(out)


@pytest.mark.slow
def test_layer_bench_compile_with_inductor(capsys: pytest.CaptureFixture[str]) -> None:
    assert layer.main(["--shape", "64,16,8,4,2", "--repeats", "1", "--threads", "1", "--no-naive", "--compile"]) == 0
    _assert_compiled_columns(capsys.readouterr().out)
