"""``moezoo compare``: the seed-spread verdict rule on synthetic numbers, bad input, resuming (``execute`` replaced by
a fake run), the dense twin's equal active compute, and one real tiny comparison of a smoke config and its twin."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from moezoo.cli import main as moezoo_main
from moezoo.tasks import compare
from moezoo.tasks.bench import suite
from moezoo.tasks.bench.runner import ROOT, RunSpec
from moezoo.tasks.bench.schema import validate

SMOKE = str(ROOT / "configs" / "smoke" / "vision_digits_moe_vit.yaml")


# -- the rule ----------------------------------------------------------------------------------------------------------
def test_within_the_seed_spread_means_the_difference_is_at_most_the_larger_std() -> None:
    v = compare.verdict("test/acc", "moe", (0.80, 0.02), "dense", (0.79, 0.005))
    assert v.within is True and v.diff == pytest.approx(0.01) and v.spread == 0.02 and v.better is None
    assert "within the seed spread" in v.text
    edge = compare.verdict("test/acc", "moe", (0.5, 0.25), "dense", (0.25, 0.125))  # |diff| == larger std: within
    assert edge.within is True
    out = compare.verdict("test/acc", "moe", (0.90, 0.01), "dense", (0.80, 0.02))
    assert out.within is False and out.better == "moe"
    assert "outside the seed spread, moe higher by 0.1 > 0.02, moe better" in out.text
    lower = compare.verdict("test/cer", "moe", (0.30, 0.01), "dense", (0.20, 0.02))  # CER: lower is better
    assert lower.within is False and lower.better == "dense" and "moe higher" in lower.text
    unknown = compare.verdict("test/score", "moe", (3.0, 0.1), "dense", (1.0, 0.1))  # direction unknown: no "better"
    assert unknown.within is False and unknown.better is None and "better" not in unknown.text
    one_seed = compare.verdict("test/acc", "moe", (0.9, None), "dense", (0.1, 0.01))
    assert one_seed.within is None and "one seed gives no spread" in one_seed.text
    missing = compare.verdict("test/acc", "moe", (None, None), "dense", (0.1, 0.01))
    assert missing.within is None and "missing" in missing.text


def test_metric_directions_from_their_names() -> None:
    higher = ("test/acc", "test/top5_acc", "test/map50", "test/routing_purity", "test/sample_acc")
    lower = (
        "test/loss",
        "test/task_loss",
        "test/cer",
        "test/wer",
        "test/mse",
        "test/mae",
        "test/fid",
        "test/fd_fmnist",
        "test/mape",
        "test/top1_err",
    )
    assert all(compare.higher_is_better(m) is True for m in higher)
    assert all(compare.higher_is_better(m) is False for m in lower)
    assert compare.higher_is_better("test/something") is None


# -- input -----------------------------------------------------------------------------------------------------------
def test_seeds_and_names() -> None:
    assert compare.parse_seeds(["0,1,2"]) == (0, 1, 2) == compare.parse_seeds(["0", "1,2"])
    for bad, match in ((["a"], "integers"), (["-1"], r"\[0, 2\*\*32 - 1\]"), (["1,1"], "more than once"), ([","], "")):
        with pytest.raises(ValueError, match="--seeds" if not match else match):
            compare.parse_seeds(bad)
    assert compare.variant_names(["a/x.yaml", "b/x.yaml", "y.yaml"], True) == ["x", "x-2", "y", "x-dense"]
    assert compare.variant_names(["x.yaml", "x-dense.yaml"], True) == ["x", "x-dense", "x-dense-2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "no/such.yaml"], "no such file"),
        (["--config", SMOKE, "--seeds", "0,x"], "--seeds must be integers"),
        (["--config", SMOKE, "--seeds", "3,3"], "more than once"),
        (["--config", SMOKE, "--trainer.max_steps"], "has no value"),
        (["--config", str(ROOT / "configs/vision/digits_dense_vit.yaml"), "--dense-twin"], "already is a dense twin"),
    ],
)
def test_bad_input_is_a_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert moezoo_main(["compare", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_options_and_a_model_without_moe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for argv in (["--config", SMOKE, "--epochs", "3"], ["--config", SMOKE, "--seed_everything", "1"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            compare.parse_args(argv)
    _, rest = compare.parse_args(["--config", SMOKE, "--trainer.max_epochs", "-1"])
    assert rest == ["--trainer.max_epochs", "-1"]
    import moezoo.models.spec

    monkeypatch.setattr(moezoo.models.spec, "spec_argument", lambda model: None)
    assert compare.main(["--config", SMOKE, "--dense-twin"]) == 2
    assert "takes no MoE spec" in capsys.readouterr().err


def test_the_dense_twin_is_the_dense_config_of_the_same_model() -> None:
    """The twin of configs/vision/digits_moe_vit.yaml is configs/vision/digits_dense_vit.yaml: same MoE settings
    (8 experts, top-2) with ``dense: true``, so the same parameter count."""
    from moezoo.stats import count_parameters
    from moezoo.tasks.cli import cli_main

    key, value = compare.dense_twin_override("configs/vision/digits_moe_vit.yaml", ())
    assert key == "--model.init_args.model_kwargs.moe"
    assert json.loads(value) == {"num_experts": 8, "top_k": 2, "router": "topk", "dense": True}

    def counts(config: str, *overrides: str) -> dict[str, int]:
        cli = cli_main(["--config", str(ROOT / config), *overrides], run=False)
        return count_parameters(cli.model.model).as_dict()

    twin = counts("configs/vision/digits_moe_vit.yaml", key, value)
    assert twin == counts("configs/vision/digits_dense_vit.yaml") and twin["active"] == twin["total"]


# -- resuming --------------------------------------------------------------------------------------------------------
def _fake_record(spec: RunSpec) -> dict[str, Any]:
    dense = spec.variant.endswith("-dense")
    metrics = {"test/acc": 0.5 + 0.1 * spec.seed + (0.0 if dense else 0.3), "test/loss": 1.0, "test/task_loss": 1.0}
    if not dense:
        metrics |= {"test/aux_loss": 0.01, "test/balance": 0.01, "test/expert_load_cv": 0.2}
    routing = None if dense else {"file": "f", "expert_load_cv": 0.2, "dropped_frac": 0.0, "router_entropy": 1.3,
                                  "expert_load": [[0.5, 0.5]], "specialisation": None}  # fmt: skip
    return {"variant": spec.variant, "seed": spec.seed, "cell": spec.cell, "config": spec.config,
            "overrides": list(spec.overrides), "command": spec.command(), "log_dir": "x", "model": "moe_vit_debug",
            "global_step": 2, "metrics": metrics, "routing": routing, "params": {"total": 200 if not dense else 100,
            "active": 100}, "train_throughput": 10.0, "train_cpu_throughput": 5.0, "infer_throughput": None,
            "extra": {}, "wall_s": 1.0}  # fmt: skip


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[RunSpec]:
    calls: list[RunSpec] = []

    def fake_execute(spec: RunSpec, root: Path, infer: Any = None, extras: Any = None) -> dict[str, Any]:
        calls.append(spec)
        return _fake_record(spec)

    monkeypatch.setattr(suite, "execute", fake_execute)
    monkeypatch.setattr(compare, "dense_twin_override", lambda config, overrides: ("--model.x", '{"dense": true}'))
    return calls


def test_a_stopped_compare_resumes(fake_runs: list[RunSpec], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = ["--out", str(tmp_path / "cmp"), "--config", SMOKE, "--dense-twin", "--trainer.max_steps", "2"]
    assert compare.main(["--seeds", "0", *out]) == 0
    assert [(s.variant, s.seed) for s in fake_runs] == [
        ("vision_digits_moe_vit", 0),
        ("vision_digits_moe_vit-dense", 0),
    ]
    assert "one seed gives no spread" in capsys.readouterr().out
    path = tmp_path / "cmp" / compare.JSON_NAME
    first = json.loads(path.read_text())["runs"]
    fake_runs.clear()
    assert compare.main(["--seeds", "0,1", *out]) == 0  # seed 0 kept, seed 1 run
    assert [s.seed for s in fake_runs] == [1, 1]
    data = json.loads(path.read_text())
    assert data["runs"][:2] == first and len(data["runs"]) == 4 and validate(data, "compare") == []
    assert "0.85 ± 0.07071 vs 0.55 ± 0.07071: outside the seed spread" in capsys.readouterr().out
    fake_runs.clear()
    assert compare.main(["--seeds", "1", *out]) == 0 and not fake_runs  # seed 0 stays in the file, out of the table
    data = json.loads(path.read_text())
    assert {r["seed"] for r in data["runs"]} == {1} and {r["seed"] for r in data["other_runs"]} == {0}
    assert (
        compare.main(["--seeds", "0,1", *out]) == 0 and not fake_runs and len(json.loads(path.read_text())["runs"]) == 4
    )
    assert compare.main(["--seeds", "0", *out[:-1], "3"]) == 2  # other overrides: refused
    assert "other overrides" in capsys.readouterr().err
    assert compare.main(["--seeds", "0", "--fresh", *out[:-1], "3"]) == 0 and len(fake_runs) == 2
    assert len(list((tmp_path / "cmp").glob("compare.replaced-*.json"))) == 1


def test_a_file_that_is_not_a_compare_result_is_refused(fake_runs: list, tmp_path: Path) -> None:
    (tmp_path / compare.JSON_NAME).write_text('{"domain": "vision", "runs": []}')
    assert compare.main(["--config", SMOKE, "--out", str(tmp_path)]) == 2 and not fake_runs


# -- a real comparison -----------------------------------------------------------------------------------------------
def test_a_real_tiny_compare_with_the_dense_twin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    budget = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "0"]
    argv = ["compare", "--config", SMOKE, "--seeds", "0,1", "--dense-twin", "--out", "cmp", *budget]
    assert moezoo_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("[compare] run ") == 4 and "| variant | seeds | acc ↑ | loss ↓ | task_loss ↓ |" in printed
    data = json.loads((tmp_path / "cmp" / compare.JSON_NAME).read_text())
    assert validate(data, "compare") == [] and data["baseline"] == "vision_digits_moe_vit-dense"
    assert data["metrics"] == ["test/acc", "test/loss", "test/task_loss"]  # routing statistics and router losses apart
    assert len(data["runs"]) == 4 and all(r["global_step"] == 4 for r in data["runs"])
    moe, dense = data["rows"]
    assert moe["extra"]["variant"] == "vision_digits_moe_vit" and dense["router"] == "dense"
    assert moe["active_params"] < moe["total_params"] and dense["active_params"] == dense["total_params"]
    assert abs(moe["active_params"] - dense["active_params"]) < 0.02 * dense["active_params"]  # the routers' weights
    for key in ("expert_load_cv", "dropped_frac", "router_entropy"):
        assert moe["extra"][key] is not None and moe["extra"][f"{key}_std"] is not None and dense["extra"][key] is None
    assert moe["extra"]["train_throughput_std"] is not None  # after the meter's 3 warm-up steps
    # The verdicts follow the rule, recomputed from the raw runs.
    for v in data["verdicts"]:
        values = {name: [r["metrics"][v["metric"]] for r in data["runs"] if r["variant"] == name]
                  for name in (v["variant"], v["baseline"])}  # fmt: skip
        diff = statistics.fmean(values[v["variant"]]) - statistics.fmean(values[v["baseline"]])
        spread = max(statistics.stdev(values[v["variant"]]), statistics.stdev(values[v["baseline"]]))
        assert v["diff"] == pytest.approx(diff) and v["within"] == (abs(diff) <= spread)
        assert ("within the seed spread" in v["text"]) == v["within"] and v["text"] in printed
    assert [v["metric"] for v in data["verdicts"]] == data["metrics"]
    with open(tmp_path / "cmp" / compare.CSV_NAME) as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["vision_digits_moe_vit", "vision_digits_moe_vit-dense"]
    assert float(rows[0]["acc"]) == pytest.approx(moe["extra"]["acc"]) and rows[1]["expert_load_cv"] == ""
    assert rows[0]["config"] == "configs/smoke/vision_digits_moe_vit.yaml" and rows[0]["seeds"] == "0 1"
    markdown = (tmp_path / "cmp" / compare.MD_NAME).read_text()
    assert markdown.strip() in printed
    # Run again: every run is reused, the same table.
    assert moezoo_main(argv) == 0
    again = capsys.readouterr().out
    assert "[compare] run " not in again and "4 reused" in again
    assert (tmp_path / "cmp" / compare.MD_NAME).read_text() == markdown
