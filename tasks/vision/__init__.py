"""Vision tasks: image classification with ``moe_vit``."""

from moezoo.extras import require

require("vision", __name__)  # before the imports it guards

from moezoo.tasks.vision.classification import ImageClassificationTask
from moezoo.tasks.vision.data import (
    CIFARDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
)

__all__ = [
    "CIFARDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageClassificationTask",
    "ImageFolderDataModule",
]
