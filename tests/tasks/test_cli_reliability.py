"""CLI reliability: `--trainer.limit_*_batches 1` is one batch (issue 18 item 3); a checkpoint of another task is an
error naming both tasks (item 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moezoo.tasks.cli import cli_main

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke" / "vision_digits_moe_vit.yaml"


def _trainer(tmp_path, *args):
    config = tmp_path / "c.yaml"
    config.write_text(SMOKE.read_text() + "\n")  # limit_val_batches: 2, limit_test_batches: 2 in the file
    return cli_main(["--config", str(config), "--trainer.logger", "false", *args], run=False).trainer


@pytest.mark.parametrize("value,expected", [("1", 1), ("1.0", 1.0), ("3", 3), ("0.5", 0.5)])
def test_limit_batches_int_one_is_one_batch(tmp_path, value, expected):
    trainer = _trainer(tmp_path, "--trainer.limit_train_batches", value, "--trainer.limit_test_batches", value)
    for limit in (trainer.limit_train_batches, trainer.limit_test_batches):
        assert limit == expected and type(limit) is type(expected)


def test_limit_batches_one_in_a_config_file_is_one_batch(tmp_path):
    override = tmp_path / "o.yaml"
    override.write_text("trainer:\n  limit_val_batches: 1\n  limit_predict_batches: 1\n")
    trainer = _trainer(tmp_path, "--config", str(override))
    assert trainer.limit_val_batches == 1 and isinstance(trainer.limit_val_batches, int)
    assert trainer.limit_predict_batches == 1 and isinstance(trainer.limit_predict_batches, int)


def test_a_checkpoint_of_another_task_is_an_error_naming_both(tmp_path):
    """Issue 18 item 10: a vision checkpoint with a time-series config ran the vision task into a class-id error."""
    import torch

    ckpt = tmp_path / "vision.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "moezoo.tasks.vision.ImageClassificationTask"}}, ckpt)
    config = SMOKE.parent / "timeseries_elecdemand_seg_moe.yaml"
    with pytest.raises(
        ValueError,
        match=r"a checkpoint of the task moezoo.tasks.vision.ImageClassificationTask, but the config's model is "
        r"moezoo.tasks.timeseries.ForecastingTask",
    ):
        cli_main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    from moezoo.tasks.cli import check_checkpoint_task

    for same in ("moezoo.tasks.vision.ImageClassificationTask", "ImageClassificationTask"):
        check_checkpoint_task({"subcommand": "test", "test": {"ckpt_path": str(ckpt), "model": {"class_path": same}}})


def test_command_line_task_arguments_are_found_in_every_spelling():
    """The arguments kept over a checkpoint's hyperparameters (``MoEZooCLI._parse_ckpt_path``)."""
    from moezoo.tasks.cli import model_args_named

    args = ["predict", "--config", "c.yaml", "--model.init_args.predict_conf", "0.1", "--model.predict_dir=out"]
    args += ["--model.init_args.optimizer.init_args.lr", "1e-3", "--model.class_path", "X", "--data.init_args.a", "1"]
    assert model_args_named(args) == ("predict_conf", "predict_dir", "optimizer")
    assert model_args_named(None) == ()


def test_nested_model_kwargs_arguments_are_found_in_every_spelling():
    from moezoo.tasks.cli import split_nested_model_kwargs

    args = ["fit", "--model.init_args.model_kwargs.moe.dense", "true", "--model.model_kwargs.moe.top_k=2"]
    args += ["--model.init_args.model_kwargs.depth", "3", "--data.init_args.model_kwargs.moe.x", "1"]
    rest, nested = split_nested_model_kwargs(args)
    assert nested == [(("moe", "dense"), "true"), (("moe", "top_k"), "2")]
    assert rest == ["fit", "--model.init_args.model_kwargs.depth", "3", "--data.init_args.model_kwargs.moe.x", "1"]
    assert split_nested_model_kwargs(None) == (None, [])


def _model_kwargs(tmp_path, monkeypatch, config, *args):
    monkeypatch.chdir(tmp_path)
    return cli_main(["--config", str(config), "--trainer.logger", "false", *args], run=False).model


@pytest.mark.parametrize("spelling", [["--model.init_args.model_kwargs.moe.dense", "true"],
                                      ["--model.model_kwargs.moe.dense=true"]])  # fmt: skip
def test_nested_model_kwargs_on_the_command_line_are_typed_and_merged(tmp_path, monkeypatch, spelling):
    """The parser kept a value two levels deep as text ("moe.dense must be true or false, got 'true'") and let
    the last such option replace the whole sub-dict (``moe.top_k 1`` after ``moe.dense true`` built an MoE)."""
    task = _model_kwargs(tmp_path, monkeypatch, SMOKE, *spelling, "--model.init_args.model_kwargs.moe.top_k", "1")
    assert not any("experts" in name for name, _ in task.model.named_parameters())  # the dense twin was built
    assert task.hparams.model_kwargs["moe"] == {"dense": True, "top_k": 1}


def test_a_nested_model_kwargs_option_keeps_the_configs_other_entries(tmp_path, monkeypatch):
    config = tmp_path / "dense.yaml"
    config.write_text(
        SMOKE.read_text().replace("      patch_size: 2\n", "      patch_size: 2\n      moe: {dense: true}\n")
    )
    assert "dense: true" in config.read_text()
    task = _model_kwargs(tmp_path, monkeypatch, config, "--model.init_args.model_kwargs.moe.top_k", "1")
    assert task.hparams.model_kwargs["moe"] == {"dense": True, "top_k": 1}
    assert not any("experts" in name for name, _ in task.model.named_parameters())
    with pytest.raises(ValueError, match="model_kwargs.patch_size is 2, not a mapping"):
        _model_kwargs(tmp_path, monkeypatch, config, "--model.init_args.model_kwargs.patch_size.x", "1")


def test_print_config_shows_nested_model_kwargs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(SMOKE), "--model.init_args.model_kwargs.moe.top_k", "1", "--print_config"]
    with pytest.raises(SystemExit):
        cli_main(args)
    assert "moe:\n        top_k: 1\n" in capsys.readouterr().out
