"""``moezoo bench layer`` end to end on a tiny shape, and its argument errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moezoo.bench import layer
from moezoo.bench.timing import Interleaved
from moezoo.layers.losses import switch_balance_loss


def test_layer_bench_prints_every_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "layer.json"
    args = ["--shape", "64,16,8,4,2", "--repeats", "2", "--threads", "1", "--json", str(path)]
    assert layer.main(args) == 0
    out = capsys.readouterr().out
    cells = _row_cells(out, "(64, 16, 8, 4, 2)")
    for column in ("moezoo/dense", "reference/dense", "naive/dense", "dense MiB", "moezoo MiB"):
        assert column in cells
    assert re.fullmatch(r"[\d.]+x \[[\d.]+-[\d.]+\] \([\d.]+-[\d.]+\)", cells["moezoo/dense"])
    assert "load average (1, 5, 15 min)" in out
    data = json.loads(path.read_text())
    (run,) = data["runs"]
    assert run["threads"] == 1 and run["rounds"] == 2 and run["extra"]["shape"] == [64, 16, 8, 4, 2]
    assert list(run["times_ms"]) == ["dense", "moezoo", "reference", "naive"]
    assert all(len(times) == 2 for times in run["times_ms"].values())
    assert layer.main(["--render", str(path)]) == 0
    assert _row_cells(capsys.readouterr().out, "(64, 16, 8, 4, 2)") == cells


def test_threads_give_one_table_each(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--shape", "32,8,4,4,2", "--repeats", "1", "--threads", "1,2", "--no-naive", "--no-reference"]
    assert layer.main(args) == 0
    out = capsys.readouterr().out
    assert "1 thread(s)" in out and "2 thread(s)" in out
    assert sum(line.startswith("| (32, 8, 4, 4, 2)") for line in out.splitlines()) == 2


@pytest.mark.parametrize("threads", ["0", "1,x", ""])
def test_bad_threads_are_a_clear_error(threads: str) -> None:
    with pytest.raises(SystemExit, match="--threads must be positive integers"):
        layer.main(["--threads", threads])


def test_peers_share_the_weights_and_outputs() -> None:
    """``grouped_mm`` (and the Mixtral block, where transformers is installed) compute moezoo's output; the
    check that ``bench_shape`` runs once fails loudly on a peer that does not."""
    modules, x, _ = layer.build_candidates((64, 16, 8, 4, 2), "swiglu", peers=True, with_reference=False)
    assert "grouped_mm" in modules
    layer.check_same_outputs(modules, x)
    with torch.no_grad():
        modules["moezoo"].experts.w_out.mul_(1.01)  # the peers share moezoo's weights, except the Mixtral copy
    if "hf-mixtral" in modules:
        with pytest.raises(AssertionError, match="hf-mixtral differs from moezoo"):
            layer.check_same_outputs(modules, x)


def test_k1_leaves_the_mixtral_block_out() -> None:
    pytest.importorskip("transformers")
    modules, _, notes = layer.build_candidates((32, 8, 4, 4, 1), "swiglu", peers=True, with_reference=False)
    assert "hf-mixtral" not in modules and "renormalises the top-1 gates" in notes[0]


def test_mixtral_balance_loss_is_k_times_moezoos() -> None:
    """The README's statement: per layer, transformers' Mixtral load-balancing loss = K x moezoo's balance loss."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    num_experts, top_k = 8, 2
    logits = torch.randn(50, num_experts)
    probs = torch.softmax(logits, -1)
    expert_idx = probs.topk(top_k, -1).indices.reshape(-1)
    ours = switch_balance_loss(probs, expert_idx, top_k)
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts, top_k)
    torch.testing.assert_close(theirs, top_k * ours)


@pytest.mark.parametrize("shape", ["1,2,3", "a,b,c,d,e"])
def test_bad_shape_is_a_clear_error(shape: str) -> None:
    with pytest.raises(SystemExit, match="five integers T,D,F,E,K"):
        layer.main(["--shape", shape])


