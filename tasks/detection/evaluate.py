"""COCO evaluation (``pycocotools``): mAP@[.5:.95], mAP50 and AR100, overall and per domain."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch
from torch import Tensor

METRICS = ("mAP", "mAP50", "AR100")


def coco_evaluate(
    predictions: Sequence[dict[str, Tensor]], ground_truths: Sequence[dict[str, Tensor]], num_classes: int
) -> dict[str, float]:
    """COCO metrics of per-image predictions (``boxes`` xyxy, ``scores``, ``labels``) against ground truths
    (``boxes``, ``labels``). Returns an empty dict when there is no ground-truth box to evaluate against."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} ground-truth images")
    images: list[dict] = []
    annotations: list[dict] = []
    detections: list[dict] = []
    for image_id, (pred, gt) in enumerate(zip(predictions, ground_truths)):
        images.append({"id": image_id})
        for box, label in zip(gt["boxes"].tolist(), gt["labels"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            if not 0 <= label < num_classes:
                raise ValueError(f"ground-truth label {label} of image {image_id}; allowed are 0..{num_classes - 1}")
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                 "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            detections.append(
                {"image_id": image_id, "category_id": int(label), "score": float(score),
                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
            )  # fmt: skip
    if not annotations:
        return {}
    gt_coco = COCO()
    gt_coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c} for c in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco.createIndex()
        dt_coco = gt_coco.loadRes(detections) if detections else COCO()
        if not detections:
            return {name: 0.0 for name in METRICS}
        evaluator = COCOeval(gt_coco, dt_coco, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"mAP": float(stats[0]), "mAP50": float(stats[1]), "AR100": float(stats[8])}


class DetectionEvaluator:
    """Collects predictions, ground truths and routing weights of an epoch; reports COCO metrics per domain and the
    mean routing weights per domain."""

    def __init__(self, num_classes: int, domain_names: Sequence[str]) -> None:
        self.num_classes = num_classes
        self.domain_names = tuple(domain_names)
        self.reset()

    def reset(self) -> None:
        self.preds: list[dict[str, Tensor]] = []
        self.gts: list[dict[str, Tensor]] = []
        self.domains: list[int] = []
        self.routing: list[Tensor] = []

    def update(
        self,
        preds: Sequence[dict[str, Tensor]],
        targets_M6: Tensor,
        domains_B: Tensor,
        routing_BSN: Tensor | None = None,
    ) -> None:
        targets = targets_M6.detach().cpu()
        for i, pred in enumerate(preds):
            rows = targets[targets[:, 0] == i]
            self.gts.append({"boxes": rows[:, 2:6], "labels": rows[:, 1].long()})
            self.preds.append({k: v.detach().cpu() for k, v in pred.items()})
        self.domains.extend(int(d) for d in domains_B.tolist())
        if routing_BSN is not None:
            self.routing.append(routing_BSN.detach().float().cpu())

    def compute(self) -> dict[str, float]:
        """``mAP``, ``mAP50``, ``AR100`` overall, ``<metric>_<domain>`` per domain (when more than one domain)."""
        out = coco_evaluate(self.preds, self.gts, self.num_classes)
        if len(self.domain_names) > 1:
            for d, name in enumerate(self.domain_names):
                idx = [i for i, dom in enumerate(self.domains) if dom == d]
                if idx:
                    sub = coco_evaluate([self.preds[i] for i in idx], [self.gts[i] for i in idx], self.num_classes)
                    out.update({f"{k}_{name}": v for k, v in sub.items()})
        return out

    def routing_by_domain(self) -> dict[str, Tensor]:
        """Mean routing weights ``(S, N)`` per domain (empty without a router)."""
        if not self.routing:
            return {}
        weights = torch.cat(self.routing)
        domains = torch.tensor(self.domains[: len(weights)])
        names = self.domain_names
        return {name: weights[domains == d].mean(0) for d, name in enumerate(names) if bool((domains == d).any())}
