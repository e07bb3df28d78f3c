"""Box coding, IoU/CIoU, task-aligned assignment and the YOLO losses against naive oracles on hand-made boxes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moezoo.models.yolo_boxes import (
    bbox2dist,
    box_ciou_pairwise,
    box_iou_pairwise,
    decode_outputs,
    dfl_decode,
    dist2bbox,
    make_anchors,
    postprocess,
)
from moezoo.tasks.detection.losses import (
    DetectionLoss,
    distribution_focal_loss,
    targets_to_padded,
    task_aligned_assign,
)
from tests.detection import oracles_detection as oracle


def test_anchor_points_are_cell_centres():
    points, strides = make_anchors([(2, 3), (1, 1)], [8, 16])
    assert points.tolist()[:4] == [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5]]
    assert points.tolist()[-1] == [0.5, 0.5]
    assert strides.squeeze(1).tolist() == [8.0] * 6 + [16.0]


def test_box_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(50, 2, generator=g) * 10
    dist = torch.rand(50, 4, generator=g) * 7
    boxes = dist2bbox(dist, points)
    torch.testing.assert_close(bbox2dist(points, boxes), dist)
    torch.testing.assert_close(dist2bbox(bbox2dist(points, boxes), points), boxes)
    # Clamping: a box reaching further than max_dist decodes to the clamped distance.
    far = torch.tensor([[-20.0, 0.0, 3.0, 4.0]])
    torch.testing.assert_close(bbox2dist(torch.tensor([[1.0, 1.0]]), far, 14.5), torch.tensor([[14.5, 1.0, 2.0, 3.0]]))


def test_dfl_decode_is_the_expected_bin():
    reg_max = 8
    logits = torch.full((1, 4 * reg_max), -1e4)
    for side, value in enumerate([0, 3, 7, 5]):
        logits[0, side * reg_max + value] = 0.0
    assert dfl_decode(logits, reg_max).tolist() == [[0.0, 3.0, 7.0, 5.0]]
    # Two equal bins: the expectation is their midpoint.
    logits[0, 1 * reg_max + 4] = 0.0
    assert dfl_decode(logits, reg_max)[0, 1].item() == pytest.approx(3.5)


def test_decode_outputs_places_boxes_in_pixels():
    reg_max, num_classes = 4, 3
    preds = []
    for h in (2, 1):
        p = torch.full((1, 4 * reg_max + num_classes, h, h), -1e4)
        p[:, [1, reg_max + 1, 2 * reg_max + 1, 3 * reg_max + 1]] = 0.0  # every side: 1 grid unit
        preds.append(p)
    boxes, logits = decode_outputs(preds, [8, 16], reg_max, num_classes)
    assert logits.shape == (1, 5, num_classes)
    assert boxes[0, 0].tolist() == [-4.0, -4.0, 12.0, 12.0]  # centre (4, 4) px, 1 unit = 8 px per side
    assert boxes[0, 3].tolist() == [4.0, 4.0, 20.0, 20.0]  # centre (12, 12)
    assert boxes[0, 4].tolist() == [-8.0, -8.0, 24.0, 24.0]  # stride 16: centre (8, 8), 16 px per side


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_and_ciou_match_oracle_and_ciou_gradient_is_finite(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(20, 2, generator=g) * 20
    wh = torch.rand(20, 2, generator=g) * 10 + 0.5
    a = torch.cat([xy, xy + wh], 1)
    xy2 = xy + torch.randn(20, 2, generator=g) * 3
    b = torch.cat([xy2, xy2 + torch.rand(20, 2, generator=g) * 10 + 0.5], 1)
    got_iou = box_iou_pairwise(a, b)
    got_ciou = box_ciou_pairwise(a.double().requires_grad_(), b.double())
    for i in range(20):
        assert got_iou[i].item() == pytest.approx(oracle.iou(a[i].tolist(), b[i].tolist()), abs=1e-5)
        assert got_ciou[i].item() == pytest.approx(oracle.ciou(a[i].tolist(), b[i].tolist()), abs=1e-6)
    got_ciou.sum().backward()


def test_ciou_hand_values():
    same = torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    assert box_ciou_pairwise(same, same).item() == pytest.approx(1.0, abs=1e-6)
    # Disjoint equal squares side by side: IoU 0, centres 2 apart, enclosing box 4x2 (diag^2 = 20).
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[2.0, 0.0, 4.0, 2.0]])
    assert box_ciou_pairwise(a, b).item() == pytest.approx(-4.0 / 20.0, abs=1e-6)


def _assignment_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    points, stride = make_anchors([(8, 8), (4, 4), (2, 2)], [8, 16, 32])
    points_px = points * stride
    num_anchors, num_classes = len(points), 4
    scores = torch.rand(2, num_anchors, num_classes, generator=g) * 0.9 + 0.05
    half = (torch.rand(2, num_anchors, 2, generator=g) * 12 + 6) * stride.unsqueeze(0) / 8
    pred = torch.cat([points_px - half, points_px + half], -1)
    gt_boxes = torch.tensor(
        [
            [[4.0, 4.0, 30.0, 26.0], [20.0, 10.0, 60.0, 50.0], [0.0, 0.0, 0.0, 0.0]],
            [[33.0, 2.0, 63.0, 62.0], [0.0, 30.0, 14.0, 45.0], [10.0, 35.0, 40.0, 60.0]],
        ]
    )
    gt_labels = torch.tensor([[1, 3, 0], [0, 2, 2]])
    gt_mask = torch.tensor([[True, True, False], [True, True, True]])
    return scores, pred, points_px, gt_labels, gt_boxes, gt_mask


@pytest.mark.parametrize("seed,topk", [(0, 10), (1, 3), (2, 13)])
def test_task_aligned_assignment_matches_oracle(seed, topk):
    scores, pred, points_px, gt_labels, gt_boxes, gt_mask = _assignment_case(seed)
    labels, boxes, soft, fg = task_aligned_assign(scores, pred, points_px, gt_labels, gt_boxes, gt_mask, topk, 0.5, 6.0)
    num_fg = 0
    for b in range(2):
        gts = [(int(gt_labels[b, m]), gt_boxes[b, m].tolist()) for m in range(3) if gt_mask[b, m]]
        expected = oracle.task_aligned_assign(
            scores[b].tolist(), pred[b].tolist(), [tuple(p) for p in points_px.tolist()], gts, topk, 0.5, 6.0
        )
        for a, want in enumerate(expected):
            if want is None:
                assert not fg[b, a] and float(soft[b, a].sum()) == 0.0
                continue
            num_fg += 1
            m, score = want
            assert fg[b, a]
            assert int(labels[b, a]) == gts[m][0]
            assert boxes[b, a].tolist() == gts[m][1]
            assert float(soft[b, a, gts[m][0]]) == pytest.approx(score, rel=1e-4, abs=1e-7)
            assert float(soft[b, a].sum()) == pytest.approx(score, rel=1e-4, abs=1e-7)
    assert num_fg > 0


def test_assignment_without_ground_truth_is_all_background():
    scores, pred, points_px, *_ = _assignment_case(0)
    no_labels, no_boxes, no_mask = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4), torch.zeros(2, 0).bool()
    labels, boxes, soft, fg = task_aligned_assign(scores, pred, points_px, no_labels, no_boxes, no_mask)
    assert not fg.any() and soft.sum() == 0 and labels.shape == (2, len(points_px))


def test_distribution_focal_loss_hand_value():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    target = torch.tensor([1.25])
    logp = torch.log_softmax(logits, -1)[0]
    expected = -(0.75 * logp[1] + 0.25 * logp[2])
    assert distribution_focal_loss(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_targets_to_padded():
    targets = torch.tensor([[1, 2, 0, 0, 5, 5], [0, 1, 1, 1, 2, 2], [1, 0, 3, 3, 9, 9.0]])
    labels, boxes, mask = targets_to_padded(targets, 3)
    assert labels.tolist() == [[1, 0], [2, 0], [0, 0]]
    assert mask.tolist() == [[True, False], [True, True], [False, False]]
    assert boxes[1].tolist() == [[0, 0, 5, 5], [3, 3, 9, 9]]


def _perfect_preds(reg_max: int, num_classes: int, box: list[float], label: int, sizes=((8, 8), (4, 4), (2, 2))):
    """Raw maps whose every anchor inside ``box`` predicts it exactly (two-bin DFL logits) with a high score."""
    preds = []
    for (h, w), s in zip(sizes, (8, 16, 32)):
        p = torch.full((1, 4 * reg_max + num_classes, h, w), -20.0)
        for y in range(h):
            for x in range(w):
                cx, cy = (x + 0.5) * s, (y + 0.5) * s
                if not (box[0] < cx < box[2] and box[1] < cy < box[3]):
                    continue
                dist = [(cx - box[0]) / s, (cy - box[1]) / s, (box[2] - cx) / s, (box[3] - cy) / s]
                for side, d in enumerate(dist):
                    lo = int(math.floor(d))
                    frac = d - lo
                    p[0, side * reg_max + lo, y, x] = math.log(max(1 - frac, 1e-12)) + 30
                    p[0, side * reg_max + lo + 1, y, x] = math.log(max(frac, 1e-12)) + 30
                p[0, 4 * reg_max + label, y, x] = 8.0
        preds.append(p)
    return preds


def test_detection_loss_is_small_for_perfect_and_larger_for_shifted_predictions():
    loss_fn = DetectionLoss(num_classes=3, reg_max=8, strides=(8, 16, 32))
    box, label = [10.0, 12.0, 40.0, 44.0], 2
    targets = torch.tensor([[0, label, *box]])
    good, parts_good = loss_fn(_perfect_preds(8, 3, box, label), targets)
    assert parts_good["loss_box"].item() < 1e-4
    shifted, parts_bad = loss_fn(_perfect_preds(8, 3, [14.0, 16.0, 44.0, 48.0], label), targets)
    assert parts_bad["loss_box"] > 0.05 and shifted > good
    wrong_class, _ = loss_fn(_perfect_preds(8, 3, box, 0), targets)
    assert wrong_class > good


def test_detection_loss_gradients_and_empty_targets():
    loss_fn = DetectionLoss(num_classes=3, reg_max=8, strides=(8, 16, 32))
    preds = [torch.randn(2, 35, h, h, requires_grad=True) for h in (8, 4, 2)]
    targets = torch.tensor([[0, 1, 5, 5, 30, 30], [1, 2, 20, 8, 60, 40.0]])
    loss, _ = loss_fn(preds, targets)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in preds)
    empty, parts = loss_fn([p.detach().requires_grad_() for p in preds], torch.zeros(0, 6))
    assert torch.isfinite(empty) and parts["loss_box"] == 0
    # With no object, the classification loss is plain BCE towards 0 (normalised by max(1, sum of targets)).
    flat = torch.cat([p.detach().flatten(2) for p in preds], 2).transpose(1, 2)[..., 32:]
    assert parts["loss_cls"].item() == pytest.approx(
        F.binary_cross_entropy_with_logits(flat, torch.zeros_like(flat), reduction="sum").item(), rel=1e-5
    )


def test_detection_loss_rejects_unknown_class_id():
    loss_fn = DetectionLoss(num_classes=3, reg_max=8, strides=(8, 16, 32))
    preds = [torch.randn(1, 35, h, h) for h in (8, 4, 2)]
    with pytest.raises(ValueError, match="class id 5"):
        loss_fn(preds, torch.tensor([[0, 5, 1, 1, 9, 9.0]]))


def test_postprocess_suppresses_duplicates_per_class():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]])
    logits = torch.logit(torch.tensor([[[0.9, 0.01], [0.8, 0.01], [0.01, 0.7], [0.6, 0.01]]]))
    (det,) = postprocess(boxes, logits, conf_thres=0.25, iou_thres=0.5)
    got = sorted(zip(det["labels"].tolist(), [round(s, 3) for s in det["scores"].tolist()]))
    assert got == [(0, 0.6), (0, 0.9), (1, 0.7)]
