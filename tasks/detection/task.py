"""Object detection with ``moe_yolo``: YOLO loss + MoE aux losses, COCO metrics per domain, routing by domain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from moezoo.layers import MoEAux
from moezoo.stats import TokenGroups
from moezoo.tasks.base import MoETask
from moezoo.tasks.class_names import NamedClasses
from moezoo.tasks.detection.draw import draw_detections
from moezoo.tasks.detection.evaluate import DetectionEvaluator
from moezoo.tasks.detection.losses import DetectionLoss


class DetectionTask(NamedClasses, MoETask):
    """Trains a registered detector (``moe_yolo_*``); validation and test report COCO mAP, mAP50 and AR100 overall
    and per domain (``<stage>/mAP50_clean`` ...) and the mean routing weight of each expert per domain.

    Args:
        box_gain, cls_gain, dfl_gain: weights of the CIoU, BCE and distribution focal losses.
        conf_thres, iou_thres, max_det: NMS settings for evaluation.
        predict_conf: score threshold of the boxes ``predict`` draws.
        predict_dir: where ``predict`` writes the drawn images and ``predictions.jsonl`` (boxes, routing weights);
            default ``<log dir>/predictions``, beside the logs, as every task.
        model, model_kwargs, **kwargs (``optimizer``, ``lr_scheduler``, ``aux_loss_coef``): as in
            :class:`moezoo.tasks.base.MoETask`.
    """

    def __init__(
        self,
        model: str = "moe_yolo_debug",
        model_kwargs: dict[str, Any] | None = None,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        conf_thres: float = 0.001,
        iou_thres: float = 0.6,
        max_det: int = 100,
        predict_conf: float = 0.25,
        predict_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, model_kwargs, **kwargs)
        if not 0 <= conf_thres < 1 or not 0 < iou_thres <= 1:
            raise ValueError(f"conf_thres must be in [0, 1) and iou_thres in (0, 1], got {conf_thres}, {iou_thres}")
        m = self.model
        self.loss_fn = DetectionLoss(m.num_classes, m.reg_max, m.strides, box_gain, cls_gain, dfl_gain)
        self.evaluator = DetectionEvaluator(m.num_classes, ("all",))
        self._last_out: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is None:
            return
        num_classes = getattr(dm, "num_classes", None)
        if num_classes is not None and num_classes != self.model.num_classes:
            raise ValueError(
                f"the data has num_classes={num_classes} but the model was built with num_classes="
                f"{self.model.num_classes}; set model_kwargs.num_classes to {num_classes}"
            )
        in_chans = getattr(dm, "in_chans", None)
        if in_chans is not None and in_chans != self.model.in_chans:
            raise ValueError(f"the data has in_chans={in_chans}; set model_kwargs.in_chans to {in_chans}")
        self.evaluator = DetectionEvaluator(self.model.num_classes, getattr(dm, "domain_names", ("all",)))

    def forward(self, x: Tensor) -> dict[str, Any]:
        return self.model(x)

    def compute_loss(self, batch: Any, stage: str) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        out, auxes = self.model.forward_with_aux(batch["images"])
        loss, parts = self.loss_fn(out["preds"], batch["targets"])
        self._last_out = out
        return loss, auxes, parts, batch["images"].shape[0]

    def routing_groups(self, batch: Any) -> TokenGroups | None:
        """Routing shares per visual domain of the images (none when the data names fewer domains than it uses)."""
        names, domain_B = tuple(self.evaluator.domain_names), batch["domain"]
        if domain_B.numel() and int(domain_B.max()) >= len(names):
            return None
        return TokenGroups(domain_B, names, "domain")

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        loss = self._shared_step(batch, stage)
        assert self._last_out is not None
        w_BSN = self._last_out["routing"]
        groups = self.routing_groups(batch)
        if w_BSN is not None and groups is not None:  # the blend router's weights: its layers are the last S auxes
            stats = self.routing_stats(stage)
            first = stats.num_layers - w_BSN.shape[1]
            for s in range(w_BSN.shape[1]):
                stats.add_group_weights(first + s, groups, w_BSN[:, s])
        boxes, logits = self.model.decode(self._last_out["preds"])
        from moezoo.models.yolo_boxes import postprocess

        hp = self.hparams
        preds = postprocess(boxes, logits, hp.conf_thres, hp.iou_thres, hp.max_det)
        self.evaluator.update(preds, batch["targets"], batch["domain"], self._last_out["routing"])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.evaluator.reset()

    def _log_epoch(self, stage: str) -> None:
        if not self.evaluator.preds:
            return
        for name, value in self.evaluator.compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "mAP50")
        for domain, w_SN in self.evaluator.routing_by_domain().items():
            for n, w in enumerate(w_SN.mean(0).tolist()):
                self.log(f"{stage}/route_{domain}_e{n}", w)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        routing = self.evaluator.routing_by_domain()
        if routing and self.trainer.is_global_zero:
            print(f"\nMean routing weight per expert (rows: strides 8/16/32), by domain ({self.hparams.model})")
            for domain, w_SN in routing.items():
                print(f"  {domain:>9}: " + " | ".join(" ".join(f"{w:.3f}" for w in row) for row in w_SN.tolist()))
        super().on_test_epoch_end()

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Any]]:
        """Per image: boxes, scores, class names, domain and routing weights (a record of ``predictions.jsonl``),
        with the drawn image under ``"drawing"`` (written as ``<image_id>.png`` by :meth:`write_predictions`)."""
        hp = self.hparams
        dets, routing = self.model.predict(batch["images"], hp.predict_conf, hp.iou_thres, hp.max_det)
        dm = self.trainer.datamodule if self.trainer is not None else None
        class_names = self.class_names()
        domain_names = getattr(dm, "domain_names", ("all",))
        records = []
        for i, det in enumerate(dets):
            image_id = int(batch["image_id"][i])
            route = routing[i] if routing is not None else None
            record = {
                "image_id": image_id,
                "domain": domain_names[int(batch["domain"][i])] if int(batch["domain"][i]) < len(domain_names) else "",
                "boxes": [[round(v, 2) for v in b] for b in det["boxes"].tolist()],
                "scores": [round(s, 4) for s in det["scores"].tolist()],
                "labels": [class_names[int(c)] for c in det["labels"].tolist()],
                "routing": route.tolist() if route is not None else None,
                "drawing": draw_detections(batch["images"][i], det, class_names, route),
            }
            records.append(record)
        return records

    def prediction_rows(self, prediction: Any, batch: Any) -> list[dict[str, Any]]:
        return list(prediction)

    def write_predictions(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """``<image_id>.png`` (boxes drawn) per image and ``predictions.jsonl``, under ``predict_dir`` when it is
        set, else beside the logs; every file written atomically."""
        import io

        from moezoo.io import write_bytes_atomic
        from moezoo.tasks.predict import write_jsonl_atomic

        folder = Path(self.hparams.predict_dir) if self.hparams.predict_dir else out_dir
        written = []
        for row in rows:
            buffer = io.BytesIO()
            row["drawing"].save(buffer, format="png")
            written.append(write_bytes_atomic(folder / f"{row['image_id']:06d}.png", buffer.getvalue()))
        records = [{k: v for k, v in row.items() if k != "drawing"} for row in rows]
        return [write_jsonl_atomic(folder / "predictions.jsonl", records), *written[:1]]

    def prediction_summary(self, rows: list[dict[str, Any]]) -> str:
        boxes = sum(len(row["boxes"]) for row in rows)
        return f"{len(rows)} images, {boxes} boxes at score >= {self.hparams.predict_conf} (one PNG per image)"
