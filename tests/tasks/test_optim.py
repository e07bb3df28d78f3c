"""Tasks take LightningCLI optimizer / lr-scheduler callables; the default is the recipe they always trained with."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from moezoo.tasks.base import MoETask
from moezoo.tasks.cli import cli_main
from moezoo.tasks.detection import DetectionTask
from moezoo.tasks.generation import ImageGenerationTask
from moezoo.tasks.optim import StepDecayLR, WarmupCosineLR, interval, param_groups, warmup_cosine
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
