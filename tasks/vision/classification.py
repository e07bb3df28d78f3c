"""Image classification with ``moe_vit`` (or any registered classifier with ``forward_with_aux``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.layers import MoEAux
from moezoo.stats import TokenGroups
from moezoo.tasks.base import MoETask
from moezoo.tasks.class_names import NamedClasses
from moezoo.tasks.predict import (
    as_list,
    class_counts_summary,
    top_expert_per_sample,
    write_csv_atomic,
    write_jsonl_atomic,
)


class ImageClassificationTask(NamedClasses, MoETask):
    """Cross-entropy classification; logs ``<stage>/acc`` and the MoE statistics.

    Args:
        label_smoothing: cross-entropy label smoothing.
        model, model_kwargs, **kwargs (``optimizer``, ``lr_scheduler``, ``aux_loss_coef``): as in
            :class:`moezoo.tasks.base.MoETask`.
    """

    def __init__(
        self,
        model: str = "moe_vit_debug",
        model_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, model_kwargs, **kwargs)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def compute_loss(self, batch: Any, stage: str) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        x, y = batch
        num_classes = self.model.num_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"class ids must be in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        logits, auxes = self.model.forward_with_aux(x)
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, auxes, {"acc": acc}, x.shape[0]

    def routing_groups(self, batch: Any) -> TokenGroups:
        """Routing shares per class: every token of an image counts for the image's class."""
        return TokenGroups(batch[1], self.class_names(), "class")

    # -- predict -----------------------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Class probabilities and, per MoE layer, each image's top-1 expert (the expert that received the
        largest total gate weight from the image's tokens; ``-1`` where the layer routed none of them).

        ``batch``: ``(images, names)`` from a ``predict_path``, ``(images, labels)`` from a split, or images.
        """
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits, auxes = self.model.forward_with_aux(x)
        out: dict[str, Any] = {
            "probs": torch.softmax(logits.float(), dim=-1),
            "experts": top_expert_per_sample(auxes, x.shape[0]),
        }
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            key = "label" if isinstance(batch[1], Tensor) else "file"
            out[key] = as_list(batch[1])
        return out

    def prediction_rows(self, prediction: Any, batch: Any) -> list[dict[str, Any]]:
        """Per image: ``file`` (or the true ``label`` for a split), ``class``, ``class_id``, ``prob``, ``top5``
        (``[{"class", "prob"}]``, best first) and ``experts`` (top-1 expert per MoE layer)."""
        names = self.class_names()
        probs = prediction["probs"].detach().cpu()
        top_p, top_i = probs.topk(min(5, probs.shape[-1]), dim=-1)
        rows = []
        for i in range(probs.shape[0]):
            row: dict[str, Any] = {}
            if "file" in prediction:
                row["file"] = prediction["file"][i]
            if "label" in prediction:
                row["label"] = names[prediction["label"][i]]
            best = int(top_i[i, 0])
            row.update(class_id=best, **{"class": names[best]}, prob=round(float(top_p[i, 0]), 6))
            row["top5"] = [{"class": names[int(c)], "prob": round(float(p), 6)} for p, c in zip(top_p[i], top_i[i])]
            row["experts"] = prediction["experts"][i]
            rows.append(row)
        return rows

    def write_predictions(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """``predictions.jsonl`` (every field) and ``predictions.csv`` (file, class, probability, experts)."""
        flat = [
            {
                "file": row.get("file", row["index"]),
                "class": row["class"],
                "prob": row["prob"],
                **({"label": row["label"]} if "label" in row else {}),
                "experts": " ".join(str(e) for e in row["experts"]),
            }
            for row in rows
        ]
        return [
            write_jsonl_atomic(out_dir / "predictions.jsonl", rows),
            write_csv_atomic(out_dir / "predictions.csv", flat),
        ]

    def prediction_summary(self, rows: list[dict[str, Any]]) -> str:
        lines = [f"{len(rows)} images; " + class_counts_summary(row["class"] for row in rows)]
        for row in rows[:5]:
            top = ", ".join(f"{t['class']} {t['prob']:.2f}" for t in row["top5"][:3])
            lines.append(f"  {row.get('file', row['index'])}: {top}; experts per MoE layer {row['experts']}")
        if len(rows) > 5:
            lines.append(f"  ... ({len(rows) - 5} more in the files)")
        return "\n".join(lines)
