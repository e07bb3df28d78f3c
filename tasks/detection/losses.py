"""Task-aligned assignment (TOOD) and the YOLO detection loss: BCE classification + CIoU + distribution focal loss.

Legend: B images, A anchor points (all scales), M ground-truth boxes per image (padded), C classes,
R ``reg_max`` bins per box side. Boxes are ``xyxy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.models.yolo_boxes import bbox2dist, box_ciou_pairwise, box_iou_pairwise, dfl_decode, dist2bbox, make_anchors


@torch.no_grad()
def task_aligned_assign(
    scores_BAC: Tensor,
    pred_boxes_BA4: Tensor,
    points_A2: Tensor,
    gt_labels_BM: Tensor,
    gt_boxes_BM4: Tensor,
    gt_mask_BM: Tensor,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Task-aligned assignment: each ground truth takes the ``topk`` anchors inside it with the largest
    ``score^alpha * IoU^beta``; an anchor claimed by several takes the one it overlaps most.

    Returns target labels ``(B, A)``, target boxes ``(B, A, 4)``, soft class targets ``(B, A, C)`` (the
    alignment metric normalised so each ground truth's best anchor gets its best IoU) and the foreground mask.
    """
    b, a, c = scores_BAC.shape
    m = gt_boxes_BM4.shape[1]
    device = scores_BAC.device
    if m == 0:
        return (
            torch.zeros(b, a, dtype=torch.long, device=device),
            torch.zeros(b, a, 4, device=device),
            torch.zeros(b, a, c, device=device),
            torch.zeros(b, a, dtype=torch.bool, device=device),
        )
    x1y1, x2y2 = gt_boxes_BM4[..., None, :2], gt_boxes_BM4[..., None, 2:]
    deltas = torch.cat([points_A2 - x1y1, x2y2 - points_A2], -1)  # (B, M, A, 4)
    in_gt_BMA = (deltas.amin(-1) > eps) & gt_mask_BM[..., None]
    iou_BMA = box_iou_pairwise(gt_boxes_BM4[:, :, None, :], pred_boxes_BA4[:, None, :, :]).clamp_min(0)
    iou_BMA = iou_BMA * in_gt_BMA
    labels = gt_labels_BM.clamp(0, c - 1)
    score_BMA = scores_BAC.gather(2, labels[:, None, :].expand(b, a, m)).transpose(1, 2)
    metric_BMA = score_BMA.pow(alpha) * iou_BMA.pow(beta) * in_gt_BMA
    k = min(topk, a)
    top_idx = metric_BMA.topk(k, -1).indices
    top_BMA = torch.zeros_like(in_gt_BMA).scatter(-1, top_idx, True)
    pos_BMA = top_BMA & in_gt_BMA
    multi_A = pos_BMA.sum(1, keepdim=True) > 1
    if bool(multi_A.any()):
        best_gt = iou_BMA.argmax(1, keepdim=True)
        only_best = torch.zeros_like(pos_BMA).scatter(1, best_gt, True)
        pos_BMA = torch.where(multi_A, only_best & pos_BMA.any(1, keepdim=True), pos_BMA)
    fg_BA = pos_BMA.any(1)
    gt_idx_BA = pos_BMA.float().argmax(1)
    tgt_labels = labels.gather(1, gt_idx_BA)
    tgt_boxes = gt_boxes_BM4.gather(1, gt_idx_BA[..., None].expand(b, a, 4))
    metric_BMA = metric_BMA * pos_BMA
    best_metric_BM = metric_BMA.amax(-1, keepdim=True)
    best_iou_BM = (iou_BMA * pos_BMA).amax(-1, keepdim=True)
    norm_BA = (metric_BMA * best_iou_BM / (best_metric_BM + eps)).amax(1)
    tgt_scores = F.one_hot(tgt_labels, c).float() * (norm_BA * fg_BA)[..., None]
    return tgt_labels, tgt_boxes, tgt_scores, fg_BA


def distribution_focal_loss(dist_logits_NR: Tensor, target_N: Tensor) -> Tensor:
    """DFL (GFL, Li et al. 2020): cross-entropy towards the two bins around a continuous target, per row."""
    left = target_N.long()
    right = left + 1
    w_left = right.float() - target_N
    w_right = 1.0 - w_left
    return (
        F.cross_entropy(dist_logits_NR, left, reduction="none") * w_left
        + F.cross_entropy(dist_logits_NR, right, reduction="none") * w_right
    )


