"""Tasks take LightningCLI optimizer / lr-scheduler callables; the default is the recipe they always trained with,
and another class named in a config, on the command line or in a Python spec gets its own defaults."""

from __future__ import annotations

import functools
import inspect

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from moezoo.tasks.base import MoETask
from moezoo.tasks.cli import cli_main
from moezoo.tasks.detection import DetectionTask
from moezoo.tasks.generation import ImageGenerationTask
from moezoo.tasks.optim import (
    DEFAULT_OPTIMIZER,
    StepDecayLR,
    WarmupCosineLR,
    class_options_as_specs,
    config_own_defaults,
    interval,
    own_class_defaults,
    param_groups,
    warmup_cosine,
)
from moezoo.tasks.specs import complete_task_spec, instantiate_task
from moezoo.tasks.speech import SpeechRecognitionTask
from moezoo.tasks.timeseries import ForecastingTask
from moezoo.tasks.vision import ImageClassificationTask

VIT = {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10}
TASKS = [ImageClassificationTask, ImageGenerationTask, SpeechRecognitionTask, ForecastingTask, DetectionTask]


def _task(**kwargs) -> ImageClassificationTask:
    return ImageClassificationTask("moe_vit_debug", VIT, **kwargs)


def test_default_recipe_is_adamw_without_decay_on_norms_and_warmup_cosine_per_step():
    task = _task()
    total = 40
    optimizer, scheduler = task.build_optimizer(total)
    assert type(optimizer) is torch.optim.AdamW and isinstance(scheduler, WarmupCosineLR)
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in param_groups(task.model)[1]["params"]}
    assert any(p.dim() < 2 for p in no_decay["params"]) and all(p.dim() >= 2 for p in decay["params"])
    warmup = max(1, int(0.05 * total))
    for step in range(total + 3):  # the old LambdaLR recipe, step by step
        expected = 1e-3 * warmup_cosine(step, total, warmup, 0.01)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 2), step
        optimizer.step()
        scheduler.step()


def test_optimizer_and_scheduler_from_mappings_callables_or_none():
    spec = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}  # merged over the default's init_args
    optimizer, scheduler = _task(optimizer=spec, lr_scheduler=None).build_optimizer(10)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.param_groups[0]["weight_decay"] == 0.05
    assert scheduler is None
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}}
    step_lr = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3)
    optimizer, scheduler = _task(optimizer=sgd, lr_scheduler=step_lr).build_optimizer(10)
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["weight_decay"] == 0.0
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    configured = _task(
        lr_scheduler={"class_path": "moezoo.tasks.optim.WarmupCosineLR", "init_args": {"total_steps": 7}}
    )
    assert configured.build_optimizer(100)[1].total_steps == 7  # a length in the config wins over the trainer's


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(optimizer={"class_path": "torch.optim.Nope"}),
            ValueError,
            "optimizer.class_path must name an importable",
        ),
        (dict(optimizer={"class_path": "torch.nn.Linear"}), TypeError, "is not a torch.optim.optimizer.Optimizer"),
        (dict(optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lrr": 1}}), TypeError, "do not fit"),
        (dict(optimizer=0.001), TypeError, "optimizer must be a callable or a {class_path, init_args} mapping"),
        (dict(lr_scheduler={"class_path": "torch.optim.AdamW"}), TypeError, "is not a torch.optim.lr_scheduler"),
    ],
)
def test_bad_optimizer_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        _task(**kwargs)


