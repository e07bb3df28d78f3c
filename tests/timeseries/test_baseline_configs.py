"""The time-series configs are consistent: one per model and dataset at horizon 96 (the other horizons by the overrides
each config names, not by near-identical copies), every one in the current form (no LegacyConfigWarning), the
model's sizes equal to the data's, the configs of one dataset agreeing on the data, each baseline's recipe the same
on both datasets, and the public scripts' recipes where they give one."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moezoo.models.spec import LegacyConfigWarning
from moezoo.tasks.cli import cli_main
from moezoo.tasks.legacy import upgrade_task_spec
from moezoo.tasks.optim import StepDecayLR, interval

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "timeseries"
# The supervised configs (one dataset and horizon each); the pretrained forecaster's tsfm_*.yaml have their own
# tests (tests/timeseries/test_tsfm.py).
ALL = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("tsfm_"))
SMOKE = sorted((ROOT / "configs" / "smoke").glob("timeseries_*.yaml"))
CHANNELS = {"etth1": 7, "elecdemand": 3}  # multivariate: every numeric column
BASELINES = {
    "last_value": "last_value_base",
    "seasonal_naive": "seasonal_naive_base",
    "nlinear": "nlinear_base",
    "dlinear": "dlinear_base",
    "patchtst": "patchtst_tiny",
}
HORIZON_OVERRIDE = re.compile(r"--data\.init_args\.pred_len (H|\d+)")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _baseline(dataset: str, family: str) -> Path:
    return CONFIGS / (f"etth1_{family}_336_96.yaml" if dataset == "etth1" else f"{dataset}_{family}.yaml")


def _dataset(path: Path) -> str:
    return path.stem.split("_")[0]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


def _without(config: dict[str, Any], *dotted: str) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for key in dotted:
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(last, None)
    return config


def test_every_baseline_has_one_config_per_dataset():
    for dataset in CHANNELS:
        for family, model in BASELINES.items():
            path = _baseline(dataset, family)
            assert path.is_file(), f"no {dataset} config for {family}: {path}"
            assert _load(path)["model"]["init_args"]["model"] == model, path


def test_no_config_is_another_with_only_the_horizon_changed():
    keys = ("trainer.default_root_dir", "model.init_args.model_kwargs.pred_len", "data.init_args.pred_len")
    seen: dict[str, Path] = {}
    for path in ALL:
        key = yaml.safe_dump(_without(_load(path), *keys), sort_keys=True)
        assert key not in seen, f"{path.name} is {seen[key].name} at another horizon: use the horizon override"
        seen[key] = path


@pytest.mark.parametrize("path", ALL + SMOKE, ids=_rel)
def test_config_is_in_the_current_form(path, tmp_path, monkeypatch):
    assert upgrade_task_spec(_load(path)["model"])[1] == []
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacyConfigWarning)
        model = cli_main(["--config", str(path), "--trainer.logger", "false"], run=False).model.model
    if path in ALL:  # the sizes the data gives the model: every numeric column, look-back 336, horizon 96
        assert (model.num_channels, model.seq_len, model.pred_len) == (CHANNELS[_dataset(path)], 336, 96)


@pytest.mark.parametrize("path", ALL, ids=_rel)
def test_config_agrees_with_itself_and_documents_the_horizon_override(path):
    config = _load(path)
    sizes, data = config["model"]["init_args"].get("model_kwargs") or {}, config["data"]["init_args"]
    assert not {"seq_len", "pred_len", "num_channels"} & set(sizes), "the data decides these; a copy would conflict"
    assert (data["seq_len"], data["pred_len"]) == (336, 96) and data.get("features", "M") == "M"
    assert config["trainer"]["default_root_dir"] == f"runs/{path.stem}"
    text = path.read_text()
    assert f"moezoo fit --config configs/timeseries/{path.name}" in text
    assert HORIZON_OVERRIDE.search(text), f"{path.name} does not say how to run another horizon"
    checkpoints = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert checkpoints and checkpoints[0]["init_args"]["monitor"] == "val/mse"  # the best epoch is tested


@pytest.mark.parametrize("dataset", sorted(CHANNELS))
def test_the_configs_of_a_dataset_agree_on_the_data(dataset):
    paths = [p for p in ALL if _dataset(p) == dataset]
    assert len(paths) >= len(BASELINES) + 1
    reference = _without(_load(paths[0]), "data.init_args.batch_size")["data"]
    for path in paths[1:]:
        assert _without(_load(path), "data.init_args.batch_size")["data"] == reference, path.name


@pytest.mark.parametrize("family", sorted(BASELINES))
def test_a_baseline_trains_with_the_same_recipe_on_every_dataset(family):
    per_dataset = [_load(_baseline(dataset, family)) for dataset in CHANNELS]
    mask = (
        "trainer.default_root_dir",
        "model.init_args.model_kwargs.num_channels",
        "model.init_args.model_kwargs.period",
    )
    recipes = [_without(c, *mask) for c in per_dataset]
    for config in recipes:
        config["data"] = {"batch_size": config["data"]["init_args"]["batch_size"]}  # the rest names the dataset
    assert all(recipe == recipes[0] for recipe in recipes[1:])


def _built(path: Path, tmp_path: Path) -> tuple[Any, Any]:
    """The optimiser and the scheduler that ``moezoo fit --config path`` trains with (jsonargparse's parsing
    included: it carries the default's ``init_args`` over to another ``class_path``)."""
    cli = cli_main(["--config", str(path), "--trainer.logger", "false"], run=False)
    return cli.model.build_optimizer(10)


def test_published_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for family, lr, epochs, batch, constant_epochs, gamma in (
        ("patchtst", 1e-4, 100, 128, 4, 0.9),  # PatchTST's ETTh1 script, lradj="type3"
        ("nlinear", 0.005, 10, 32, 2, 0.5),  # LTSF-Linear's ETTh1 scripts, lradj="type1"
        ("dlinear", 0.005, 10, 32, 2, 0.5),
    ):
        for dataset in CHANNELS:
            path = _baseline(dataset, family)
            config = _load(path)
            assert config["seed_everything"] == 2021 and config["trainer"]["max_epochs"] == epochs, path.name
            assert config["data"]["init_args"]["batch_size"] == batch, path.name
            optimizer, scheduler = _built(path, tmp_path)
            assert type(optimizer) is torch.optim.Adam, path.name
            assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(lr, 0.0)] * 2, path.name
            assert isinstance(scheduler, StepDecayLR) and interval(scheduler) == "epoch", path.name
            assert (scheduler.constant_epochs, scheduler.gamma) == (constant_epochs, gamma), path.name
            stopping = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
            assert [c["init_args"]["patience"] for c in stopping] == ([3] if family != "patchtst" else []), path.name
    for dataset, period in (("etth1", 24), ("elecdemand", 48)):  # one day of steps
        assert _load(_baseline(dataset, "seasonal_naive"))["model"]["init_args"]["model_kwargs"]["period"] == period


def test_the_documented_horizon_override_builds_a_matching_model_and_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _baseline("etth1", "patchtst")
    args = HORIZON_OVERRIDE.search(path.read_text()).group(0).replace(" H", " 720").split()
    cli = cli_main(["--config", str(path), "--trainer.logger", "false", *args], run=False)
    assert cli.model.model.pred_len == cli.datamodule.pred_len == 720
