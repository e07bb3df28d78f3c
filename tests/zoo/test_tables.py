"""``moezoo bench tables``: discovery, the format check, the table arithmetic, plots and the released checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from moezoo.tasks.bench import plots, render, tables
from moezoo.tasks.bench.schema import validate


def _row(router: str, metric: float, **kw: object) -> dict:
    row = dict(
        model="m", router=router, metric=metric, active_params=100, total_params=300 if router != "dense" else 100,
        train_throughput=10.0, infer_throughput=20.0, expert_load_cv=None if router == "dense" else 0.2,
        dropped_frac=None if router == "dense" else 0.0,
    )  # fmt: skip
    row.update(kw)
    return row


def _run(domain: str, rows: list[dict], higher: bool = True) -> dict:
    data = {"domain": domain, "settings": "quick", "metric": "m", "higher_is_better": higher, "rows": rows}
    return {"domain": domain, "module": domain, "status": "ok", "runtime_s": 1.0, "data": data}


def test_discover_lists_domains_without_benchmarks() -> None:
    benches, missing, others = tables.discover()
    domains = tables.task_domains()
    assert "vision" in benches and benches["vision"] == "vision"
    assert set(benches) | set(missing) == set(domains) | set(benches)
    assert not set(benches) & set(missing)
    assert "bench" not in domains and set(benches) >= {"vision", "generation", "speech", "timeseries", "detection"}
    assert others == ["kernels", "layer", "parallel", "routers"] and "tables" not in benches
    with pytest.raises(ValueError, match="not domains"):
        tables.discover(["no_such_domain"])


def test_validate_names_the_problems() -> None:
    assert validate({"metric": "acc", "higher_is_better": True, "rows": [_row("topk", 0.5)]}, "d") == []
    problems = validate({"metric": "acc", "rows": [{"model": "m"}, _row("x", float("nan"))]}, "d")
    assert "missing key 'higher_is_better'" in problems
    assert any("row 0 misses" in p for p in problems) and any("not a finite number" in p for p in problems)
    assert validate([], "d") == ["top level is list, expected an object"]


def test_dense_delta_and_markdown(tmp_path: Path) -> None:
    runs = [_run("a", [_row("topk", 0.9), _row("dense", 0.85), _row("soft", 0.8, model="other")]), _run("b", [])]
    runs[1]["data"] = None
    runs[1]["status"] = "failed (exit 1)"
    rows = render.table_rows(runs)
    assert rows[0]["dense_delta"] == pytest.approx(0.05)
    assert [r["dense_delta"] for r in rows][1:] == [None, None], "dense rows and rows without a twin get no delta"
    text = render.markdown(rows, runs, ["c"], ["layer"], "quick", "moezoo bench tables")
    assert "| a | m | topk | m ↑ 0.9000 | +0.0500 |" in text
    assert "| c | - | no benchmark yet (no moezoo/tasks/bench/c.py) | - | - | - |" in text
    assert "| b | `moezoo bench b` | failed (exit 1) | 1.0 | - | - |" in text
    render.write_csv(rows, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].split(",") == list(render.CSV_COLUMNS)


def test_coverage_names_what_a_partial_raw_file_lacks() -> None:
    plan = {"variants": ["topk", "soft", "dense"], "seeds": [0, 1], "cells": [""]}
    runs = [{"variant": "topk", "seed": 0, "cell": ""}, {"variant": "soft", "seed": 0, "cell": ""}]
    assert render.coverage({"args": plan, "runs": runs}) == (
        "2 of 6 runs (partial: seeds run 0 of 0, 1; not run: dense)"
    )
    every = [{"variant": v, "seed": s, "cell": ""} for v in plan["variants"] for s in plan["seeds"]]
    assert render.coverage({"args": plan, "runs": every + every[:1]}) == "6 of 6 runs"  # a repeated run counts once
    cells = {**plan, "variants": ["topk"], "cells": ["96", "720"]}
    assert render.coverage({"args": cells, "runs": [{"variant": "topk", "seed": 0, "cell": "96"}]}) == (
        "1 of 4 runs (partial: seeds run 0 of 0, 1)"
    )
    assert render.coverage({"runs": runs}) == "-" and render.coverage(None) == "-"
    run = _run("a", [_row("topk", 0.9)])
    run["data"].update(args=plan, runs=runs, dataset="toy set, accuracy")
    text = render.markdown(render.table_rows([run]), [run], [], [], "quick", "moezoo bench tables")
    assert "| ok | 1.0 | 2 of 6 runs (partial: seeds run 0 of 0, 1; not run: dense) | toy set, accuracy |" in text


def test_the_first_dense_row_is_the_twin() -> None:
    # an ablation's dense row (e.g. speech-loeo's dense_noaug) comes after the benchmark's own twin and is not it
    rows = render.table_rows([_run("a", [_row("dense", 0.8), _row("topk", 0.9), _row("dense", 0.5)])])
    assert rows[1]["dense_delta"] == pytest.approx(0.1)


def test_baselines_get_no_dense_delta_and_are_labelled(tmp_path: Path) -> None:
    # a baseline of the dense twin's model name still gets no delta: it is no MoE row
    baseline = _row("baseline", 0.7, total_params=0, active_params=0, expert_load_cv=None, dropped_frac=None,
                    train_throughput=None)  # fmt: skip
    runs = [_run("a", [_row("topk", 0.9), _row("dense", 0.85), baseline, _row("baseline", 0.6, model="dlinear")])]
    rows = render.table_rows(runs)
    assert [r["dense_delta"] for r in rows] == [pytest.approx(0.05), None, None, None]
    text = render.markdown(rows, runs, [], [], "quick", "moezoo bench tables")
    assert "| a | m | baseline | m ↑ 0.7000 | - | 0.000M / 0.000M | - samples/s |" in text
    assert "| a | dlinear | baseline | m ↑ 0.6000 | - |" in text and "router `baseline`" in text
    written = plots.plot_all(runs, rows, tmp_path)  # a baseline without parameters on the size axis
    assert written == ["quality_vs_active.png"] and (tmp_path / written[0]).stat().st_size > 1000


def test_plots_are_written(tmp_path: Path) -> None:
    spec = {"by": "class", "layer": 1, "groups": ["0", "1"], "share": [[0.5, 0.5], [1.0, 0.0]]}
    runs = [_run("a", [_row("topk", 0.9, expert_load=[[0.5, 0.5], [0.2, 0.8]], specialisation=spec), _row("dense", 1)])]
    written = plots.plot_all(runs, render.table_rows(runs), tmp_path)
    assert written == ["quality_vs_active.png", "expert_load_a.png", "specialisation_a.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in written)


def test_released_checkpoints_table() -> None:
    rows = {r["name"]: r for r in render.zoo_rows(evaluate=False)}
    moe, dense = rows["moe_vit_tiny.digits"], rows["moe_vit_tiny.digits_dense"]
    assert moe["metric_name"] == "test/acc" and moe["higher_is_better"]
    assert moe["dense_delta"] == pytest.approx(moe["metric"] - dense["metric"])
    assert dense["dense_delta"] is None and dense["expert_load_cv"] is None
    assert moe["expert_load_cv"] > 0 and moe["active_params"] < moe["total_params"]
    text = render.zoo_markdown(list(rows.values()))
    assert f"| `moe_vit_tiny.digits` | vision | acc ↑ {moe['metric']:.4f} | {moe['dense_delta']:+.4f} |" in text
