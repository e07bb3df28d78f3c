"""Image generation with ``moe_dit``: rectified flow and DDPM, classifier-free guidance, EMA, FD-FMNIST."""

from moezoo.extras import require

require("generation", __name__)  # before the imports it guards

from moezoo.tasks.generation.data import (
    DigitsGenerationDataModule,
    FashionMNISTGenerationDataModule,
    ImageFolderGenerationDataModule,
)
from moezoo.tasks.generation.task import ImageGenerationTask

__all__ = [
    "DigitsGenerationDataModule",
    "FashionMNISTGenerationDataModule",
    "ImageFolderGenerationDataModule",
    "ImageGenerationTask",
]