def test_warmup_cosine_scheduler_checks_and_stretches_on_a_new_length():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ValueError, match=r"warmup_frac must be in \[0, 1\), got 1.0"):
        WarmupCosineLR(optimizer, warmup_frac=1.0)
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        WarmupCosineLR(optimizer, min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="total_steps must be a positive integer or None, got 0"):
        WarmupCosineLR(optimizer, total_steps=0)
    scheduler = WarmupCosineLR(optimizer, warmup_frac=0.5)
    scheduler.set_total_steps(4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # step 0 of a 2-step warmup
    assert "total_steps" not in scheduler.state_dict()  # a resumed run takes its own length


def test_step_decay_holds_then_decays_per_epoch_and_checks_its_arguments():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = StepDecayLR(optimizer, constant_epochs=2, gamma=0.5)  # LTSF-Linear's lradj="type1"
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [1.0, 1.0, 0.5, 0.25, 0.125]
    assert (interval(scheduler), interval(WarmupCosineLR(optimizer))) == ("epoch", "step")
    for kwargs, match in [
        (dict(constant_epochs=0), "constant_epochs must be an integer >= 1, got 0"),
        (dict(constant_epochs=2.5), "constant_epochs must be an integer >= 1, got 2.5"),
        (dict(gamma=0.0), r"gamma must be a number in \(0, 1\], got 0.0"),
        (dict(gamma=1.5), r"gamma must be a number in \(0, 1\], got 1.5"),
    ]:
        with pytest.raises(ValueError, match=match):
            StepDecayLR(optimizer, **kwargs)


class _Digits(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
        return DataLoader(TensorDataset(x, y), batch_size=8)


def test_fit_steps_the_schedule_per_step_and_resume_restores_it(tmp_path):
    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer = L.Trainer(max_steps=4, default_root_dir=tmp_path, **kwargs)
    trainer.fit(_task(), datamodule=_Digits())
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert (scheduler.total_steps, scheduler.last_epoch, trainer.lr_scheduler_configs[0].interval) == (4, 4, "step")
    ckpt = tmp_path / "four.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = L.Trainer(max_steps=8, default_root_dir=tmp_path, **kwargs)
    task = _task()
    resumed.fit(task, datamodule=_Digits(), ckpt_path=ckpt)
    scheduler = resumed.lr_scheduler_configs[0].scheduler
    assert (scheduler.total_steps, scheduler.last_epoch) == (8, 8)  # restored step count, the new run's length
    state = resumed.optimizers[0].state_dict()["state"]
    assert int(next(iter(state.values()))["step"]) == 8  # AdamW's moments continued, not restarted
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * warmup_cosine(8, 8, 1, 0.01))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.__name__)
def test_every_task_shows_the_base_arguments_in_the_cli(task, capsys):
    path = f"{task.__module__}.{task.__name__}"
    with pytest.raises(SystemExit):
        cli_main(["--model", path, "--print_config"], run=False)
    printed = capsys.readouterr().out
    for key in ("optimizer:", "class_path: torch.optim.AdamW", "lr_scheduler:", "WarmupCosineLR", "aux_loss_coef:"):
        assert key in printed, (key, printed)
    with pytest.raises(SystemExit):
        cli_main(["--model.help", path], run=False)
    helped = capsys.readouterr().out
    assert all(f"--model.{key} " in helped for key in ("optimizer", "lr_scheduler", "aux_loss_coef")), helped


def test_cli_overrides_reach_the_optimizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model", "moezoo.tasks.vision.ImageClassificationTask", "--model.init_args.model_kwargs", str(VIT)]
    args += ["--model.init_args.optimizer.init_args.lr", "0.05", "--model.init_args.lr_scheduler", "null"]
    args += ["--data", "moezoo.tasks.vision.DigitsDataModule", "--trainer.logger", "false"]
    cli = cli_main(args, run=False)
    assert isinstance(cli.model, MoETask) and cli.model.lr_scheduler_factory is None
    optimizer, _ = cli.model.build_optimizer(10)
    assert optimizer.defaults["lr"] == 0.05 and optimizer.param_groups[0]["weight_decay"] == 0.05


# -- another optimiser or scheduler class gets its own defaults, not the default AdamW's -------------------------
def _fit_config(tmp_path, optimizer: dict | None, lr_scheduler: object = "default") -> str:
    init = {"model": "moe_vit_debug", "model_kwargs": VIT}
    if optimizer is not None:
        init["optimizer"] = optimizer
    if lr_scheduler != "default":
        init["lr_scheduler"] = lr_scheduler
    config = {"model": {"class_path": "moezoo.tasks.vision.ImageClassificationTask", "init_args": init},
              "data": {"class_path": "moezoo.tasks.vision.DigitsDataModule"}, "trainer": {"logger": False}}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _built(args: list[str]) -> tuple[torch.optim.Optimizer, object]:
    cli = cli_main(args, run=False)
    return cli.model.build_optimizer(10)


