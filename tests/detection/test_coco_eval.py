"""COCO evaluation on fixtures with a known answer."""

from __future__ import annotations

import pytest
import torch

from moezoo.tasks.detection.evaluate import DetectionEvaluator, coco_evaluate


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.long)}  # fmt: skip


def _gt(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def test_perfect_predictions_score_one():
    gts = [_gt([[0, 0, 40, 40], [50, 50, 90, 80]], [0, 1]), _gt([[10, 10, 30, 60]], [1])]
    preds = [_det(g["boxes"].tolist(), [0.9] * len(g["labels"]), g["labels"].tolist()) for g in gts]
    assert coco_evaluate(preds, gts, 2) == {"mAP": pytest.approx(1.0), "mAP50": pytest.approx(1.0),
                                            "AR100": pytest.approx(1.0)}  # fmt: skip


def test_known_answer_partial_match():
    """Two objects of one class: one found exactly, one with IoU 0.62 (a hit at IoU thresholds .50, .55, .60 only).

    At the three loose thresholds AP = 1 and recall = 1; at the seven strict ones recall is 1/2 and precision is 1
    up to it, so COCO's 101-point interpolated AP is 51/101. mAP = (3 + 7 * 51/101) / 10, AR100 = (3 + 7/2) / 10.
    A false positive on a third image with a lower score changes nothing: it ranks below every true positive.
    """
    gts = [_gt([[0, 0, 10, 10]], [0]), _gt([[20, 20, 40, 40]], [0]), _gt([], [])]
    preds = [
        _det([[0, 0, 10, 10]], [0.9], [0]),
        _det([[20, 20, 40, 32.4]], [0.8], [0]),  # IoU = 20 * 12.4 / 400 = 0.62
        _det([[5, 5, 15, 15]], [0.3], [0]),
    ]
    got = coco_evaluate(preds, gts, 1)
    assert got["mAP50"] == pytest.approx(1.0)
    assert got["mAP"] == pytest.approx((3 + 7 * 51 / 101) / 10, abs=1e-6)
    assert got["AR100"] == pytest.approx((3 + 7 * 0.5) / 10, abs=1e-6)


def test_wrong_class_and_missing_predictions():
    gts = [_gt([[0, 0, 10, 10]], [0]), _gt([[0, 0, 10, 10]], [1])]
    preds = [_det([[0, 0, 10, 10]], [0.9], [1]), _det([], [], [])]
    got = coco_evaluate(preds, gts, 2)
    assert got == {"mAP": 0.0, "mAP50": 0.0, "AR100": 0.0}
    assert coco_evaluate([_det([], [], [])], [_gt([], [])], 2) == {}


def test_evaluator_per_domain_and_routing():
    ev = DetectionEvaluator(num_classes=1, domain_names=("clean", "degraded"))
    targets = torch.tensor([[0, 0, 0, 0, 10, 10], [1, 0, 0, 0, 10, 10.0]])
    preds = [_det([[0, 0, 10, 10]], [0.9], [0]), _det([[30, 30, 40, 40]], [0.9], [0])]
    routing = torch.tensor([[[0.8, 0.2]] * 3, [[0.1, 0.9]] * 3])
    ev.update(preds, targets, torch.tensor([0, 1]), routing)
    out = ev.compute()
    assert out["mAP50_clean"] == pytest.approx(1.0) and out["mAP50_degraded"] == 0.0
    assert out["mAP50"] == pytest.approx(0.5, abs=0.01)
    by_domain = ev.routing_by_domain()
    assert by_domain["clean"][0].tolist() == pytest.approx([0.8, 0.2])
    assert by_domain["degraded"][2].tolist() == pytest.approx([0.1, 0.9])


def test_bad_ground_truth_label():
    with pytest.raises(ValueError, match="label 3"):
        coco_evaluate([_det([], [], [])], [_gt([[0, 0, 5, 5]], [3])], 2)
