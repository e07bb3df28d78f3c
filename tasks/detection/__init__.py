"""Object detection: ``moe_yolo`` (YOLO-MoE) on canvases, a user's COCO/YOLO dataset, or DeepForest's trees."""

from moezoo.extras import require

require("detection", __name__)  # before the imports it guards

from moezoo.tasks.detection.data import CanvasDataModule, DeepForestDataModule, DetectionFolderDataModule, collate
from moezoo.tasks.detection.task import DetectionTask

__all__ = ["CanvasDataModule", "DeepForestDataModule", "DetectionFolderDataModule", "DetectionTask", "collate"]
