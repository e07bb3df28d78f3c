"""Box geometry for the anchor-free YOLO detector: anchor points, distance coding, IoU/CIoU and NMS.

Legend: B images, A anchor points (all scales), M ground-truth boxes per image (padded), C classes,
R ``reg_max`` bins per box side. Boxes are ``xyxy``; distances are ``ltrb`` from an anchor point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor


def make_anchors(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device | None = None):
    """Cell centres of every feature map (in grid units) and their strides: ``(A, 2)``, ``(A, 1)``."""
    points, stride_list = [], []
    for (h, w), s in zip(sizes, strides):
        ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
        xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([gx, gy], -1).reshape(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(s), device=device))
    return torch.cat(points), torch.cat(stride_list)


def dist2bbox(dist_ltrb: Tensor, points: Tensor) -> Tensor:
    """Decode ``(..., 4)`` ltrb distances from ``(..., 2)`` points into xyxy boxes."""
    lt, rb = dist_ltrb.chunk(2, -1)
    return torch.cat([points - lt, points + rb], -1)


def bbox2dist(points: Tensor, boxes: Tensor, max_dist: float | None = None) -> Tensor:
    """Encode xyxy boxes as ltrb distances from points (clamped to ``[0, max_dist]`` when given)."""
    x1y1, x2y2 = boxes.chunk(2, -1)
    dist = torch.cat([points - x1y1, x2y2 - points], -1)
    return dist.clamp(0, max_dist) if max_dist is not None else dist


def dfl_decode(dist_logits: Tensor, reg_max: int) -> Tensor:
    """``(..., 4*R)`` bin logits -> ``(..., 4)`` expected distances (in bins = grid units)."""
    probs = dist_logits.reshape(*dist_logits.shape[:-1], 4, reg_max).softmax(-1)
    bins = torch.arange(reg_max, device=dist_logits.device, dtype=probs.dtype)
    return (probs * bins).sum(-1)


def box_iou_pairwise(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """IoU of matching rows ``(..., 4)`` and ``(..., 4)`` -> ``(...)``."""
    inter_w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    inter_h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0]).clamp_min(0) * (a[..., 3] - a[..., 1]).clamp_min(0)
    area_b = (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)
    return inter / (area_a + area_b - inter + eps)


def box_ciou_pairwise(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU (Zheng et al. 2020) of matching rows: IoU - centre distance term - aspect-ratio term."""
    iou = box_iou_pairwise(a, b, eps)
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    diag2 = cw.square() + ch.square() + eps
    dx = a[..., 0] + a[..., 2] - b[..., 0] - b[..., 2]
    dy = a[..., 1] + a[..., 3] - b[..., 1] - b[..., 3]
    centre2 = (dx.square() + dy.square()) / 4
    wa, ha = a[..., 2] - a[..., 0], (a[..., 3] - a[..., 1]).clamp_min(eps)
    wb, hb = b[..., 2] - b[..., 0], (b[..., 3] - b[..., 1]).clamp_min(eps)
    v = (4 / math.pi**2) * (torch.atan(wb / hb) - torch.atan(wa / ha)).square()
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre2 / diag2 + v * alpha)


def decode_outputs(
    preds: Sequence[Tensor], strides: Sequence[int], reg_max: int, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Per-scale raw maps ``(B, 4R + C, H, W)`` -> boxes in pixels ``(B, A, 4)`` and class logits ``(B, A, C)``."""
    flat = torch.cat([p.flatten(2) for p in preds], 2).transpose(1, 2)
    dist_logits, cls_logits = flat.split([4 * reg_max, num_classes], -1)
    points, stride = make_anchors([(p.shape[2], p.shape[3]) for p in preds], strides, flat.device)
    boxes = dist2bbox(dfl_decode(dist_logits, reg_max), points) * stride
    return boxes, cls_logits


def postprocess(
    boxes_BA4: Tensor,
    cls_logits_BAC: Tensor,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
    max_candidates: int = 3000,
) -> list[dict[str, Tensor]]:
    """Multi-label, class-wise NMS (``torchvision.ops.batched_nms``): one dict (boxes, scores, labels) per image."""
    scores_BAC = cls_logits_BAC.sigmoid()
    out = []
    for boxes_A4, scores_AC in zip(boxes_BA4, scores_BAC):
        anchor_idx, labels = (scores_AC > conf_thres).nonzero(as_tuple=True)
        scores = scores_AC[anchor_idx, labels]
        if scores.numel() > max_candidates:
            top = scores.topk(max_candidates).indices
            anchor_idx, labels, scores = anchor_idx[top], labels[top], scores[top]
        boxes = boxes_A4[anchor_idx]
        keep = torchvision.ops.batched_nms(boxes.float(), scores.float(), labels, iou_thres)[:max_det]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out
