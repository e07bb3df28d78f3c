"""``moezoo bench router-study``: the study table from synthetic run records (seed scores over cells, the verdict
against top-k's seed spread, throughput ratios, routing means, the discrimination line, pooling and refusals)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from moezoo.tasks.bench import router_study as study
from moezoo.tasks.bench import timeseries, vision


def run(variant: str, seed: int, mse: float, cell: str = "96", rate: float = 100.0, cv: float = 0.1,
        overrides: tuple[str, ...] = ("--a", "1"), routed: bool = True) -> dict:  # fmt: skip
    routing = {"expert_load_cv": cv, "dropped_frac": 0.01 * seed, "router_entropy": 1.0 + seed} if routed else None
    return {"variant": variant, "seed": seed, "cell": cell, "metrics": {"test/mse": mse}, "routing": routing,
            "train_cpu_throughput": rate, "overrides": list(overrides)}  # fmt: skip


def write(path: Path, domain: str, runs: list[dict]) -> str:
    path.write_text(json.dumps({"domain": domain, "runs": runs}))
    return str(path)


def test_seed_scores_average_cells_and_drop_incomplete_seeds() -> None:
    runs = [run("moe_topk", 0, 0.4, "96"), run("moe_topk", 0, 0.6, "192"), run("moe_topk", 1, 0.5, "96")]
    assert study.seed_scores(runs, "test/mse") == {0: pytest.approx(0.5)}  # seed 1 lacks horizon 192
    runs.append(run("moe_topk", 1, float("nan"), "192"))
    assert study.seed_scores(runs, "test/mse") == {0: pytest.approx(0.5)}  # a diverged run is no score
    runs[-1] = run("moe_topk", 1, 0.7, "192")
    assert study.seed_scores(runs, "test/mse") == {0: pytest.approx(0.5), 1: pytest.approx(0.6)}


@pytest.mark.parametrize(
    ("mean", "std", "higher", "expected"),
    [
        (0.30, 0.01, False, "outside (better)"),  # lower MSE by more than both spreads
        (0.50, 0.01, False, "outside (worse)"),
        (0.50, 0.01, True, "outside (better)"),  # accuracy: higher is better
        (0.43, 0.01, False, "within"),  # |Δ| = 0.03 <= the reference's std 0.05
        (0.45, 0.05, False, "within"),  # |Δ| equal to the larger spread: not outside
        (0.30, 0.12, False, "within"),  # |Δ| = 0.1 > the reference's 0.05 but not the variant's own 0.12
    ],
)
def test_verdict_compares_the_difference_with_the_larger_seed_spread(mean, std, higher, expected) -> None:
    assert study.verdict(mean, std, 0.40, 0.05, higher) == expected


def test_verdict_needs_a_spread_on_both_sides() -> None:
    assert study.verdict(0.1, None, 0.4, 0.01, False) == "-"
    assert study.verdict(0.1, 0.01, 0.4, None, False) == "-"


def synthetic_timeseries() -> list[dict]:
    """top-k 0.40/0.42/0.44 (std 0.02), soft clearly better, xmoe within, expert choice one seed, a dense twin."""
    return [
        *(run("moe_topk", s, m, rate=100.0, cv=0.2) for s, m in enumerate((0.40, 0.42, 0.44))),
        *(run("moe_soft", s, m, rate=50.0, cv=0.0) for s, m in enumerate((0.30, 0.31))),
        *(run("moe_xmoe", s, m, rate=80.0, cv=0.4) for s, m in enumerate((0.41, 0.45))),
        run("moe_expert_choice", 0, 0.2, rate=120.0),
        *(run("dense", s, m, rate=150.0, routed=False) for s, m in enumerate((0.5, 0.52))),
    ]


def test_study_rows_on_synthetic_runs() -> None:
    rows = {r.variant: r for r in study.study_rows(timeseries.SPEC, synthetic_timeseries(), "moe_topk")}
    # the benchmark's order: dense first, then the router variants alphabetically
    assert list(rows) == ["dense", "moe_expert_choice", "moe_soft", "moe_topk", "moe_xmoe"]
    topk, soft, xmoe, ec, dense = (rows[n] for n in ("moe_topk", "moe_soft", "moe_xmoe", "moe_expert_choice", "dense"))
    assert topk.mean == pytest.approx(0.42) and topk.std == pytest.approx(0.02) and topk.seeds == (0, 1, 2)
    assert topk.verdict == "(reference)" and topk.delta is None and topk.train_ratio == pytest.approx(1.0)
    assert soft.delta == pytest.approx(0.305 - 0.42) and soft.verdict == "outside (better)"
    assert soft.train_ratio == pytest.approx(0.5) and soft.load_cv == 0.0 and soft.router == "soft"
    assert soft.dropped_frac == pytest.approx(0.005) and soft.entropy == pytest.approx(1.5)  # means over runs
    assert xmoe.std == pytest.approx(statistics.stdev([0.41, 0.45])) and xmoe.verdict == "within"
    assert ec.std is None and ec.verdict == "-" and ec.train_ratio == pytest.approx(1.2)  # one seed: no spread
    assert dense.load_cv is None and dense.entropy is None and not dense.routed and dense.train_ratio == 1.5
    ref_std, across = study.spreads(list(rows.values()), "moe_topk")
    assert ref_std == pytest.approx(0.02)
    assert across == pytest.approx(statistics.stdev([0.2, 0.305, 0.42, 0.43]))  # routed rows only, not dense


def test_markdown_says_whether_the_table_discriminates() -> None:
    runs = synthetic_timeseries()
    text = study.markdown(timeseries.SPEC, study.study_rows(timeseries.SPEC, runs, "moe_topk"), "moe_topk")
    lines = text.splitlines()
    assert lines[0].startswith("| variant | router | seeds | mse ↓ (mean ± std) | Δ vs moe_topk |")
    soft = next(line for line in lines if line.startswith("| moe_soft |"))
    assert "0.3050 ± 0.0071" in soft and "-0.1150" in soft and "outside (better)" in soft and "| 0.50 |" in soft
    assert next(line for line in lines if line.startswith("| dense |")).endswith("| - | - | - |")
    assert "the table discriminates" in lines[-1]
    # a noisy top-k (seed std larger than the spread across routers): the table does not discriminate
    noisy = [r for r in runs if r["variant"] != "moe_topk"] + [
        run("moe_topk", s, m) for s, m in enumerate((0.1, 0.5, 0.9))
    ]
    text = study.markdown(timeseries.SPEC, study.study_rows(timeseries.SPEC, noisy, "moe_topk"), "moe_topk")
    assert "does NOT discriminate" in text.splitlines()[-1]
    alone = [run("moe_topk", 0, 0.4), run("moe_soft", 0, 0.3)]  # one seed: no spread to judge by
    text = study.markdown(timeseries.SPEC, study.study_rows(timeseries.SPEC, alone, "moe_topk"), "moe_topk")
    assert "not judged" in text.splitlines()[-1]


def test_vision_reads_accuracy_and_higher_is_better() -> None:
    runs = [{**run("topk", s, 0.0), "metrics": {"test/acc": a}} for s, a in enumerate((0.80, 0.81))] + [
        {**run("xmoe", s, 0.0), "metrics": {"test/acc": a}} for s, a in enumerate((0.85, 0.86))
    ]
    rows = {r.variant: r for r in study.study_rows(vision.SPEC, runs, "topk")}
    assert rows["xmoe"].verdict == "outside (better)" and rows["xmoe"].delta == pytest.approx(0.05)
    with pytest.raises(ValueError, match="no runs of 'bpr'"):
        study.study_rows(vision.SPEC, runs, "bpr")


def test_load_pools_files_of_a_domain_and_refuses_mixed_budgets(tmp_path: Path) -> None:
    runs = synthetic_timeseries()
    a = write(tmp_path / "a.json", "timeseries", runs[:3])
    b = write(tmp_path / "b.json", "timeseries", runs[3:])
    assert len(study.load([a, b])["timeseries"]) == len(runs)
    with pytest.raises(ValueError, match="appears twice"):
        study.load([a, a])
    other = write(tmp_path / "c.json", "timeseries", [run("moe_topk", 5, 0.4, overrides=("--a", "2"))])
    with pytest.raises(ValueError, match="different moezoo fit overrides"):
        study.load([a, other])
    # each horizon has its own override (its pred_len): one budget per variant and horizon, not one override list
    horizons = [run("moe_topk", 0, 0.4, cell=h, overrides=("--data.init_args.pred_len", h)) for h in ("96", "192")]
    assert len(study.load([write(tmp_path / "h.json", "timeseries", horizons)])["timeseries"]) == 2
    with pytest.raises(ValueError, match="domain 'speech'"):
        study.load([write(tmp_path / "s.json", "speech", runs)])


def test_main_writes_the_markdown_and_the_readme_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "ts.json", "timeseries", synthetic_timeseries())
    readme = tmp_path / "README.md"
    block = "<!-- moezoo-bench-router-study-{0}:begin -->\nold {0}\n<!-- moezoo-bench-router-study-{0}:end -->\n"
    readme.write_text("# x\n" + block.format("vision") + "## y\n")
    out = tmp_path / "study.md"
    assert study.main([path, "--readme", str(readme)]) == 2  # no time-series block: the README is left as it was
    assert "moezoo-bench-router-study-timeseries:begin" in capsys.readouterr().err
    assert "old vision" in readme.read_text()
    readme.write_text("# x\n" + block.format("vision") + "## y\n" + block.format("timeseries"))
    assert study.main([path, "--out", str(out), "--readme", str(readme)]) == 0
    text = out.read_text()
    assert text.startswith("**timeseries**") and "| moe_soft | soft |" in text
    assert text.strip() in capsys.readouterr().out
    # each domain's table in its own block, the other domains' blocks untouched
    assert "old timeseries" not in readme.read_text() and "| moe_xmoe | xmoe |" in readme.read_text()
    assert "old vision" in readme.read_text()
    assert readme.read_text().index("| moe_xmoe |") > readme.read_text().index("## y")
    assert study.main([path, "--reference", "timeseries=moe_gmm"]) == 2
    assert "no runs of 'moe_gmm'" in capsys.readouterr().err
    assert study.main([path, "--reference", "timeseries=moe_xmoe"]) == 0
    assert "| moe_topk | topk | 0,1,2 | 0.4200 ± 0.0200 | -0.0100 | within |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        study.main([path, "--reference", "nodomain=x"])
