"""Naive oracles for detection: plain Python loops over boxes, anchors, images and experts. They share no code
with moezoo.models.yolo_boxes or moezoo.tasks.detection."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ciou(a: list[float], b: list[float]) -> float:
    """Complete IoU: IoU - rho^2 / c^2 - alpha * v."""
    i = iou(a, b)
    c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    rho2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    v = 4 / math.pi**2 * (math.atan((b[2] - b[0]) / (b[3] - b[1])) - math.atan((a[2] - a[0]) / (a[3] - a[1]))) ** 2
    alpha = v / (1 - i + v) if v > 0 else 0.0
    return i - rho2 / c2 - alpha * v


def task_aligned_assign(
    scores: list[list[float]],
    pred_boxes: list[list[float]],
    points: list[tuple[float, float]],
    gts: list[tuple[int, list[float]]],
    topk: int,
    alpha: float,
    beta: float,
) -> list[tuple[int, float] | None]:
    """One image. Per anchor: ``None`` (background) or ``(gt index, soft target score)``.

    Each gt takes its ``topk`` anchors by ``score^alpha * iou^beta`` among anchors whose centre lies strictly
    inside it; an anchor claimed by several gts keeps the one with the largest IoU with its predicted box; the soft
    target is ``metric * (max IoU over the gt's positives) / (max metric over the gt's positives)``.
    """
    num_anchors = len(points)
    inside = [[points[a][0] > g[1][0] and points[a][1] > g[1][1] and points[a][0] < g[1][2] and points[a][1] < g[1][3]
               for a in range(num_anchors)] for g in gts]  # fmt: skip
    ious = [[iou(g[1], pred_boxes[a]) if inside[m][a] else 0.0 for a in range(num_anchors)] for m, g in enumerate(gts)]
    metric = [[scores[a][g[0]] ** alpha * ious[m][a] ** beta if inside[m][a] else 0.0 for a in range(num_anchors)]
              for m, g in enumerate(gts)]  # fmt: skip
    claimed: list[list[int]] = [[] for _ in range(num_anchors)]
    for m in range(len(gts)):
        order = sorted(range(num_anchors), key=lambda a: -metric[m][a])[:topk]
        for a in order:
            if inside[m][a]:
                claimed[a].append(m)
    owner: list[int | None] = []
    for a in range(num_anchors):
        if not claimed[a]:
            owner.append(None)
        elif len(claimed[a]) == 1:
            owner.append(claimed[a][0])
        else:
            owner.append(max(range(len(gts)), key=lambda m: ious[m][a]))
    result: list[tuple[int, float] | None] = []
    for a in range(num_anchors):
        m = owner[a]
        if m is None:
            result.append(None)
            continue
        positives = [b for b in range(num_anchors) if owner[b] == m]
        best_metric = max(metric[m][b] for b in positives)
        best_iou = max(ious[m][b] for b in positives)
        result.append((m, metric[m][a] * best_iou / (best_metric + 1e-9)))
    return result


def blend_router(
    feats: list[list[Tensor]],
    outputs: list[list[Tensor]],
    mlps: list[tuple[Tensor, Tensor, Tensor, Tensor]],
    top_k: int,
) -> tuple[list[Tensor], Tensor]:
    """Per scale s and image b: pooled features of every expert -> 2-layer SiLU MLP -> softmax (top-k kept,
    renormalised) -> weighted sum of the experts' raw output maps. Returns (blended maps per scale, weights B,S,N)."""
    num_experts, num_scales, batch = len(feats), len(feats[0]), feats[0][0].shape[0]
    blended, weights = [], []
    for s in range(num_scales):
        w1, b1, w2, b2 = mlps[s]
        rows, w_rows = [], []
        for b in range(batch):
            v = torch.cat([feats[n][s][b].mean(dim=(1, 2)) for n in range(num_experts)])
            h = w1 @ v + b1
            h = h / (1 + torch.exp(-h))
            logits = w2 @ h + b2
            e = torch.exp(logits - logits.max())
            p = e / e.sum()
            keep = sorted(range(num_experts), key=lambda n: -float(p[n]))[:top_k]
            total = sum(p[n] for n in keep)
            w = [p[n] / total if n in keep else p[n] * 0 for n in range(num_experts)]
            out = sum(w[n] * outputs[n][s][b] for n in range(num_experts))
            rows.append(out)
            w_rows.append(torch.stack(w))
        blended.append(torch.stack(rows))
        weights.append(torch.stack(w_rows))
    return blended, torch.stack(weights, 1)
