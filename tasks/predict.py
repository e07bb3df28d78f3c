"""``moezoo predict``: one writer for every task, and the helpers tasks use to describe their predictions.

:class:`PredictionWriter` (a Lightning ``BasePredictionWriter``, added to every run by
``MoETask.configure_callbacks``) collects, for each predict batch, the rows the task makes of its
``predict_step`` output (``task.prediction_rows(prediction, batch)``: one dict per item) and at the end of the
predict epoch asks the task to write them (``task.write_predictions(rows, out_dir)``, default
``predictions.jsonl``) under ``<log dir>/predictions/`` (beside the logs), every file through :mod:`moezoo.io`,
then prints the task's short summary (``task.prediction_summary(rows)``) and the paths written.

Under DDP each process predicts its share of the items; rank 0 writes the rows it predicted (gather the ranks'
rows before relying on multi-process predict).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from moezoo.io import write_text_atomic
from moezoo.layers import MoEAux
from moezoo.stats import TokenGroups

__all__ = [
    "as_list",
    "PredictionWriter",
    "class_counts_summary",
    "top_expert_per_sample",
    "write_csv_atomic",
    "write_jsonl_atomic",
]


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object a line, written atomically."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_csv_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """A CSV with a header of the first row's keys, written atomically."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


@torch.no_grad()
def top_expert_per_sample(auxes: Sequence[MoEAux], batch_size: int) -> list[list[int]]:
    """``[sample][layer]``: the expert that received the largest total gate weight from the sample's tokens in each
    MoE layer (its "top-1 expert" in that layer); ``-1`` where a layer's tokens do not map onto the samples, where
    the layer reports no routing pairs (Soft MoE), or where none of the sample's tokens was routed (dropped)."""
    out = torch.full((batch_size, len(auxes)), -1, dtype=torch.long)
    samples = TokenGroups(torch.arange(batch_size), tuple(str(i) for i in range(batch_size)), "sample")
    for layer, aux in enumerate(auxes):
        routing = aux.routing
        if routing is None:
            continue
        sample_T = samples.of_tokens(routing.num_tokens)
        if sample_T is None:
            continue
        sample_N = sample_T[routing.token_idx_N.detach().cpu()]
        weight_BE = torch.zeros(batch_size, routing.num_experts, dtype=torch.float64)
        flat_N = sample_N * routing.num_experts + routing.expert_idx_N.detach().cpu()
        weight_BE.view(-1).index_add_(0, flat_N, routing.gate_N.detach().cpu().double())
        routed_B = weight_BE.sum(-1) > 0
        out[:, layer] = torch.where(routed_B, weight_BE.argmax(-1), -1)
    return out.tolist()


def class_counts_summary(labels: Iterable[str], what: str = "predicted") -> str:
    """``"<what>: cat x3, dog x1"`` (most frequent first)."""
    counts = Counter(labels)
    return f"{what}: " + ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def as_list(value: Any) -> list[Any]:
    """A batch field (tensor, list or tuple) as a Python list of per-item values."""
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    return list(value)


class PredictionWriter(BasePredictionWriter):
    """Collect the task's rows per predict batch; at the end write them under ``<log dir>/<dirname>/``.

    ``written`` holds the paths of the last predict run; ``rows`` its rows (each with its ``index`` in the order
    the predict loader gave the items).
    """

    def __init__(self, dirname: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.dirname = dirname
        self.rows: list[dict[str, Any]] = []
        self.written: list[Path] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        make_rows = getattr(pl_module, "prediction_rows", None)
        if not callable(make_rows):
            return
        for row in make_rows(prediction, batch):
            self.rows.append({"index": len(self.rows), **row})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from moezoo.tasks.callbacks import log_dir_of

        out_dir = log_dir_of(trainer) / self.dirname  # a collective under DDP: on every rank
        if not trainer.is_global_zero:
            return
        write = getattr(pl_module, "write_predictions", None)
        self.written = list(write(self.rows, out_dir)) if callable(write) else []
        summarize = getattr(pl_module, "prediction_summary", None)
        summary = summarize(self.rows) if callable(summarize) else f"{len(self.rows)} predictions"
        lines = [f"\nPredictions ({type(pl_module).__name__}): {summary}"]
        lines += [f"  wrote {path}" for path in self.written]
        print("\n".join(lines))
