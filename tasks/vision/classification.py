"""Image classification with ``moe_vit`` (or any registered classifier with ``forward_with_aux``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.layers import MoEAux
from moezoo.stats import TokenGroups
from moezoo.tasks.base import MoETask
from moezoo.tasks.vision.data import FASHION_MNIST_CLASSES, FashionMNISTDataModule


def class_names(datamodule: Any, num_classes: int) -> tuple[str, ...]:
    """The data's class names (``class_names``; Fashion-MNIST's own), else ``"0"``, ``"1"`` ..."""
    names = getattr(datamodule, "class_names", None)
    if names is None and isinstance(datamodule, FashionMNISTDataModule):
        names = FASHION_MNIST_CLASSES
    if names is None or len(names) != num_classes:
        names = tuple(str(i) for i in range(num_classes))
    return tuple(names)


class ImageClassificationTask(MoETask):
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
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return TokenGroups(batch[1], class_names(datamodule, self.model.num_classes), "class")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = torch.softmax(self.model(x), dim=-1)
        return {"pred": probs.argmax(-1), "prob": probs.max(-1).values}
