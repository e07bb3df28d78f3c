"""Image classification with ``moe_vit`` (or any registered classifier with ``forward_with_aux``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.layers import MoEAux
from moezoo.layers.routers_extra import thor_consistency_loss
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


def _mean_aux(a: MoEAux, b: MoEAux) -> MoEAux:
    """One MoE layer's aux result of two passes of the same batch: losses and statistics averaged (so the task adds
    and logs them at the weight of one pass); the first pass's routing and state are kept."""
    return replace(
        a,
        losses={name: 0.5 * (a.losses[name] + b.losses[name]) for name in a.losses},
        tokens_per_expert_E=0.5 * (a.tokens_per_expert_E + b.tokens_per_expert_E),
        dropped_frac=0.5 * (a.dropped_frac + b.dropped_frac),
        router_entropy=0.5 * (a.router_entropy + b.router_entropy),
        expert_load_cv=0.5 * (a.expert_load_cv + b.expert_load_cv),
    )


class ImageClassificationTask(NamedClasses, MoETask):
    """Cross-entropy classification; logs ``<stage>/acc`` and the MoE statistics.

    Args:
        label_smoothing: cross-entropy label smoothing.
        consistency_coef: when > 0, every training step runs the model twice on the same batch and trains on the
            mean of the two passes' cross-entropies plus ``consistency_coef`` times the symmetric KL between their
            predictive distributions (:func:`~moezoo.layers.routers_extra.thor_consistency_loss`), logged as
            ``train/consistency``; the two passes' MoE aux losses and statistics are averaged too. This is THOR's
            consistency-regularised loss (Zuo et al. 2022; the passes differ by the ``thor`` router's random
            experts) and, for any model with dropout or another random layer, R-Drop (Liang et al. 2021): it is
            allowed for every model, and a model whose training forward is deterministic gets a consistency term of
            0 at twice the cost. Costs two forward and backward passes per step; validation and test run once.
            THOR's released IWSLT'14 script weights it 5.0 against the *sum* of the two cross-entropies, the same
            balance as 2.5 here. ``0`` (the default): one forward pass, the plain cross-entropy.
        model, model_kwargs, **kwargs (``optimizer``, ``lr_scheduler``, ``aux_loss_coef``): as in
            :class:`moezoo.tasks.base.MoETask`.
    """

    def __init__(
        self,
        model: str = "moe_vit_debug",
        model_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        consistency_coef: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, model_kwargs, **kwargs)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if isinstance(consistency_coef, bool) or not isinstance(consistency_coef, (int, float)):
            raise TypeError(f"consistency_coef must be a number >= 0, got {consistency_coef!r}")
        if not 0 <= consistency_coef < float("inf"):
            raise ValueError(
                f"consistency_coef must be a finite number >= 0 (0 turns the two-pass consistency loss off), "
                f"got {consistency_coef}"
            )
        self.label_smoothing = label_smoothing
        self.consistency_coef = float(consistency_coef)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def compute_loss(self, batch: Any, stage: str) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        x, y = batch
        num_classes = self.model.num_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"class ids must be in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        if stage == "train" and self.consistency_coef > 0:
            return self._consistency_loss(x, y)
        logits, auxes = self.model.forward_with_aux(x)
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, auxes, {"acc": acc}, x.shape[0]

    def _consistency_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        """Two forward passes of the same batch (``consistency_coef``): the mean cross-entropy plus the weighted
        symmetric KL between the passes, the passes' aux results averaged layer by layer."""
        logits_1, auxes_1 = self.model.forward_with_aux(x)
        logits_2, auxes_2 = self.model.forward_with_aux(x)
        ce_1 = F.cross_entropy(logits_1, y, label_smoothing=self.label_smoothing)
        ce_2 = F.cross_entropy(logits_2, y, label_smoothing=self.label_smoothing)
        consistency = thor_consistency_loss(logits_1, logits_2)
        loss = 0.5 * (ce_1 + ce_2) + self.consistency_coef * consistency
        acc = 0.5 * ((logits_1.argmax(-1) == y).float().mean() + (logits_2.argmax(-1) == y).float().mean())
        assert len(auxes_1) == len(auxes_2), "the same model reported a different number of MoE layers"
        auxes = [_mean_aux(a, b) for a, b in zip(auxes_1, auxes_2)]
        return loss, auxes, {"acc": acc, "consistency": consistency.detach()}, x.shape[0]

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