def test_breakdown_parts_and_floor_in_the_same_table(capsys: pytest.CaptureFixture[str]) -> None:
    result = layer.bench_shape((128, 16, 8, 4, 2), "gelu", rounds=2, breakdown=True, with_naive=False)
    assert set(layer.BREAKDOWN_PARTS) <= set(result.names)
    assert all(t > 0 for part in layer.BREAKDOWN_PARTS for t in result.times_ms[part])
    floors = layer.floor_ratios(result)
    assert len(floors) == 2 and all(f > 0 for f in floors)
    assert layer.main(["--shape", "64,16,8,4,2", "--repeats", "1", "--threads", "1", "--breakdown"]) == 0
    cells = _row_cells(capsys.readouterr().out, "(64, 16, 8, 4, 2)")
    for column in ("expert GEMMs/dense", "router/dense", "gather/scatter/dense", "moezoo/floor"):
        assert cells[column].endswith(")")


def test_floor_ratio_is_per_round() -> None:
    times = {"dense": [10.0, 20.0], "dense GEMMs": [8.0, 16.0], "router": [1.0, 2.0], "expert GEMMs": [9.0, 18.0]}
    times |= {"gather/scatter": [1.0, 2.0], "moezoo": [15.0, 26.0]}
    result = Interleaved(times, {n: "dense" for n in times}, 0, (0.0,) * 3, (0.0,) * 3)  # type: ignore[arg-type]
    assert layer.floor_ratios(result) == pytest.approx([15.0 / 13.0, 1.0])


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
        assert float(cells[column].split("x")[0]) > 0


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


def test_gemms_and_cpu_clock(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--gemms`` adds the layer and the expert FFN with each way of running the expert GEMMs (same weights, same
    output); ``--clock cpu`` times the process's CPU time and says so."""
    modules, x, _ = layer.build_candidates((64, 16, 8, 4, 2), "swiglu", gemms=True, with_reference=False)
    assert set(layer.GEMM_BACKENDS) <= set(modules)
    layer.check_same_outputs(modules, x)
    path = tmp_path / "layer.json"
    args = ["--shape", "64,16,8,4,2", "--repeats", "1", "--threads", "1", "--no-naive", "--no-reference"]
    assert layer.main([*args, "--gemms", "--breakdown", "--clock", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "CPU time" in out
    cells = _row_cells(out, "(64, 16, 8, 4, 2)")
    for column in ("moezoo[loop]/dense", "moezoo[grouped_mm]/dense", "expert FFN[grouped_mm]/dense"):
        assert cells[column].endswith(")")
    assert json.loads(path.read_text())["clock"] == "cpu"
    with pytest.raises(SystemExit):
        layer.main([*args, "--clock", "sundial"])


def test_saves_add_both_save_modes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--saves`` adds the layer keeping the pre-activations only and keeping everything (same weights, same
    output); the latter saves more for backward."""
    modules, x, _ = layer.build_candidates((64, 16, 8, 4, 2), "swiglu", saves=True, with_reference=False)
    assert set(layer.SAVE_BACKENDS) <= set(modules)
    layer.check_same_outputs(modules, x)
    path = tmp_path / "layer.json"
    args = ["--shape", "64,16,8,4,2", "--repeats", "1", "--threads", "1", "--no-naive", "--no-reference"]
    assert layer.main([*args, "--saves", "--json", str(path)]) == 0
    cells = _row_cells(capsys.readouterr().out, "(64, 16, 8, 4, 2)")
    for column in ("moezoo[save=h]/dense", "moezoo[save=all]/dense", "moezoo[save=all] MiB"):
        assert cells[column]
    saved = json.loads(path.read_text())["runs"][0]["extra"]["saved_mib"]
    assert saved["moezoo[save=all]"] > saved["moezoo[save=h]"]


def test_openmp_wait_settings_are_recorded_and_rendered(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the wait policy changes busy-machine ratios several-fold, so a table must say which one it ran under
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    path = tmp_path / "layer.json"
    args = ["--shape", "64,16,8,4,2", "--repeats", "1", "--threads", "1", "--no-naive", "--no-reference"]
    assert layer.main([*args, "--json", str(path)]) == 0
    assert "OMP_WAIT_POLICY=PASSIVE" in capsys.readouterr().out
    assert json.loads(path.read_text())["openmp_env"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert layer.main(["--render", str(path)]) == 0  # the file's setting, not the environment's
    assert "OMP_WAIT_POLICY=PASSIVE" in capsys.readouterr().out
