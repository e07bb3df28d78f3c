"""``moezoo bench surgery``: the plan of the upcycling study (equal extra steps for dense and upcycled, the dense
twin's steps plus S for the MoE from scratch), the keep levels of the pruning study and both tables with their
seed-spread verdicts, from hand-made runs (the runs themselves are ``moezoo fit`` and take minutes); the speech
domain's configs, and both studies end to end on the speech smoke corpus (a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moezoo.layers import MoE
from moezoo.tasks.bench import surgery
from moezoo.tasks.speech.corpus import missing_engines

ROOT = Path(__file__).resolve().parents[2]
SPEECH_SMOKE = ["--data.init_args.preset", "smoke", "--data.init_args.batch_size", "4"]
needs_tts = pytest.mark.skipif(bool(missing_engines()), reason=f"TTS programs {missing_engines()} not installed")


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


def test_speech_plan_and_fit_overrides():
    runs = surgery.upcycle_runs(["speech"], [5], [0], "last", ("--data.init_args.preset", "smoke",
                                                                "--trainer.max_steps", "99"))  # fmt: skip
    assert [r.variant for r in runs] == ["speech/dense", "speech/upcycled", "speech/scratch"]
    assert [r.config for r in runs] == [f"configs/surgery/numbers_{c}.yaml" for c in
                                        ("dense_continue", "upcycled", "moe_scratch")]  # fmt: skip
    # the overrides reach every run; the study's step budget replaces theirs; (c) gets the twin's 1128 steps + S
    assert [r.overrides for r in runs] == [("--data.init_args.preset", "smoke", "--trainer.max_steps", s)
                                           for s in ("5", "5", str(1128 + 5))]  # fmt: skip
    args = surgery.parse_args(["prune", "--domains", "speech", "--data.init_args.preset", "smoke",
                               "--data.init_args.num_test", "4"])  # fmt: skip
    assert args.data_args == {"preset": "smoke", "num_test": 4}
    with pytest.raises(SystemExit):
        surgery.parse_args(["prune", "--trainer.max_steps", "3"])  # prune trains nothing
    with pytest.raises(SystemExit):
        surgery.parse_args(["upcycle", "--optimizer", "sgd"])  # not a fit override


def test_speech_upcycled_model_is_the_dense_twin_and_the_scratch_moe_has_its_shape():
    """(b) starts as exactly the released dense twin (a)'s function and is the very MoE (c) trains from scratch."""
    from moezoo.tasks.cli import cli_main

    models = {}
    for variant, config in surgery.UPCYCLE["speech"].configs.items():
        cli = cli_main(["--config", str(ROOT / config), "--trainer.logger", "false"], run=False)
        models[variant] = cli.model.model.eval()
    dense, upcycled, scratch = models["dense"], models["upcycled"], models["scratch"]
    shapes = {v: {k: tuple(p.shape) for k, p in m.named_parameters()} for v, m in models.items()}
    assert shapes["upcycled"] == shapes["scratch"]
    moes = [m for m in upcycled.modules() if isinstance(m, MoE)]
    assert len(moes) == 8 and all((m.num_experts, m.top_k, m.experts.w_in.shape[-1]) == (8, 2, 96) for m in moes)
    assert not any(isinstance(m, MoE) for m in dense.modules())
    x, lengths = torch.randn(2, 120, 80), torch.tensor([120, 90])
    with torch.no_grad():
        torch.testing.assert_close(upcycled(x, lengths), dense(x, lengths), atol=1e-4, rtol=1e-5)
        assert (scratch(x, lengths) - dense(x, lengths)).abs().max() > 0.1


@needs_tts
def test_speech_upcycle_runs_end_to_end_on_the_smoke_corpus(tmp_path, capsys):
    path = tmp_path / "u.json"
    argv = ["upcycle", "--domains", "speech", "--steps", "2", "--seeds", "0", "--scratch", "none", *SPEECH_SMOKE,
            "--json", str(path), "--out", str(tmp_path / "runs")]  # fmt: skip
    assert surgery.main(argv) == 0
    runs = {r["variant"]: r for r in json.loads(path.read_text())["runs"]}
    assert sorted(runs) == ["speech/dense", "speech/upcycled"]
    dense, upcycled = runs["speech/dense"], runs["speech/upcycled"]
    assert dense["command"] == (
        "moezoo fit --config configs/surgery/numbers_dense_continue.yaml --seed_everything 0 "
        "--data.init_args.preset smoke --data.init_args.batch_size 4 --trainer.max_steps 2"
    )
    assert dense["global_step"] == upcycled["global_step"] == 2
    assert dense["params"] == {"active": 605_322, "total": 605_322}
    # 8 FFNs of 36,864 -> 8 experts of half width (147,456) + a router (768) each
    assert upcycled["params"]["total"] == 605_322 + 8 * (147_456 + 768 - 36_864)
    assert all(0 <= r["metrics"]["test/cer"] <= 1 for r in runs.values())
    out = capsys.readouterr().out
    assert "**speech**: moe_conformer_tiny.numbers_dense" in out and "test/cer ↓" in out and "| 2 | " in out


@needs_tts
def test_speech_prune_runs_end_to_end_on_the_smoke_corpus(tmp_path):
    """The Omni-Router release: all 8 layers share one router, so each level drops the same experts everywhere."""
    path = tmp_path / "p.json"
    argv = ["prune", "--domains", "speech", "--seeds", "0", "--calib", "8", *SPEECH_SMOKE, "--json", str(path)]
    assert surgery.main(argv) == 0
    runs = json.loads(path.read_text())["runs"]
    assert {(r["method"], r["keep"]) for r in runs} == {("none", 4)} | {
        (m, k) for m in surgery.PRUNE_METHODS for k in (3, 2, 1)
    }
    params = {r["keep"]: r["params"] for r in runs}
    per_expert = 8 * 2 * 96 * 192 + 96  # its weights in the 8 layers, one row of the shared router
    assert params[4] == 1_490_442 and all(params[4] - params[k] == (4 - k) * per_expert for k in (3, 2, 1))
    assert all(0 <= r["test/cer"] <= 1 for r in runs) and all(r["release"].endswith("numbers_omni") for r in runs)
