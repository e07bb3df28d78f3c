"""The domain-benchmark machinery without training: budgets and overrides, run commands, the rows (means over seeds
and cells, one run's routing), ``--resume`` and ``--merge`` (``execute`` replaced by a fake run)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from moezoo.cli import BENCHMARKS
from moezoo.tasks.bench import runner, suite
from moezoo.tasks.bench.render import coverage
from moezoo.tasks.bench.runner import RunSpec, merge_overrides
from moezoo.tasks.bench.schema import validate
from moezoo.tasks.bench.suite import BenchSpec, Budget, Variant

SPEC = BenchSpec(
    domain="toy",
    dataset="toy data",
    metric="acc",
    metric_key="test/acc",
    higher_is_better=True,
    throughput_unit="images/s",
    variants=(Variant("moe", "configs/toy/moe.yaml", "topk"), Variant("dense", "configs/toy/dense.yaml", "dense")),
    quick=Budget(seeds=(0,), variants=("moe", "dense"), overrides=("--trainer.max_steps", "5"), cells=("8",)),
    full=Budget(seeds=(0, 1), variants=("moe", "dense"), overrides=(), cells=("8", "16")),
    extra_metrics=("test/loss",),
    cell_option="horizons",
    cell_overrides=lambda h: ("--data.init_args.pred_len", h),
)


def _record(spec: RunSpec, acc: float) -> dict[str, Any]:
    moe = spec.variant == "moe"
    routing = {"file": "f", "expert_load_cv": 0.1 * (spec.seed + 1), "dropped_frac": 0.0, "router_entropy": 1.0,
               "expert_load": [[spec.seed, 1.0]], "specialisation": {"by": "class", "layer": 0, "groups": ["a"],
                                                                     "share": [[spec.seed, 1.0]]}}  # fmt: skip
    return {"variant": spec.variant, "seed": spec.seed, "cell": spec.cell, "config": spec.config,
            "overrides": list(spec.overrides), "command": spec.command(), "log_dir": "x", "model": "toy_model",
            "global_step": 5, "metrics": {"test/acc": acc, "test/loss": 1.0 - acc}, "routing": routing if moe else None,
            "params": {"total": 300 if moe else 100, "active": 100}, "train_throughput": 10.0 + spec.seed,
            "train_cpu_throughput": 5 + 2 * spec.seed, "infer_throughput": None, "extra": {}, "wall_s": 2}  # fmt: skip


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[RunSpec]:
    """``execute`` records the runs it was asked for and returns a record whose accuracy encodes the run."""
    calls: list[RunSpec] = []

    def fake_execute(spec: RunSpec, root: Path, infer: Any = None, extras: Any = None) -> dict[str, Any]:
        calls.append(spec)
        return _record(spec, 0.5 + 0.1 * spec.seed + (0.01 * int(spec.cell)) + (0.2 if spec.variant == "moe" else 0))

    monkeypatch.setattr(suite, "execute", fake_execute)
    return calls


def test_settings_and_overrides() -> None:
    args, budget, name = suite.parse_args(SPEC, [])
    assert name == "quick" and budget == SPEC.quick
    _, budget, name = suite.parse_args(SPEC, ["--full", "--seeds", "3,4", "--variants", "dense"])
    assert name == "full" and budget.seeds == (3, 4) and budget.variants == ("dense",) and budget.cells == ("8", "16")
    _, budget, name = suite.parse_args(SPEC, ["--seeds", "1", "2", "--trainer.max_steps", "7", "--data.x=-1"])
    assert name == "custom" and budget.seeds == (1, 2)
    assert budget.overrides == ("--trainer.max_steps", "7", "--data.x", "-1")
    assert suite.parse_args(SPEC, ["--horizons", "8,32"])[2] == "custom"
    for bad in (["--quick", "--full"], ["--variants", "nope"], ["--seeds", "a"], ["--epochs", "3"], ["oops"]):
        with pytest.raises(SystemExit):
            suite.parse_args(SPEC, bad)
    assert merge_overrides(("--a", "1", "--b", "2"), ("--a=3",)) == ("--a", "3", "--b", "2")
    with pytest.raises(ValueError, match="has no value"):
        merge_overrides(("--a",))


def test_run_commands_reproduce_from_the_checkout() -> None:
    specs = suite.run_specs(SPEC, SPEC.full)
    assert [(s.variant, s.seed, s.cell) for s in specs][:3] == [("moe", 0, "8"), ("dense", 0, "8"), ("moe", 1, "8")]
    spec = specs[-1]
    assert spec.command() == (
        "moezoo fit --config configs/toy/dense.yaml --seed_everything 1 --data.init_args.pred_len 16"
    )
    args = spec.fit_args(Path("/out"))
    assert args[2] == str(runner.ROOT / "configs/toy/dense.yaml") and args[-2:] == [
        "--trainer.default_root_dir",
        "/out",
    ]


def test_rows_average_cells_of_seed_means(fake_runs: list, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "toy.json"
    assert suite.main(SPEC, ["--full", "--json", str(path), "--out", str(tmp_path / "runs")]) == 0
    assert len(fake_runs) == 8
    data = json.loads(path.read_text())
    assert validate(data, "toy") == [] and data["settings"] == "full" and data["runtime_s"] == 16.0
    assert data["args"]["cells"] == ["8", "16"] and len(data["runs"]) == 8
    moe, dense = data["rows"]
    accs = {(r["seed"], r["cell"]): r["metrics"]["test/acc"] for r in data["runs"] if r["variant"] == "moe"}
    per_cell = [statistics.fmean([accs[(0, c)], accs[(1, c)]]) for c in ("8", "16")]
    assert moe["metric"] == pytest.approx(statistics.fmean(per_cell))
    assert moe["extra"]["cells"]["16"]["metric_std"] == pytest.approx(
        statistics.stdev([accs[(0, "16")], accs[(1, "16")]])
    )
    assert moe["extra"]["loss"] == pytest.approx(1.0 - statistics.fmean(accs.values()))
    assert (moe["router"], moe["active_params"], moe["total_params"], moe["model"]) == ("topk", 100, 300, "toy_model")
    assert moe["expert_load_cv"] == pytest.approx(0.15) and moe["train_throughput"] == pytest.approx(6.0)
    assert moe["extra"]["train_throughput"] == pytest.approx(10.5) and moe["infer_throughput"] is None
    assert moe["expert_load"] == [[0, 1.0]] and moe["specialisation"]["share"] == [[0, 1.0]]  # seed 0, first cell
    assert (
        dense["router"] == "dense" and dense["expert_load"] is dense["expert_load_cv"] is dense["dropped_frac"] is None
    )
    assert "| moe | 0." in capsys.readouterr().out


def test_resume_keeps_runs_and_refuses_other_overrides(fake_runs: list, tmp_path: Path) -> None:
    path = str(tmp_path / "toy.json")
    out = ["--out", str(tmp_path / "runs")]
    assert suite.main(SPEC, ["--seeds", "0", "--json", path, *out]) == 0
    first = json.loads(Path(path).read_text())["runs"]
    fake_runs.clear()
    assert suite.main(SPEC, ["--seeds", "0", "1", "--json", path, "--resume", *out]) == 0
    assert [(s.variant, s.seed) for s in fake_runs] == [("moe", 1), ("dense", 1)]
    assert json.loads(Path(path).read_text())["runs"][:2] == first
    fake_runs.clear()  # a resume with another plan keeps the earlier plan too (the tables' coverage reads it)
    assert suite.main(SPEC, ["--seeds", "1", "--json", path, "--resume", *out]) == 0
    assert fake_runs == [] and json.loads(Path(path).read_text())["args"]["seeds"] == [0, 1]
    assert suite.main(SPEC, ["--seeds", "0", "--json", path, "--resume", "--trainer.max_steps", "9", *out]) == 2
    assert suite.main(SPEC, ["--resume"]) == 2  # --resume needs --json


def test_merge_tabulates_runs_made_apart(fake_runs: list, tmp_path: Path) -> None:
    parts = []
    for seed in (0, 1):
        parts.append(str(tmp_path / f"s{seed}.json"))
        assert suite.main(SPEC, ["--seeds", str(seed), "--json", parts[-1], "--out", str(tmp_path / "r")]) == 0
    both = str(tmp_path / "both.json")
    assert suite.main(SPEC, ["--seeds", "0", "1", "--json", both, "--out", str(tmp_path / "r")]) == 0
    merged = str(tmp_path / "merged.json")
    assert suite.main(SPEC, ["--merge", *parts, "--json", merged]) == 0
    data = json.loads(Path(merged).read_text())
    assert data["rows"] == json.loads(Path(both).read_text())["rows"] and data["args"]["merged_from"] == parts
    # the merged file keeps the union of the parts' plans, so the tables can say how complete it is
    plan = {k: json.loads(Path(both).read_text())["args"][k] for k in ("variants", "seeds")}
    assert {k: data["args"][k] for k in ("variants", "seeds")} == plan and plan["seeds"] == [0, 1]
    assert (
        coverage(data)
        == coverage(json.loads(Path(both).read_text()))
        == f"{len(data['runs'])} of {len(data['runs'])} runs"
    )
    assert suite.main(SPEC, ["--merge", parts[0], parts[0]]) == 2  # the same runs twice


def test_moezoo_bench_lists_micro_and_domain_benchmarks() -> None:
    modules = {name: module for name, (module, _) in BENCHMARKS.items()}
    assert modules["layer"] == "moezoo.bench.layer" and modules["tables"] == "moezoo.tasks.bench.tables"
    for domain in ("vision", "generation", "speech", "timeseries", "detection"):
        assert modules[domain] == f"moezoo.tasks.bench.{domain}"
    assert not {"runner", "suite", "schema", "render", "plots"} & set(modules)


def test_no_training_loop_outside_the_tasks() -> None:
    """Only the micro benchmarks (moezoo/bench/) time a backward pass outside tasks/; nothing else steps an
    optimiser: the domain benchmarks train through ``moezoo fit``."""
    import re

    root = runner.ROOT
    pattern = re.compile(r"\.backward\(|\.step\(\)")
    found = {
        str(path.relative_to(root))
        for folder in ("moezoo", "kernels")
        for path in (root / folder).rglob("*.py")
        if pattern.search(path.read_text())
    }
    assert all(p.startswith("moezoo/bench/") for p in found), sorted(found)


def test_readme_block_is_the_table_with_one_command_per_row(fake_runs: list, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    begin, end = suite.readme_markers("toy")
    readme.write_text(f"# Title\n\nbefore\n{begin}\nold table\n{end}\nafter\n")
    path, out = str(tmp_path / "toy.json"), ["--out", str(tmp_path / "runs")]
    assert suite.main(SPEC, ["--full", "--json", path, "--readme", str(readme), *out]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{end}\nafter\n") and "old table" not in text
    block = text.split(begin)[1].split(end)[0]
    assert "Generated by `moezoo bench toy --full` (8 runs through `moezoo fit`, seeds 0, 1, horizons 8, 16)" in block
    assert "| moe | 0." in block and "| dense | 0." in block  # the table, mean ± std
    commands = [line for line in block.splitlines() if line.startswith("- ")]
    assert commands == [
        "- moe: `moezoo fit --config configs/toy/moe.yaml --seed_everything 0 --data.init_args.pred_len 8`",
        "- dense: `moezoo fit --config configs/toy/dense.yaml --seed_everything 0 --data.init_args.pred_len 8`",
    ]
    # --merge rewrites it from the finished runs, without running anything
    readme.write_text(f"{begin}\n{end}\n")
    fake_runs.clear()
    assert suite.main(SPEC, ["--merge", path, "--readme", str(readme)]) == 0
    assert fake_runs == [] and readme.read_text().split(begin)[1].split(end)[0] == block
    # missing markers: an error before any run
    readme.write_text("no markers\n")
    assert suite.main(SPEC, ["--full", "--readme", str(readme), *out]) == 2 and fake_runs == []


def test_multi_cell_rows_spread_over_seeds_and_partial_rows_are_named(fake_runs: list, tmp_path: Path) -> None:
    path = tmp_path / "toy.json"
    assert suite.main(SPEC, ["--full", "--json", str(path), "--out", str(tmp_path / "runs")]) == 0
    runs = json.loads(path.read_text())["runs"]
    accs = {(r["seed"], r["cell"]): r["metrics"]["test/acc"] for r in runs if r["variant"] == "moe"}
    seed_means = [statistics.fmean([accs[(s, "8")], accs[(s, "16")]]) for s in (0, 1)]
    moe = suite.bench_rows(SPEC, runs)[0]
    # the row's std is over the seeds' means over the cells, not over every run
    assert moe.extra["acc_std"] == pytest.approx(statistics.stdev(seed_means))
    assert moe.extra["loss_std"] == pytest.approx(statistics.stdev(seed_means))  # loss = 1 - acc here
    # a seed that misses a cell does not enter the spread; a row missing a cell says so in the table
    fewer = [r for r in runs if not (r["variant"] == "moe" and r["seed"] == 1 and r["cell"] == "16")]
    assert suite.bench_rows(SPEC, fewer)[0].extra["acc_std"] is None
    only8 = [r for r in runs if not (r["variant"] == "dense" and r["cell"] == "16")]
    table = suite.markdown(SPEC, suite.bench_rows(SPEC, only8))
    assert "| dense (horizons 8 only) |" in table and "| moe |" in table


def test_cells_table_and_verdicts(fake_runs: list, tmp_path: Path) -> None:
    path = tmp_path / "toy.json"
    assert suite.main(SPEC, ["--full", "--json", str(path), "--out", str(tmp_path / "runs")]) == 0
    runs = json.loads(path.read_text())["runs"]
    table, by_variant = suite.cells_markdown(
        SPEC, runs, ("16", "8"), lambda c: f"H={c}", [("paper", lambda c: {"8": "0.9"}.get(c, "-"))]
    )
    lines = table.splitlines()
    assert lines[0] == "| variant | H=16 | H=8 |" and lines[-1] == "| paper | - | 0.9 |"
    moe16 = by_variant["moe"]["16"]
    assert f"| moe | {moe16['metric']:.4f} ± {moe16['metric_std']:.4f} |" in table
    # moe is 0.2 above dense with a seed std of 0.07: better beyond the spread (acc: higher is better)
    assert suite.cell_verdicts(SPEC, by_variant, "moe", ["dense", "absent"], ["8"]) == ["- 8: dense: better by 0.2000"]
    one_seed = {v: {c: dict(m, metric_std=None) for c, m in cells.items()} for v, cells in by_variant.items()}
    assert suite.cell_verdicts(SPEC, one_seed, "moe", ["dense"], ["8"]) == ["- 8: dense: no verdict (one seed)"]
