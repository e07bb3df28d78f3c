"""The baseline configs: one per model, dataset and horizon 96/192/336/720, each family's four files identical but for
the horizon, the model's horizon equal to the data's, and the published recipe where the public scripts give one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "timeseries"
HORIZONS = (96, 192, 336, 720)
DATASETS = {"etth1": 7, "elecdemand": 3}
MODELS = {
    "last_value": "last_value_base",
    "seasonal_naive": "seasonal_naive_base",
    "nlinear": "nlinear_base",
    "dlinear": "dlinear_base",
    "patchtst": "patchtst_tiny",
}


def load(dataset: str, family: str, horizon: int) -> dict:
    return yaml.safe_load((CONFIGS / f"{dataset}_{family}_336_{horizon}.yaml").read_text())


def without_horizon(config: dict) -> dict:
    config = yaml.safe_load(yaml.safe_dump(config))  # a deep copy
    config["trainer"].pop("default_root_dir")
    config["model"]["init_args"]["model_kwargs"].pop("pred_len")
    config["data"]["init_args"].pop("pred_len")
    return config


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_config_per_horizon_that_differs_only_in_the_horizon(dataset, family):
    configs = {h: load(dataset, family, h) for h in HORIZONS}
    for horizon, config in configs.items():
        task = config["model"]["init_args"]
        assert task["model"] == MODELS[family]
        assert task["model_kwargs"]["pred_len"] == config["data"]["init_args"]["pred_len"] == horizon
        assert task["model_kwargs"]["seq_len"] == config["data"]["init_args"]["seq_len"] == 336
        assert task["model_kwargs"]["num_channels"] == DATASETS[dataset]
        assert config["trainer"]["default_root_dir"] == f"runs/{dataset}_{family}_336_{horizon}"
        assert without_horizon(config) == without_horizon(configs[96]), horizon


def test_published_recipes():
    patchtst = load("etth1", "patchtst", 96)
    task = patchtst["model"]["init_args"]
    assert (task["lr"], task["weight_decay"], task["lr_step_decay"]) == (1e-4, 0.0, [3, 0.9])
    assert patchtst["trainer"]["max_epochs"] == 100 and patchtst["data"]["init_args"]["batch_size"] == 128
    assert patchtst["seed_everything"] == 2021
    for family in ("nlinear", "dlinear"):
        config = load("etth1", family, 96)
        task = config["model"]["init_args"]
        assert (task["lr"], task["weight_decay"], task["lr_step_decay"]) == (0.005, 0.0, [1, 0.5])
        assert config["trainer"]["max_epochs"] == 10 and config["data"]["init_args"]["batch_size"] == 32
        stopping = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
        assert stopping and stopping[0]["init_args"]["patience"] == 3
    assert load("etth1", "seasonal_naive", 96)["model"]["init_args"]["model_kwargs"]["period"] == 24
    assert load("elecdemand", "seasonal_naive", 96)["model"]["init_args"]["model_kwargs"]["period"] == 48
