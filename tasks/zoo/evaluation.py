"""``moezoo zoo eval``: rerun a release's evaluation (its task on its data's test split, with its weights) and
compare the metrics with the registered ones within the registered tolerance."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from moezoo.models import hub
from moezoo.models.pretrained_cfg import DEFAULT_TOLERANCE, PretrainedCfg
from moezoo.tasks.specs import instantiate_task
from moezoo.tasks.zoo.specs import instantiate


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _routing_stats(task: Any) -> dict[str, Any]:
    """The test split's per-layer routing (the task's :class:`~moezoo.stats.RoutingStats`) in the record's form."""
    summary = getattr(task, "routing_summary", None)
    if not summary:
        return {}
    layers = [
        {
            "layer": layer.layer,
            "expert_share": [round(float(s), 6) for s in layer.expert_load],
            "load_cv": round(layer.load_cv, 6),
            "dropped_frac": round(layer.dropped_frac, 6),
            "router_entropy": round(layer.router_entropy, 6),
        }
        for layer in summary.layers()
    ]
    return {"split": "test", "layers": layers}


def load_release_weights(task: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a release's model weights into ``task`` (through its ``load_release_weights`` when it has one, e.g. the
    DiT task, which also fills its EMA copy)."""
    loader = getattr(task, "load_release_weights", None)
    if loader is None:
        task.model.load_state_dict(state, strict=True)
    else:
        loader(state)


def run_evaluation(
    cfg: PretrainedCfg, model: nn.Module | None = None, offline: bool | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Test-split metrics and routing statistics of ``cfg``'s task on ``cfg``'s data with its released weights.

    ``model`` (already holding weights) replaces the download; used by ``release`` before the files exist.
    """
    if not cfg.task or not cfg.data:
        raise ValueError(f"{cfg.file}: this release registers no task/data, so it cannot be evaluated")
    _quiet_lightning()
    L.seed_everything(0, verbose=False)
    task = instantiate_task(cfg.task)
    # The task loads them: it may keep another copy (the DiT task's EMA).
    state = (
        model.state_dict()
        if model is not None
        else hub.load_state_dict(hub.fetch(cfg, offline=offline, progress=False))
    )
    load_release_weights(task, state)
    return evaluate_task(task, instantiate(cfg.data)), _routing_stats(task)


def evaluate_task(task: L.LightningModule, data: L.LightningDataModule) -> dict[str, float]:
    """``task``'s test-split metrics on ``data`` (one CPU device, no logger; rounded to 6 decimals)."""
    _quiet_lightning()
    # Whatever a task writes beside its metrics (forecast plots, sample grids) goes to a scratch folder, not the cwd.
    with tempfile.TemporaryDirectory(prefix="moezoo-eval-") as scratch:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            default_root_dir=scratch,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        results = trainer.test(task, datamodule=data, verbose=False)
    return {k: round(float(v), 6) for k, v in results[0].items()}


def compare(expected: Mapping[str, float], got: Mapping[str, float], tolerance: Mapping[str, float]) -> list[str]:
    """Lines ``metric expected got |diff| tol ok/FAIL``; a metric missing from ``got`` fails."""
    lines = []
    for metric, value in sorted(expected.items()):
        tol = tolerance.get(metric, DEFAULT_TOLERANCE)
        new = got.get(metric)
        if new is None:
            lines.append(f"{metric:28s} {value:12.6f} {'missing':>12s} {'':>10s} {tol:8.1e} FAIL")
            continue
        diff = abs(new - value)
        ok = diff <= tol and math.isfinite(new)
        lines.append(f"{metric:28s} {value:12.6f} {new:12.6f} {diff:10.2e} {tol:8.1e} {'ok' if ok else 'FAIL'}")
    return lines