@pytest.mark.parametrize(
    "optimizer,expected",
    [
        ({"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}, {"lr": 0.01, "weight_decay": 0.0}),
        ({"class_path": "torch.optim.Adam"}, {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999)}),
        ({"class_path": "Adam", "init_args": {"lr": 0.01}}, {"lr": 0.01, "weight_decay": 0.0}),
        ({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}, {"lr": 0.1, "weight_decay": 0.0, "momentum": 0}),
        ({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "weight_decay": 0.05}}, {"weight_decay": 0.05}),
        ({"class_path": "torch.optim.Adam", "init_args": {"weight_decay": 0.3}}, {"weight_decay": 0.3}),
        # the default's own class keeps the recipe's values for what a config leaves out
        ({"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}, {"lr": 0.01, "weight_decay": 0.05}),
        (None, {"lr": 1e-3, "weight_decay": 0.05}),
    ],
    ids=["adam", "adam-bare", "adam-short-name", "sgd", "sgd-stated-decay", "adam-stated-decay", "adamw", "default"],
)
def test_a_config_naming_another_optimizer_gets_its_own_defaults(tmp_path, monkeypatch, optimizer, expected):
    monkeypatch.chdir(tmp_path)
    built, _ = _built(["--config", _fit_config(tmp_path, optimizer)])
    name = (optimizer or {"class_path": "AdamW"})["class_path"].rsplit(".", 1)[-1]
    assert type(built).__name__ == name
    for key, value in expected.items():
        assert built.defaults[key] == value, (key, built.defaults[key])
    assert built.param_groups[0]["weight_decay"] == expected.get("weight_decay", built.defaults["weight_decay"])
    assert built.param_groups[1]["weight_decay"] == 0.0  # norms and biases: never decayed


@pytest.mark.parametrize(
    "extra",
    [
        ["--model.init_args.optimizer", "torch.optim.SGD"],
        ["--model.init_args.optimizer=torch.optim.SGD"],
        ["--model.init_args.optimizer.class_path", "torch.optim.SGD"],
        ["--model.init_args.optimizer", '{"class_path": "torch.optim.SGD"}'],
    ],
    ids=["string", "equals", "class_path", "mapping"],
)
def test_a_class_named_on_the_command_line_gets_its_own_defaults(tmp_path, monkeypatch, extra):
    monkeypatch.chdir(tmp_path)
    built, _ = _built(
        ["--config", _fit_config(tmp_path, None), *extra, "--model.init_args.optimizer.init_args.lr", "0.2"]
    )
    assert type(built) is torch.optim.SGD and built.defaults["lr"] == 0.2 and built.defaults["weight_decay"] == 0.0


def test_another_scheduler_class_gets_its_own_defaults_and_stated_values_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scheduler = {"class_path": "moezoo.tasks.optim.StepDecayLR", "init_args": {"gamma": 0.5}}
    _, built = _built(["--config", _fit_config(tmp_path, None, scheduler)])
    assert isinstance(built, StepDecayLR) and built.gamma == 0.5 and built.constant_epochs == 4


def test_own_class_defaults_and_command_line_rewriting_leave_the_rest_alone():
    adam = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}
    pinned = own_class_defaults(adam, torch.optim.Optimizer, DEFAULT_OPTIMIZER)
    assert pinned["init_args"]["lr"] == 0.01 and pinned["init_args"]["weight_decay"] == 0
    assert set(pinned["init_args"]) <= set(inspect.signature(torch.optim.AdamW).parameters)  # what could be carried
    for same in ({"class_path": "torch.optim.AdamW"}, {"class_path": "no.such.Class"}, "torch.optim.Adam", None):
        assert own_class_defaults(same, torch.optim.Optimizer, DEFAULT_OPTIMIZER) == same
    config = {"model": {"class_path": "moezoo.tasks.vision.ImageClassificationTask", "init_args": {"optimizer": adam}}}
    assert config_own_defaults(config)["model"]["init_args"]["optimizer"] == pinned
    assert config_own_defaults(adam) == pinned and config_own_defaults({"trainer": {"max_steps": 1}}) == {
        "trainer": {"max_steps": 1}
    }
    assert config_own_defaults({"class_path": "lightning.pytorch.callbacks.EarlyStopping"}) == {
        "class_path": "lightning.pytorch.callbacks.EarlyStopping"
    }
    kept = ["fit", "--print_config", "--model.init_args.lr_scheduler", "null",
            "--model.init_args.optimizer.init_args.lr", "0.1", "--data.init_args.path", "a.b",
            "--model.init_args.optimizer"]  # fmt: skip
    assert class_options_as_specs(kept) == kept
    assert class_options_as_specs(["--print_config", "--model.init_args.lr_scheduler.class_path", "StepDecayLR"]) == [
        "--print_config", "--model.init_args.lr_scheduler", '{"class_path": "StepDecayLR"}'
    ]  # fmt: skip
    assert class_options_as_specs(["--model.init_args.optimizer", "torch.optim.lr_scheduler.StepLR"]) == [
        "--model.init_args.optimizer", "torch.optim.lr_scheduler.StepLR"
    ], "not an optimiser: left to the parser's error"  # fmt: skip


def test_a_python_spec_naming_adam_gets_adams_defaults():
    spec = {"class_path": "moezoo.tasks.vision.ImageClassificationTask",
            "init_args": {"model": "moe_vit_debug", "model_kwargs": VIT,
                          "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}}}  # fmt: skip
    assert complete_task_spec(spec)["init_args"]["optimizer"]["init_args"]["weight_decay"] == 0.0
    built, _ = instantiate_task(spec).build_optimizer(10)
    assert type(built) is torch.optim.Adam and built.defaults["weight_decay"] == 0.0
    direct = ImageClassificationTask("moe_vit_debug", VIT, optimizer=spec["init_args"]["optimizer"])
    assert direct.build_optimizer(10)[0].defaults["weight_decay"] == 0.0
