"""``moezoo bench surgery``: the plan of the upcycling study (equal extra steps for dense and upcycled, the dense
twin's steps plus S for the MoE from scratch), the keep levels of the pruning study and both tables with their
seed-spread verdicts, from hand-made runs (the runs themselves are ``moezoo fit`` and take minutes)."""

from __future__ import annotations

import json

import pytest

from moezoo.tasks.bench import surgery


def test_upcycle_plan_gives_equal_extra_steps_and_scratch_the_total():
    runs = surgery.upcycle_runs(["timeseries"], [30, 90], [0, 1], "last")
    assert [r.variant for r in runs[:2]] == ["timeseries/dense", "timeseries/upcycled"]
    steps = {(r.variant, r.cell, r.seed): r.overrides[-1] for r in runs}
    assert steps[("timeseries/dense", "30", 0)] == "30" and steps[("timeseries/upcycled", "90", 1)] == "90"
    scratch = [r for r in runs if r.variant.endswith("scratch")]
    assert runs[-2:] == scratch and [r.overrides[-1] for r in scratch] == [str(650 + 90)] * 2  # last S only
    assert len(surgery.upcycle_runs(["vision"], [1, 2], [0], "all")) == 6
    assert not [r for r in surgery.upcycle_runs(["vision"], [1], [0], "none") if "scratch" in r.variant]
    assert all(r.config.startswith("configs/surgery/") for r in runs)
    assert runs[0].command().startswith("moezoo fit --config configs/surgery/etth1_dense_continue.yaml")


def _fit_record(variant, seed, cell, value):
    return {"variant": variant, "seed": seed, "cell": cell, "metrics": {"test/mse": value}}


def test_upcycle_table_and_verdicts():
    runs = [_fit_record("timeseries/dense", s, "30", v) for s, v in ((0, 0.40), (1, 0.41))]
    runs += [_fit_record("timeseries/upcycled", s, "30", v) for s, v in ((0, 0.30), (1, 0.31))]
    runs += [_fit_record("timeseries/scratch", s, "30", v) for s, v in ((0, 0.305), (1, 0.30))]
    table = surgery.upcycle_tables(runs)
    assert "| 30 | 0.4050 ± 0.0071 | 0.3050 ± 0.0071 | 0.3025 ± 0.0035 | [0, 1] |" in table
    assert "upcycled vs dense, test/mse" in table and "outside the seed spread" in table and "upcycled better" in table
    assert "upcycled vs scratch, test/mse" in table and "within the seed spread" in table
    assert "vision" not in table


def test_prune_keep_levels_and_table():
    assert surgery.prune_cells(8) == [8, 6, 4, 2] and surgery.prune_cells(4) == [4, 3, 2, 1]
    assert surgery.prune_cells(2) == [2, 1]  # 3E/4 rounds to E/2 here: the levels stay distinct

    def rec(method, keep, seed, acc):
        return {"domain": "vision", "method": method, "keep": keep, "num_experts": 8, "seed": seed, "calib": 64,
                "test/acc": acc, "params": 100 * keep}  # fmt: skip

    runs = [rec("none", 8, s, 0.9) for s in (0, 1)]
    runs += [rec("reap", 4, s, a) for s, a in ((0, 0.85), (1, 0.86))]
    runs += [rec("frequency", 4, s, a) for s, a in ((0, 0.70), (1, 0.72))]
    runs += [rec("merge", 4, s, a) for s, a in ((0, 0.84), (1, 0.87))]
    table = surgery.prune_tables(runs)
    assert "| 8/8 | 800 | 0.9000 ± 0.0000 | 0.9000 ± 0.0000 | 0.9000 ± 0.0000 |" in table
    assert "| 4/8 | 400 | 0.8550 ± 0.0071 | 0.7100 ± 0.0141 | 0.8550 ± 0.0212 |" in table
    assert "reap vs frequency, test/acc" in table and "reap better" in table
    assert "reap vs merge, test/acc" in table and "within the seed spread" in table


def test_arguments_are_checked_and_tables_print_from_json(tmp_path, capsys):
    with pytest.raises(SystemExit):
        surgery.main(["upcycle", "--domains", "audio"])
    with pytest.raises(SystemExit):
        surgery.main(["prune", "--resume"])  # needs --json
    with pytest.raises(SystemExit):
        surgery.main(["upcycle", "--steps", "0"])
    path = tmp_path / "u.json"
    path.write_text(json.dumps({"runs": [_fit_record("timeseries/dense", 0, "30", 0.4)]}))
    assert surgery.main(["upcycle", "--json", str(path), "--tables"]) == 0
    assert "| 30 | 0.4000 | - | - | [0] |" in capsys.readouterr().out
