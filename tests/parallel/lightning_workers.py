"""Lightning runs of the smoke config, for the spawned ranks of ``test_lightning.py`` and for the parent."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from tests.parallel.dist_utils import dist_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "smoke" / "parallel_digits_moe_vit_ep.yaml"
GLOBAL_BATCH = 32
STEPS = 6


def probe_inputs(rank: int) -> torch.Tensor:
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(50 + rank))


class Recorder(L.Callback):
    """Per-step training losses, and the model's outputs on fixed inputs at the start and end of training."""

    def __init__(self, ranks: tuple[int, ...]) -> None:
        self.ranks = ranks  # whose probe inputs to run (a rank of a multi-process run: its own)
        self.losses: list[float] = []
        self.outputs: dict[str, dict[int, torch.Tensor]] = {}

    def _probe(self, pl_module: L.LightningModule, when: str) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.outputs[when] = {r: pl_module(probe_inputs(r)).detach().clone() for r in self.ranks}
        pl_module.train(was_training)

    def on_train_start(self, trainer, pl_module):
        self._probe(pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self._probe(pl_module, "end")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def fit_args(root: Path, devices: int, steps: int, strategy: str | None = None) -> list[str]:
    args = ["--config", str(CONFIG), "--trainer.default_root_dir", str(root), "--trainer.logger", "false"]
    args += ["--trainer.devices", str(devices), "--data.init_args.batch_size", str(GLOBAL_BATCH // devices)]
    args += ["--trainer.overfit_batches", "1", "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1"]
    args += ["--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "0"]
    return args + (["--trainer.strategy", strategy] if strategy else [])


def fit(args: list[str], ranks: tuple[int, ...], ckpt_path: str | None = None) -> Recorder:
    from moezoo.tasks.cli import cli_main

    cli = cli_main(args, run=False)
    recorder = Recorder(ranks)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return recorder


def fit_worker(rank: int, world: int, port: int, out_dir: str, one_process_ckpt: str) -> None:
    """2-process DDP + EP: fit from scratch, then resume from the 1-process checkpoint for two more steps."""
    dist_env(rank, world, port)
    torch.set_num_threads(1)
    out = Path(out_dir)
    scratch = fit(fit_args(out / "two", world, STEPS), (rank,))
    resumed = fit(fit_args(out / "two_resumed", world, STEPS + 2), (rank,), ckpt_path=one_process_ckpt)
    torch.save(
        dict(losses=scratch.losses, outputs=scratch.outputs, resumed_losses=resumed.losses, resumed=resumed.outputs),
        out / f"rank{rank}.pt",
    )
