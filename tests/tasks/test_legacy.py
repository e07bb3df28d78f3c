"""The legacy shim: old configs and the released records (flat MoE arguments, lr/weight_decay/warmup_frac/
min_lr_ratio) load as the current form, with one warning naming the new keys."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from moezoo.models import create_model, get_pretrained_cfg, hub, list_models
from moezoo.models.spec import LegacyConfigWarning
from moezoo.tasks.cli import cli_main
from moezoo.tasks.legacy import OLD_DEFAULTS, upgrade_config, upgrade_task_spec
from moezoo.tasks.specs import complete_task_spec, instantiate_task

ROOT = Path(__file__).resolve().parents[2]
RELEASES = list_models(pretrained=True)
# The model sections of two smoke configs as they were written before MoESpec and the optimiser callables.
OLD_MODEL_SECTIONS = {
    "smoke/vision_digits_moe_vit.yaml": """
class_path: moezoo.tasks.vision.ImageClassificationTask
init_args:
  model: moe_vit_debug
  model_kwargs: {patch_size: 2}
  lr: 0.003
""",
    "smoke/vision_dit_digits_promoe.yaml": """
class_path: moezoo.tasks.generation.ImageGenerationTask
init_args:
  model: moe_dit_debug
  model_kwargs:  # (img_size, num_classes: the data's)
    patch_size: 2
    num_experts: 5
    top_k: 1
    num_shared_experts: 1
    router: promoe
    router_kwargs: {temperature: 0.07, contrastive_coef: 0.01}
  lr: 0.003
  objective: rectified_flow
  num_sampling_steps: 8
  guidance_scale: 2.0
  samples_per_class: 2
""",
}


def _old_config(name: str, tmp_path: Path) -> Path:
    """The config file ``name`` with its model section in the old form."""
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    config["model"] = yaml.safe_load(OLD_MODEL_SECTIONS[name])
    path = tmp_path / Path(name).name
    path.write_text(yaml.safe_dump(config))
    return path


def _legacy_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, LegacyConfigWarning)]


@pytest.mark.parametrize("name", OLD_MODEL_SECTIONS)
def test_the_shim_turns_an_old_config_into_the_new_one(name):
    new = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]
    upgraded, moved = upgrade_task_spec(yaml.safe_load(OLD_MODEL_SECTIONS[name]))
    assert upgraded == new
    assert "lr" in moved and upgrade_task_spec(new) == (new, [])  # the new form is a fixed point


@pytest.mark.parametrize("name", OLD_MODEL_SECTIONS)
def test_an_old_config_parses_like_the_new_one_with_one_warning(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = cli_main(["--config", str(_old_config(name, tmp_path)), "--trainer.logger", "false"], run=False)
    [message] = _legacy_warnings(caught)
    assert "optimizer:" in message and "lr_scheduler:" in message and "'lr'" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = cli_main(["--config", str(ROOT / "configs" / name), "--trainer.logger", "false"], run=False)
    assert _legacy_warnings(caught) == []
    assert old.config["model"].as_dict() == new.config["model"].as_dict()


def test_an_old_style_config_fits_a_couple_of_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(_old_config("smoke/vision_dit_digits_promoe.yaml", tmp_path)), "--trainer.logger", "false"]
    args += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false"]
    with pytest.warns(LegacyConfigWarning):
        cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    optimizer = cli.trainer.optimizers[0]
    # lr from the config; weight decay and the schedule's floor from the old generation task's defaults.
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["lr"] == 0.003
    assert optimizer.defaults["weight_decay"] == 0.0
    assert cli.trainer.lr_scheduler_configs[0].scheduler.min_lr_ratio == 0.1
    assert cli.model.model.spec.router == "promoe" and cli.model.model.spec.num_experts == 5


def test_old_task_arguments_take_that_tasks_old_defaults():
    spec = {"class_path": "moezoo.tasks.speech.SpeechRecognitionTask", "init_args": {"warmup_frac": 0.1}}
    init = upgrade_task_spec(spec)[0]["init_args"]
    assert init["optimizer"]["init_args"] == {"lr": 2e-3, "weight_decay": 0.01}
    assert init["lr_scheduler"]["init_args"] == {"warmup_frac": 0.1, "min_lr_ratio": 0.01}
    # model_kwargs of a task that leaves out `model` are upgraded for that task's default model
    spec = {"class_path": "moezoo.tasks.speech.SpeechRecognitionTask", "init_args": {"model_kwargs": {"top_k": 1}}}
    assert upgrade_task_spec(spec) == (
        {"class_path": spec["class_path"], "init_args": {"model_kwargs": {"moe": {"top_k": 1}}}},
        ["model_kwargs.top_k"],
    )
    assert {"ImageGenerationTask", "DetectionTask"} <= {k.rsplit(".", 1)[1] for k in OLD_DEFAULTS}


def test_what_the_shim_leaves_alone_or_refuses():
    data = {"class_path": "moezoo.tasks.vision.DigitsDataModule", "init_args": {"lr": 1}}  # not a task
    assert upgrade_task_spec(data) == (data, []) and upgrade_config({"trainer": {"max_steps": 1}}) == {
        "trainer": {"max_steps": 1}
    }
    both = {"class_path": "moezoo.tasks.vision.ImageClassificationTask", "init_args": {"lr": 1.0, "optimizer": {}}}
    with pytest.raises(ValueError, match=r"the old arguments \['lr'\] cannot be combined with \['optimizer'\]"):
        upgrade_task_spec(both)


def test_python_callers_with_flat_model_kwargs_get_the_new_form(recwarn):
    from moezoo.tasks.vision import ImageClassificationTask

    task = ImageClassificationTask("moe_vit_debug", {"img_size": 8, "patch_size": 2, "top_k": 1})
    assert task.model_kwargs == {"img_size": 8, "patch_size": 2, "moe": {"top_k": 1}}
    assert len(_legacy_warnings(recwarn.list)) == 1 and task.model.spec.top_k == 1


@pytest.fixture
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOEZOO_OFFLINE", "1")


@pytest.mark.parametrize("name", RELEASES)
def test_every_released_record_builds_and_loads_its_weights(name, _offline, recwarn):
    """Records released before the current form keep it (their files and sha256 are untouched): the model and the
    task both build, with one warning for an old-form task; records written since build without one."""
    cfg = get_pretrained_cfg(name)
    old_form = bool(upgrade_task_spec(cfg.task)[1])
    model = create_model(name, pretrained=True)  # loads strictly: every tensor of the file, nothing missing
    assert not _legacy_warnings(recwarn.list)  # the package's own records are translated silently
    recwarn.clear()
    task = instantiate_task(cfg.task)
    assert len(_legacy_warnings(recwarn.list)) == int(old_form)
    task.load_release_weights(hub.load_state_dict(hub.fetch(cfg, offline=True, progress=False)))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(task.model.state_dict()[key], value, rtol=0, atol=0)
    completed = complete_task_spec(cfg.task)
    assert "lr" not in completed["init_args"] and completed["init_args"]["optimizer"]["class_path"]
    assert complete_task_spec(completed) == completed
