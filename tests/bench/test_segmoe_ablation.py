"""The Seg-MoE ablation (issue 20): ``moezoo bench timeseries`` variants that change one field of ``segmoe``'s MoE
spec (as ``moezoo fit`` resolves them), segment size 1 being the ``moe`` row, the ``--variants ablation`` group, a
tiny real fit, and ``moezoo bench segmoe-ablation``'s table from hand-made runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moezoo.tasks.bench import segmoe_ablation as ablation
from moezoo.tasks.bench import timeseries as bench
from moezoo.tasks.bench.render import readme_markers
from moezoo.tasks.bench.suite import parse_args

ROOT = Path(__file__).resolve().parents[2]
ETTH1 = ROOT / ".." / "shared" / "data" / "ett" / "ETTh1.csv"
MOE_KEY = "model.init_args.model_kwargs.moe"
#: each ablation variant's one change to the model's MoE spec, written out here (not read from the benchmark)
CHANGES: dict[str, tuple[str, Any]] = {
    "segmoe_seg3": ("segment_sizes", 3),
    "segmoe_seg5": ("segment_sizes", 5),
    "segmoe_seg7": ("segment_sizes", 7),
    "segmoe_seg553": ("segment_sizes", [5, 5, 3]),
    "segmoe_e2": ("num_experts", 2),
    "segmoe_e8": ("num_experts", 8),
    "segmoe_noshared": ("num_shared_experts", 0),
}


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}.{key}" if prefix else key).items()}


def resolve(config: str, overrides: tuple[str, ...] = ()) -> tuple[dict[str, Any], torch.nn.Module]:
    """The config as ``moezoo fit`` resolves it (flattened, without the config file's path) and the model it builds
    (initialised at the config's seed)."""
    from moezoo.tasks.cli import cli_main

    cli = cli_main(["--config", str(ROOT / config), *overrides], run=False)
    resolved = flat(cli.config.as_dict())
    resolved.pop("config")
    return resolved, cli.model.model


def moe_layers(model: torch.nn.Module) -> list[Any]:
    from moezoo.layers.segment import SegmentMoE

    return [m for m in model.modules() if isinstance(m, SegmentMoE)]


def test_ablation_variants_change_one_field_of_segmoe() -> None:
    """Through the CLI as ``moezoo fit`` builds them: each variant's resolved config is segmoe's but for one key of
    the MoE spec, its model's spec differs in that one field, and the layers show it."""
    from moezoo.stats import count_parameters

    assert {v.name for v in bench.ABLATION_VARIANTS} == set(CHANGES)
    base, base_model = resolve(bench.SPEC.variant("segmoe").config)
    assert base[f"{MOE_KEY}.segment_sizes"] == [3, 5, 5]
    base_spec = dataclasses.asdict(base_model.spec)
    base_counts = count_parameters(base_model).components
    x = torch.randn(2, 336, 7)
    for name, (field, value) in CHANGES.items():
        variant = bench.SPEC.variant(name)
        assert variant.config == "configs/bench/timeseries/etth1_segmoe.yaml" and variant.router == "segment"
        assert variant.description, name
        resolved, model = resolve(variant.config, variant.overrides)
        differ = {k for k in base.keys() | resolved.keys() if base.get(k, "absent") != resolved.get(k, "absent")}
        assert differ == {f"{MOE_KEY}.{field}"} and resolved[f"{MOE_KEY}.{field}"] == value, name
        spec = dataclasses.asdict(model.spec)
        assert {k for k in spec if spec[k] != base_spec[k]} == {field} and spec[field] == value, name
        layers = moe_layers(model)
        sizes = value if field == "segment_sizes" else [3, 5, 5]
        sizes = sizes if isinstance(sizes, list) else [sizes] * 3
        assert [m.segment_size for m in layers] == sizes, name
        assert [m.num_experts for m in layers] == [value if field == "num_experts" else 4] * 3, name
        assert all((m.shared is None) == (name == "segmoe_noshared") for m in layers), name
        assert all(m.top_k == 1 and m.expert_dim == 64 for m in layers), name
        counts = count_parameters(model).components
        if field == "num_experts":  # one routed expert of 64 per segment either way: the same active experts
            assert counts["routed_experts"].active == base_counts["routed_experts"].active, name
            assert counts["shared_experts"] == base_counts["shared_experts"], name
        if name == "segmoe_noshared":
            assert counts["shared_experts"].total == 0 and base_counts["shared_experts"].total > 0
        assert model(x).shape == (2, 96, 7)


def test_segment_size_one_is_the_moe_variant() -> None:
    """``segmoe`` with segment size 1 in every block resolves to the ``moe`` row's config but the run folder (which
    the benchmark sets per run anyway) and builds the same weights at a seed, so it is no variant of its own."""
    segmoe = bench.SPEC.variant("segmoe")
    one, one_model = resolve(segmoe.config, bench.moe_override({**bench.SEGMOE_MOE, "segment_sizes": 1}))
    moe, moe_model = resolve(bench.SPEC.variant("moe").config)
    differ = {k for k in one.keys() | moe.keys() if one.get(k) != moe.get(k)}
    assert differ == {"trainer.default_root_dir"}
    assert dataclasses.asdict(one_model.spec) == dataclasses.asdict(moe_model.spec)
    theirs = moe_model.state_dict()
    assert all(torch.equal(p, theirs[k]) for k, p in one_model.state_dict().items()) and one_model.state_dict()
    assert "segmoe_seg1" not in {v.name for v in bench.VARIANTS} and "moe" in bench.ABLATION


def test_ablation_group_and_refused_names(capsys: pytest.CaptureFixture[str]) -> None:
    _, budget, settings = parse_args(bench.SPEC, ["--full", "--horizons", "96", "--variants", "ablation"])
    assert budget.variants == ("segmoe", "moe", *CHANGES) and budget.seeds == (0, 1, 2) and budget.cells == ("96",)
    assert settings == "custom"  # one horizon of the full budget's four
    _, budget, _ = parse_args(bench.SPEC, ["--variants", "segmoe_e8,ablation,dense"])
    assert budget.variants == ("segmoe_e8", "segmoe", "moe", *(n for n in CHANGES if n != "segmoe_e8"), "dense")
    # not in the default budgets: the README's tables do not change
    assert not set(CHANGES) & (set(bench.SPEC.quick.variants) | set(bench.SPEC.full.variants))
    with pytest.raises(SystemExit):
        parse_args(bench.SPEC, ["--variants", "segmoe_seg1"])
    err = capsys.readouterr().err
    assert "'segmoe_seg1' is left out on purpose: segment size 1 in every block is the moe variant" in err
    assert "or the groups ['ablation']" in err


# -- the table ------------------------------------------------------------------------------------------------------
def record(variant: str, seed: int, mse: float, cell: str = "96", rate: float = 100.0, cv: float = 0.1,
           params: tuple[int, int] = (150_000, 250_000)) -> dict:  # fmt: skip
    routing = {"expert_load_cv": cv, "dropped_frac": 0.0, "router_entropy": 1.0}
    return {"variant": variant, "seed": seed, "cell": cell, "metrics": {"test/mse": mse}, "routing": routing,
            "train_cpu_throughput": rate, "overrides": ["--data.init_args.pred_len", cell],
            "params": {"active": params[0], "total": params[1]}}  # fmt: skip


def hand_made_runs() -> list[dict]:
    """segmoe 0.40/0.41/0.42 (mean 0.41, std 0.01); seg3 0.380/0.385/0.390 (0.385 ± 0.005: 0.025 better, beyond
    0.01); e8 0.408/0.418 (0.413 ± 0.00707: Δ +0.003, within); noshared 0.45/0.47 (0.46 ± 0.01414: 0.05 worse, beyond
    0.01414); moe one seed (no verdict); dense and a router-study row (not in the ablation); horizon 192: two rows."""
    return [
        *(record("segmoe", s, m, rate=100.0, cv=0.2) for s, m in enumerate((0.40, 0.41, 0.42))),
        *(record("segmoe_seg3", s, m, rate=50.0, cv=0.1, params=(100_000, 300_000))
          for s, m in enumerate((0.380, 0.385, 0.390))),
        *(record("segmoe_e8", s, m, rate=80.0) for s, m in enumerate((0.408, 0.418))),
        *(record("segmoe_noshared", s, m, rate=125.0, params=(90_000, 180_000)) for s, m in enumerate((0.45, 0.47))),
        record("moe", 0, 0.43),
        *(record("dense", s, 0.1) for s in (0, 1)),
        *(record("moe_topk", s, 0.1) for s in (0, 1)),
        *(record("segmoe", s, m, "192") for s, m in enumerate((0.50, 0.54))),
        *(record("segmoe_e2", s, m, "192") for s, m in enumerate((0.51, 0.52))),
    ]  # fmt: skip


def test_table_from_hand_made_runs(tmp_path: Path) -> None:
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"domain": "timeseries", "runs": hand_made_runs()}))
    out, readme = tmp_path / "table.md", tmp_path / "README.md"
    begin, end = readme_markers("segmoe-ablation")
    readme.write_text(f"before\n{begin}\nold\n{end}\nafter\n")
    assert ablation.main([str(path), "--out", str(out), "--readme", str(readme)]) == 0
    text = out.read_text()
    h96, h192 = text.split("**H=192**")
    assert h96.startswith("**H=96** (11 runs through `moezoo fit`, seeds 0, 1, 2;")
    table = [line for line in h96.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| segmoe", "| moe", "| segmoe_seg3", "| segmoe_e8",
                                                             "| segmoe_noshared"]  # fmt: skip
    describe = {name: bench.SPEC.variant(name).description for name in bench.ABLATION}
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table[1:]}
    assert rows["segmoe"] == (f"| segmoe | {describe['segmoe']} | 0,1,2 | 0.4100 ± 0.0100 | - | (reference) | "
                              "0.150M / 0.250M | 1.00 | 0.200 |")  # fmt: skip
    assert rows["segmoe_seg3"] == (f"| segmoe_seg3 | {describe['segmoe_seg3']} | 0,1,2 | 0.3850 ± 0.0050 | -0.0250 | "
                                   "outside (better) | 0.100M / 0.300M | 0.50 | 0.100 |")  # fmt: skip
    assert rows["segmoe_e8"] == (f"| segmoe_e8 | {describe['segmoe_e8']} | 0,1 | 0.4130 ± 0.0071 | +0.0030 | within | "
                                 "0.150M / 0.250M | 0.80 | 0.100 |")  # fmt: skip
    assert rows["segmoe_noshared"].startswith(
        "| segmoe_noshared | no shared expert: active FFN width 64, not 128 (half the compute) | 0,1 | 0.4600 ± 0.0141 "
        "| +0.0500 | outside (worse) | 0.090M / 0.180M | 1.25 |"
    )
    assert rows["moe"] == "| moe | segment size 1 in every block (token-wise routing) | 0 | 0.4300 | +0.0200 | - | " \
        "0.150M / 0.250M | 1.00 | 0.100 |"  # fmt: skip
    assert "Largest move beyond the seed spread: segmoe_noshared" in h96 and "Δ +0.0500 (worse); 2 of 3 judged" in h96
    assert h192.startswith(" (4 runs through `moezoo fit`, seeds 0, 1;")
    assert "| segmoe_e2 |" in h192 and "| -0.0050 | within |" in h192 and "No change moves" in h192
    block = readme.read_text()
    assert block.startswith(f"before\n{begin}\n\n**H=96**") and block.endswith(f"{end}\nafter\n")
    # one horizon, and the errors
    assert ablation.main([str(path), "--horizons", "192", "--out", str(out)]) == 0
    assert "**H=96**" not in out.read_text() and "**H=192**" in out.read_text()
    assert ablation.main([str(path), "--horizons", "336"]) == 2
    no_ref = tmp_path / "no_ref.json"
    no_ref.write_text(json.dumps({"domain": "timeseries", "runs": [record("segmoe_e8", 0, 0.4)]}))
    assert ablation.main([str(no_ref)]) == 2