def targets_to_padded(targets_M6: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``[image_idx, class, x1, y1, x2, y2]`` -> labels ``(B, M)``, boxes ``(B, M, 4)``, mask ``(B, M)``."""
    device = targets_M6.device
    if targets_M6.numel() == 0:
        return (
            torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            torch.zeros(batch_size, 0, 4, device=device),
            torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
        )
    img = targets_M6[:, 0].long()
    counts = torch.bincount(img, minlength=batch_size)
    m = int(counts.max())
    order = torch.argsort(img, stable=True)
    img_sorted = img[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(img), device=device) - starts[img_sorted]
    labels = torch.zeros(batch_size, m, dtype=torch.long, device=device)
    boxes = torch.zeros(batch_size, m, 4, device=device)
    mask = torch.zeros(batch_size, m, dtype=torch.bool, device=device)
    labels[img_sorted, slot] = targets_M6[order, 1].long()
    boxes[img_sorted, slot] = targets_M6[order, 2:6].float()
    mask[img_sorted, slot] = True
    return labels, boxes, mask


class DetectionLoss:
    """The YOLOv8-style loss on raw per-scale maps ``(B, 4R + C, H, W)``.

    ``box_gain * CIoU + cls_gain * BCE + dfl_gain * DFL``, each normalised by the sum of the soft class targets.
    """

    def __init__(
        self,
        num_classes: int,
        reg_max: int,
        strides: Sequence[int],
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
    ) -> None:
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.box_gain, self.cls_gain, self.dfl_gain = box_gain, cls_gain, dfl_gain
        self.topk, self.alpha, self.beta = topk, alpha, beta

    def __call__(self, preds: Sequence[Tensor], targets_M6: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b = preds[0].shape[0]
        flat = torch.cat([p.flatten(2) for p in preds], 2).transpose(1, 2).float()
        dist_logits, cls_logits = flat.split([4 * self.reg_max, self.num_classes], -1)
        points, stride = make_anchors([(p.shape[2], p.shape[3]) for p in preds], self.strides, flat.device)
        pred_boxes = dist2bbox(dfl_decode(dist_logits, self.reg_max), points)  # grid units
        if targets_M6.numel() and int(targets_M6[:, 1].max()) >= self.num_classes:
            raise ValueError(
                f"targets hold class id {int(targets_M6[:, 1].max())}; allowed are 0..{self.num_classes - 1}"
            )
        labels, boxes, mask = targets_to_padded(targets_M6, b)
        _, tgt_boxes, tgt_scores, fg = task_aligned_assign(
            cls_logits.detach().sigmoid(),
            (pred_boxes.detach() * stride).to(boxes.dtype),
            points * stride,
            labels,
            boxes,
            mask,
            self.topk,
            self.alpha,
            self.beta,
        )
        score_sum = tgt_scores.sum().clamp_min(1.0)
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, tgt_scores, reduction="sum") / score_sum
        if bool(fg.any()):
            weight = tgt_scores.sum(-1)[fg]
            tgt_grid = tgt_boxes / stride
            ciou = box_ciou_pairwise(pred_boxes[fg], tgt_grid[fg])
            loss_box = ((1.0 - ciou) * weight).sum() / score_sum
            tgt_dist = bbox2dist(points.expand(b, -1, -1)[fg], tgt_grid[fg], self.reg_max - 1 - 0.01)
            dfl = distribution_focal_loss(dist_logits[fg].reshape(-1, self.reg_max), tgt_dist.reshape(-1))
            loss_dfl = (dfl.reshape(-1, 4).mean(-1) * weight).sum() / score_sum
        else:
            loss_box = dist_logits.sum() * 0.0
            loss_dfl = dist_logits.sum() * 0.0
        loss = self.box_gain * loss_box + self.cls_gain * loss_cls + self.dfl_gain * loss_dfl
        parts = {"loss_box": loss_box.detach(), "loss_cls": loss_cls.detach(), "loss_dfl": loss_dfl.detach()}
        return loss, parts
