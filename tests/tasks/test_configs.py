"""Every YAML in configs/ instantiates in the current form (no LegacyConfigWarning) with the optimiser it states;
every smoke config fits, and its loss falls on an overfit batch."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from moezoo.cli import main
from moezoo.models.spec import LegacyConfigWarning
from moezoo.tasks.cli import cli_main
from moezoo.tasks.optim import import_class

ROOT = Path(__file__).resolve().parents[2]
ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SMOKE_CONFIGS = sorted((ROOT / "configs" / "smoke").glob("*.yaml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=_rel)
def test_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacyConfigWarning)  # a shipped config is written in the current form
        cli = cli_main(["--config", str(config), "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    # Settings the data decides are left to it, so a config whose data block is swapped for the user's works.
    stated_kwargs = ((yaml.safe_load(config.read_text())["model"].get("init_args") or {}).get("model_kwargs")) or {}
    decided = cli.datamodule.model_settings() if hasattr(cli.datamodule, "model_settings") else {}
    assert not set(stated_kwargs) & set(decided), f"model_kwargs restates what the data decides: {sorted(decided)}"
    # The optimiser a config states is the one built: its values, and its class's own defaults for the rest (the
    # recipe's weight decay of 0.05 only for AdamW, the default's class).
    stated = ((yaml.safe_load(config.read_text()).get("model") or {}).get("init_args") or {}).get("optimizer")
    if stated and getattr(cli.model, "trainable", True):
        optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2, 2))])
        assert type(optimizer) is import_class(stated["class_path"], "class_path")
        for key, value in (stated.get("init_args") or {}).items():
            assert optimizer.defaults[key] == value, key
        if "weight_decay" not in (stated.get("init_args") or {}):
            own = inspect.signature(type(optimizer)).parameters["weight_decay"].default
            assert optimizer.defaults["weight_decay"] == (0.05 if stated["class_path"] == "torch.optim.AdamW" else own)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@pytest.mark.parametrize("config", SMOKE_CONFIGS, ids=_rel)
def test_smoke_config_overfits_one_batch(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(config), "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    args += ["--trainer.overfit_batches", "1", "--trainer.max_steps", "30", "--trainer.max_epochs", "-1"]
    args += ["--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "0"]
    cli = cli_main(args, run=False)
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(recorder.losses) == 30
    first, last = recorder.losses[0], sum(recorder.losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall on an overfit batch: {recorder.losses}"


def test_fit_writes_checkpoints_tests_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "smoke" / "vision_digits_moe_vit.yaml")
    main(["fit", "--config", config, "--trainer.default_root_dir", "run", "--trainer.logger", "false"])
    out = capsys.readouterr().out
    assert "Routing summary" in out and "test/acc" in out
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "fit wrote no checkpoint"
    metrics = list((tmp_path / "run").rglob("test_metrics.json"))
    assert metrics, "fit wrote no test_metrics.json"
    resume = ["fit", "--config", config, "--trainer.default_root_dir", "run", "--trainer.logger", "false"]
    resume += ["--trainer.max_epochs", "3", "--ckpt_path", str(checkpoints[-1]), "--test_after_fit", "false"]
    main(resume)
    resumed = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    state = torch.load(resumed, map_location="cpu", weights_only=False)
    assert state["epoch"] == 2 and state["global_step"] == 3 * 4  # continued to epoch 3 at 4 batches an epoch


def test_fit_that_stops_between_checkpoints_still_saves_its_final_weights(tmp_path, monkeypatch):
    """max_steps=6 with a validation (and so a checkpoint) every 4 steps: last.ckpt must hold step 6, not 4."""
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "smoke" / "vision_digits_moe_vit.yaml")
    args = ["--config", config, "--trainer.logger", "false", "--trainer.max_epochs", "-1"]
    args += ["--trainer.max_steps", "6", "--trainer.limit_train_batches", "10", "--trainer.val_check_interval", "4"]
    args += ["--trainer.enable_checkpointing", "true"]
    cli = cli_main(args, run=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint)] + [checkpoint]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    steps = {
        p.name: torch.load(p, map_location="cpu", weights_only=False)["global_step"]
        for p in (tmp_path / "ckpt").glob("*.ckpt")
    }
    assert steps["last.ckpt"] == 6, steps
    assert steps["epoch=0-step=4.ckpt"] == 4, steps  # the validation-time checkpoint is still there
    assert not list((tmp_path / "ckpt").glob("*.tmp")), "a temporary file was left behind"
    final = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(final[name], value, msg=f"last.ckpt is not the final weights: {name}")


def test_unknown_config_key_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "smoke" / "vision_digits_moe_vit.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", config, "--model.init_args.no_such_option", "1"])
    assert exc.value.code != 0
    assert "no_such_option" in capsys.readouterr().err