@pytest.mark.skipif(not ETTH1.is_file(), reason=f"{ETTH1} not present")
def test_an_ablation_variant_runs_through_fit_and_the_table_reads_it(tmp_path: Path) -> None:
    """A tiny real fit (the settings of tests/timeseries/test_bench.py: look-back 48, horizon 12, one epoch on a few
    windows) of segmoe and segmoe_noshared at two seeds, then the table from their JSON."""
    path = tmp_path / "ts.json"
    argv = ["--quick", "--seeds", "0,1", "--horizons", "12", "--trainer.max_epochs", "1", "--data.init_args.seq_len",
            "48", "--data.init_args.train_stride", "200", "--data.init_args.val_stride", "100",
            "--trainer.limit_test_batches", "2", "--data.init_args.path", str(ETTH1),
            "--variants", "segmoe,segmoe_noshared", "--json", str(path), "--out", str(tmp_path / "r")]  # fmt: skip
    assert bench.main(argv) == 0
    data = json.loads(path.read_text())
    assert len(data["runs"]) == 4
    runs = {(r["variant"], r["seed"]): r for r in data["runs"]}
    noshared, segmoe = runs["segmoe_noshared", 0], runs["segmoe", 0]
    assert noshared["command"].endswith(
        """--model.init_args.model_kwargs.moe '{"num_shared_experts": 0, "segment_sizes": [3, 5, 5]}'"""
    )
    assert noshared["params"]["active"] < segmoe["params"]["active"]
    assert all(r["metrics"]["test/mse"] > 0 for r in data["runs"])
    out = tmp_path / "table.md"
    assert ablation.main([str(path), "--out", str(out)]) == 0
    table = out.read_text()
    assert "| segmoe | " in table and "| segmoe_noshared | no shared expert" in table and "(reference)" in table
    assert "No verdict" not in table
