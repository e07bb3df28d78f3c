"""Image generation with ``moe_dit``: rectified flow and DDPM, classifier-free guidance, EMA, FD-FMNIST."""

from moezoo.tasks.generation.data import DigitsGenerationDataModule, FashionMNISTGenerationDataModule
from moezoo.tasks.generation.task import ImageGenerationTask

__all__ = ["DigitsGenerationDataModule", "FashionMNISTGenerationDataModule", "ImageGenerationTask"]
