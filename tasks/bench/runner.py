"""One benchmark run: ``moezoo fit --config CONFIG --seed_everything SEED OVERRIDES...`` in this process, exactly as
the command line runs it (fit, then the test of the best checkpoint), and what the run wrote:

- the test metrics (``<log dir>/test_metrics.json``, written by the CLI after fit);
- the routing statistics of the test split (the file :class:`~moezoo.tasks.callbacks.RoutingAnalytics` wrote);
- the training throughput (:class:`~moezoo.tasks.callbacks.ThroughputMonitor`'s meter);
- parameter counts (:func:`moezoo.stats.count_parameters`) and, when the benchmark asks, the inference
  throughput (:func:`moezoo.stats.median_rates` over test batches) and its own extras (e.g. an extra test set).

Throughputs are kept per wall second and per CPU second of the process (``*_cpu_throughput``); the tables show the
CPU figures, which a busy shared machine disturbs far less (a benchmark runs at one torch thread).
"""

from __future__ import annotations

import gc
import json
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from moezoo.stats import count_parameters, median_rates
from moezoo.tasks.callbacks import RoutingAnalytics, ThroughputMonitor, log_dir_of

ROOT = Path(__file__).resolve().parents[2]  # the source checkout, whose configs/ the benchmarks run
#: the routing-summary keys a run keeps (the whole summary stays in the file the callback wrote)
ROUTING_KEYS = ("expert_load_cv", "dropped_frac", "router_entropy", "expert_load", "specialisation")

Forward = Callable[[L.LightningModule, Any], int]  # runs a model on one test batch, returns the samples in it
Extras = Callable[[Any], dict[str, Any]]  # the finished LightningCLI -> extra numbers of a run
Rates = tuple[float, float]  # items per wall second, items per CPU second
Infer = Callable[[L.LightningModule, L.LightningDataModule], Rates | None]  # a run's inference throughput


@dataclass(frozen=True)
class RunSpec:
    """What one run is: a config, a seed and the ``moezoo fit`` overrides of the benchmark's budget."""

    variant: str
    seed: int
    config: str  # relative to the checkout (as the README names it) or absolute
    overrides: tuple[str, ...] = ()
    cell: str = ""

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.variant, self.seed, self.cell)

    def fit_args(self, root: Path, config_root: Path = ROOT) -> list[str]:
        """The CLI arguments; ``root`` (where checkpoints and logs go) comes last, so it wins."""
        return ["fit", "--config", str(config_root / self.config), "--seed_everything", str(self.seed),
                *self.overrides, "--trainer.default_root_dir", str(root)]  # fmt: skip

    def command(self) -> str:
        """The command that reproduces this run's numbers from the checkout (the output folder aside)."""
        return shlex.join(["moezoo", *self.fit_args(Path("."), Path("."))[:-2]])


def merge_overrides(*groups: Sequence[str]) -> tuple[str, ...]:
    """``--key value`` (or ``--key=value``) pairs of several groups, a later value of a key replacing the earlier
    one in place: ``("--a", "1", "--b", "2"), ("--a", "3")`` -> ``("--a", "3", "--b", "2")``."""
    merged: dict[str, str] = {}
    for group in groups:
        tokens = list(group)
        i = 0
        while i < len(tokens):
            key = tokens[i]
            if not key.startswith("--"):
                raise ValueError(f"expected a --key in the fit overrides {tokens}, got {key!r}")
            if "=" in key:
                key, value = key.split("=", 1)
                i += 1
            elif i + 1 < len(tokens):
                value, i = tokens[i + 1], i + 2
            else:
                raise ValueError(f"the fit override {key} has no value")
            merged[key] = value
    return tuple(token for pair in merged.items() for token in pair)


def first_batches(loader: Iterable[Any], max_samples: int, size: Callable[[Any], int]) -> list[Any]:
    """The first batches of ``loader`` holding at least ``max_samples`` samples (fewer if it runs out)."""
    batches, samples = [], 0
    for batch in loader:
        if batch is None:
            continue
        batches.append(batch)
        samples += size(batch)
        if samples >= max_samples:
            break
    return batches


def inference_throughput(task: L.LightningModule, batches: Sequence[Any], forward: Forward) -> Rates | None:
    """Median samples per wall and per CPU second of ``forward`` over ``batches`` in eval mode, without gradients."""
    import torch

    if not batches:
        return None
    was_training = task.training
    task.eval()
    with torch.no_grad():
        rates = median_rates(lambda: sum(forward(task, batch) for batch in batches))
    task.train(was_training)
    return rates


def test_set_throughput(max_samples: int, forward: Forward, size: Callable[[Any], int]) -> Infer:
    """A benchmark's inference measurement: :func:`inference_throughput` of ``forward`` over the first test batches
    holding ``max_samples`` samples (``size(batch)`` counts a batch's samples)."""

    def infer(task: L.LightningModule, datamodule: L.LightningDataModule) -> Rates | None:
        return inference_throughput(task, first_batches(datamodule.test_dataloader(), max_samples, size), forward)

    return infer


def leading_size(batch: Any) -> int:
    """Samples in an ``(inputs, targets)`` batch."""
    return int(batch[0].shape[0])


def leading_forward(task: L.LightningModule, batch: Any) -> int:
    """``task(inputs)`` of an ``(inputs, targets)`` batch; the samples in it."""
    task(batch[0])
    return leading_size(batch)


def execute(
    spec: RunSpec,
    root: Path,
    infer: Infer | None = None,
    extras: Extras | None = None,
) -> dict[str, Any]:
    """Fit and test ``spec`` with its files under ``root``; the run's record (JSON-able)."""
    from moezoo.tasks.cli import cli_main

    start = time.perf_counter()
    cli = cli_main(spec.fit_args(root))
    trainer, task = cli.trainer, cli.model
    log_dir = log_dir_of(trainer)
    metrics_path = log_dir / "test_metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(f"{spec.command()} wrote no {metrics_path}: did fit stop early or skip its test?")
    metrics = json.loads(metrics_path.read_text())
    analytics = next(c for c in trainer.callbacks if isinstance(c, RoutingAnalytics))
    routing_file = analytics.written.get("test")
    routing = None
    if routing_file is not None:
        summary = json.loads(routing_file.read_text())
        routing = {"file": str(routing_file), **{k: summary[k] for k in ROUTING_KEYS}}
    meter = next(c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)).meter
    record: dict[str, Any] = {
        "variant": spec.variant, "seed": spec.seed, "cell": spec.cell, "config": spec.config,
        "overrides": list(spec.overrides), "command": spec.command(), "log_dir": str(log_dir),
        "model": str(getattr(task, "model_name", type(task).__name__)), "global_step": trainer.global_step,
        "metrics": metrics, "routing": routing,
        "params": count_parameters(getattr(task, "model", task)).as_dict(),
        "train_throughput": meter.wall_rate, "train_cpu_throughput": meter.cpu_rate,
    }  # fmt: skip
    rates = infer(task, cli.datamodule) if infer is not None else None
    record["infer_throughput"], record["infer_cpu_throughput"] = rates if rates is not None else (None, None)
    record["extra"] = extras(cli) if extras is not None else {}
    record["wall_s"] = time.perf_counter() - start
    del cli, trainer, task
    gc.collect()
    return record
