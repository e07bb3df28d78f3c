"""The fine-tuning recipes (configs/finetune/): each starts from its release, fits a couple of steps with smoke
settings, and the result saves and loads back in the Hub layout; a release name never trains silently from random
weights, and --ckpt_path refuses a release's safetensors file with the option to use instead."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import moezoo
from moezoo.models import save_pretrained
from moezoo.tasks.cli import cli_main
from moezoo.tasks.zoo.contracts import input_contract

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = ROOT / "configs" / "finetune"
ETTH1 = ROOT.parent / "shared" / "data" / "ett" / "ETTh1.csv"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
SMOKE = [
    "--trainer.max_epochs", "1", "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.logger", "false",
    "--trainer.default_root_dir", "run", "--test_after_fit", "false",
]  # fmt: skip


def _image_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _recipes(tmp_path: Path) -> dict[str, tuple[list[str], Path | None]]:
    """config -> (its smoke overrides, a file it needs)."""
    return {
        "vision_imagefolder.yaml": (["--data.init_args.root", str(_image_folder(tmp_path / "images"))], None),
        "speech_numbers.yaml": (["--data.init_args.preset", "smoke", "--data.init_args.batch_size", "4"], None),
        "timeseries_etth1.yaml": (["--data.init_args.path", str(ETTH1), "--data.init_args.batch_size", "8"], ETTH1),
        "generation_fmnist.yaml": (
            [
                "--model.init_args.eval_num_samples",
                "0",
                "--model.init_args.sample_every_n_steps",
                "0",
                "--trainer.val_check_interval",
                "1.0",
                "--data.init_args.train_limit",
                "64",
            ],
            FASHION_MNIST,
        ),  # fmt: skip
        "detection_canvas.yaml": (
            [
                "--data.init_args.num_train",
                "8",
                "--data.init_args.num_val",
                "4",
                "--data.init_args.num_test",
                "4",
                "--data.init_args.batch_size",
                "4",
            ],
            FASHION_MNIST,
        ),  # fmt: skip
    }


RECIPES = [
    "vision_imagefolder.yaml", "speech_numbers.yaml", "timeseries_etth1.yaml", "generation_fmnist.yaml",
    "detection_canvas.yaml",
]  # fmt: skip
# Fashion-MNIST recipes read and prepare 70k images before their two steps, the ETTh1 one builds every window of
# the 17k-row series: minutes (ETTh1: up to 20 on a loaded 2-core machine).
SLOW = {"generation_fmnist.yaml", "detection_canvas.yaml", "timeseries_etth1.yaml"}


def test_every_finetune_config_has_a_recipe_test() -> None:
    assert sorted(p.name for p in FINETUNE.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in RECIPES])
def test_finetune_recipe_starts_from_the_release_fits_and_round_trips(
    config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    overrides, needs = _recipes(tmp_path)[config]
    if needs is not None and not needs.is_file():
        pytest.skip(f"needs {needs}")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moezoo.models.registry"):
        cli = cli_main(["--config", str(FINETUNE / config), *SMOKE, *overrides], run=False)
    task = cli.model
    release = moezoo.create_model(task.model_name, pretrained=True)
    assert "starting from its released weights" in caplog.text
    own = task.model.state_dict()
    loaded = [k for k, v in release.state_dict().items() if own[k].shape == v.shape and torch.equal(own[k], v)]
    assert len(loaded) >= len(own) - 2, "the recipe did not start from the release"
    cli.trainer.fit(task, datamodule=cli.datamodule)
    assert cli.trainer.global_step >= 1
    contract = input_contract(cli.datamodule)  # the fine-tuning data's, which may differ from the release's
    folder = save_pretrained(task.model, tmp_path / "published", description=f"fine-tuned by {config}", input=contract)
    again = moezoo.create_model(str(folder), pretrained=True)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in task.model.state_dict().items())
    assert again.pretrained_cfg.input == contract and again.pretrained_cfg.license == release.pretrained_cfg.license


def test_a_release_name_without_pretrained_says_it_trains_from_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "smoke" / "vision_digits_moe_vit.yaml")
    args = ["--config", config, "--model.init_args.model", "moe_vit_tiny.digits", "--model.init_args.model_kwargs",
            "{}", "--trainer.logger", "false"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="moezoo.models.registry"):
        cli = cli_main(args, run=False)
    assert "pretrained is false" in caplog.text and "random weights" in caplog.text
    assert cli.model.model.head.out_features == 10 and len(cli.model.model.blocks) == 4  # the release's architecture
    release = moezoo.create_model("moe_vit_tiny.digits", pretrained=True)
    assert not torch.equal(cli.model.model.head.weight, release.head.weight)


def test_ckpt_path_given_a_release_file_names_the_right_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moezoo.models.hub import package_weights_dir

    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "smoke" / "vision_digits_moe_vit.yaml")
    weights = package_weights_dir() / "moe_vit_tiny.digits.safetensors"
    with pytest.raises(ValueError, match=r"pretrained true.*moe_vit_tiny\.digits|moe_vit_tiny\.digits.*pretrained"):
        cli_main(["fit", "--config", config, "--ckpt_path", str(weights), "--trainer.logger", "false"])
