"""``moezoo bench tables``: discovery, the contract check, the table arithmetic, plots and routing statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moezoo.bench import tables
from moezoo.models import create_model


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
    assert "layer" in others and "tables" not in others and "tables" not in benches
    with pytest.raises(ValueError, match="not domains"):
        tables.discover(["no_such_domain"])


def test_validate_names_the_problems() -> None:
    assert tables.validate({"metric": "acc", "higher_is_better": True, "rows": [_row("topk", 0.5)]}, "d") == []
    problems = tables.validate({"metric": "acc", "rows": [{"model": "m"}, _row("x", float("nan"))]}, "d")
    assert "missing key 'higher_is_better'" in problems
    assert any("row 0 misses" in p for p in problems) and any("not a finite number" in p for p in problems)
    assert tables.validate([], "d") == ["top level is list, expected an object"]


def test_dense_delta_and_markdown(tmp_path: Path) -> None:
    runs = [_run("a", [_row("topk", 0.9), _row("dense", 0.85), _row("soft", 0.8, model="other")]), _run("b", [])]
    runs[1]["data"] = None
    runs[1]["status"] = "failed (exit 1)"
    rows = tables.table_rows(runs)
    assert rows[0]["dense_delta"] == pytest.approx(0.05)
    assert [r["dense_delta"] for r in rows][1:] == [None, None], "dense rows and rows without a twin get no delta"
    text = tables.markdown(rows, runs, ["c"], ["layer"], "quick", "moezoo bench tables")
    assert "| a | m | topk | m ↑ 0.9000 | +0.0500 |" in text
    assert "| c | - | no benchmark yet (no moezoo/bench/c.py) | - |" in text
    assert "| b | `moezoo bench b` | failed (exit 1) | 1.0 |" in text
    tables.write_csv(rows, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].split(",") == list(tables.CSV_COLUMNS)


def test_plots_are_written(tmp_path: Path) -> None:
    spec = {"by": "class", "layer": 1, "groups": ["0", "1"], "share": [[0.5, 0.5], [1.0, 0.0]]}
    runs = [_run("a", [_row("topk", 0.9, expert_load=[[0.5, 0.5], [0.2, 0.8]], specialisation=spec), _row("dense", 1)])]
    written = tables.plot_all(runs, tables.table_rows(runs), tmp_path)
    assert written == ["quality_vs_active.png", "expert_load_a.png", "specialisation_a.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in written)


def test_routing_stats_against_a_naive_count() -> None:
    model = create_model("moe_vit_debug", img_size=8, patch_size=2, num_classes=3).eval()
    x = torch.randn(7, 1, 8, 8)
    group_B = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    stats = tables.routing_stats(model.forward_with_aux, [(x[:4], group_B[:4]), (x[4:], group_B[4:])], "abc", "cls")
    tokens = 17  # 16 patches + the class token
    load = torch.zeros(2, 4)
    spec = torch.zeros(3, 4)
    for xb, gb in ((x[:4], group_B[:4]), (x[4:], group_B[4:])):
        with torch.no_grad():
            _, auxes = model.forward_with_aux(xb)
        for layer, aux in enumerate(auxes):
            for token, expert in zip(aux.routing.token_idx_N.tolist(), aux.routing.expert_idx_N.tolist()):
                load[layer, expert] += 1
                if layer == len(auxes) - 1:
                    spec[int(gb[token // tokens]), expert] += 1
    expected_load = load / load.sum(-1, keepdim=True)
    torch.testing.assert_close(torch.tensor(stats["expert_load"], dtype=torch.float32), expected_load)
    cv = (load.std(-1, unbiased=False) / load.mean(-1)).mean()
    assert stats["expert_load_cv"] == pytest.approx(float(cv), rel=1e-6)
    assert stats["dropped_frac"] == 0.0
    assert stats["specialisation"]["groups"] == ["a", "b", "c"] and stats["specialisation"]["layer"] == 1
    share = torch.tensor(stats["specialisation"]["share"], dtype=torch.float32)
    torch.testing.assert_close(share, spec / spec.sum(-1, keepdim=True))


def test_dense_model_has_no_routing_stats() -> None:
    model = create_model("moe_vit_debug", img_size=8, patch_size=2, dense=True).eval()
    assert (
        tables.routing_stats(model.forward_with_aux, [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))], "ab", "c") == {}
    )


def test_released_checkpoints_table() -> None:
    rows = {r["name"]: r for r in tables.zoo_rows(evaluate=False)}
    moe, dense = rows["moe_vit_tiny.digits"], rows["moe_vit_tiny.digits_dense"]
    assert moe["metric_name"] == "test/acc" and moe["higher_is_better"]
    assert moe["dense_delta"] == pytest.approx(moe["metric"] - dense["metric"])
    assert dense["dense_delta"] is None and dense["expert_load_cv"] is None
    assert moe["expert_load_cv"] > 0 and moe["active_params"] < moe["total_params"]
    text = tables.zoo_markdown(list(rows.values()))
    assert f"| `moe_vit_tiny.digits` | vision | acc ↑ {moe['metric']:.4f} | {moe['dense_delta']:+.4f} |" in text
