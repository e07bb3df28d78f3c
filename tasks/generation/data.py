"""Generation data: the vision DataModules with images rescaled to ``[-1, 1]`` and no augmentation by default.

Diffusion and flow objectives want a fixed, symmetric pixel range; the classification modules normalise by the
dataset's mean and std instead, so these subclasses undo that and map ``[0, 1]`` to ``[-1, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset, TensorDataset

# FashionMNISTDataModule.load_split's and DigitsDataModule.setup's normalisations
from moezoo.data.transforms import DIGITS_MEAN, DIGITS_STD
from moezoo.data.transforms import FASHION_MNIST_MEAN as FMNIST_MEAN
from moezoo.data.transforms import FASHION_MNIST_STD as FMNIST_STD
from moezoo.tasks.records import DEFAULT_MAX_SKIP_FRACTION
from moezoo.tasks.vision.data import (
    FASHION_MNIST_DEBIAN_ROOT,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
)


def fashion_mnist_unit_range(root: Path, split: str) -> tuple[Tensor, Tensor]:
    """A Fashion-MNIST split with images in ``[-1, 1]``: ``(x (B, 1, 28, 28), y (B,))``."""
    x, y = FashionMNISTDataModule.load_split(root, split)
    return (x * FMNIST_STD + FMNIST_MEAN) * 2.0 - 1.0, y


class ClassRequests:
    """``predict_classes`` of a generation data module: class ids or names -> a loader of class-id batches."""

    def __init__(self, predict_classes: Sequence[int | str] | None, names: Sequence[str], batch_size: int) -> None:
        self.names = tuple(names)
        self.batch_size = batch_size
        self.ids = [self.resolve(c) for c in (predict_classes if predict_classes is not None else range(len(names)))]

    def resolve(self, value: int | str) -> int:
        if isinstance(value, str) and value in self.names:
            return self.names.index(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.names):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) < len(self.names):
            return int(value)
        raise ValueError(
            f"predict_classes: {value!r} is not a class; give ids in [0, {len(self.names)}) or names {self.names}"
        )

    def loader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.tensor(self.ids, dtype=torch.long)), batch_size=self.batch_size)


def _rescale(dataset: object, mean: float, std: float) -> None:
    """In place: a TensorDataset (or a Subset of one) normalised by ``mean, std`` -> ``[-1, 1]``."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    assert isinstance(base, TensorDataset)
    if getattr(base, "_unit_range", False):
        return
    images = base.tensors[0]
    images.mul_(std).add_(mean).mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)
    base._unit_range = True  # type: ignore[attr-defined]


class FashionMNISTGenerationDataModule(FashionMNISTDataModule):
    """Fashion-MNIST 28x28 in ``[-1, 1]`` for generation (no shifts or flips unless asked)."""

    def __init__(
        self,
        root: str = FASHION_MNIST_DEBIAN_ROOT,
        batch_size: int = 128,
        val_size: int = 2000,
        train_limit: int | None = None,
        max_shift: int = 0,
        hflip: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        predict_classes: list[int | str] | None = None,
    ) -> None:
        super().__init__(root, batch_size, val_size, train_limit, max_shift, hflip, num_workers, seed)
        self.requests = ClassRequests(predict_classes, self.class_names, batch_size)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return  # predict samples the requested classes: no images needed
        super().setup(stage)
        for dataset in (self.train_set, self.val_set, self.test_set):
            _rescale(dataset, FMNIST_MEAN, FMNIST_STD)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the requested class ids (``predict_classes``; all classes by default)."""
        return self.requests.loader()


class DigitsGenerationDataModule(DigitsDataModule):
    """scikit-learn's 8x8 digits in ``[-1, 1]``: the seconds-long smoke default."""

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        max_shift: int = 0,
        num_workers: int = 0,
        seed: int = 0,
        predict_classes: list[int | str] | None = None,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, max_shift, num_workers, seed)
        self.requests = ClassRequests(predict_classes, self.class_names, batch_size)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return  # predict samples the requested classes: no images needed
        super().setup(stage)
        _rescale(self.train_set, DIGITS_MEAN, DIGITS_STD)  # the three splits share one TensorDataset

    def predict_dataloader(self) -> DataLoader:
        """Batches of the requested class ids (``predict_classes``; all classes by default)."""
        return self.requests.loader()


class ImageFolderGenerationDataModule(ImageFolderDataModule):
    """A user's ``root/{train,val[,test]}/<class>/*.png`` tree for class-conditional generation: the classification
    module's images (resized, normalised by 0.5/0.5, i.e. already in ``[-1, 1]``; unreadable files skipped and
    named), one class per folder of ``root/train``; ``predict`` samples ``predict_classes`` (ids or folder names,
    all classes by default)."""

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        grayscale: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
        predict_classes: list[int | str] | None = None,
    ) -> None:
        super().__init__(root, image_size, grayscale, batch_size, num_workers, None, max_skip_fraction)
        self.predict_classes = predict_classes

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return  # predict samples the requested classes: no images needed
        super().setup(stage)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the requested class ids (``predict_classes``; all classes by default)."""
        names = self.class_names
        if names is None:
            raise FileNotFoundError(f"ImageFolderGenerationDataModule: {self.root}/train/<class>/ names the classes")
        return ClassRequests(self.predict_classes, names, self.batch_size).loader()


def real_images(datamodule: object, split: str = "test", limit: int | None = None) -> tuple[Tensor, Tensor]:
    """The images and labels of a generation DataModule's split (for reference statistics)."""
    dataset = getattr(datamodule, f"{split}_set")
    if isinstance(dataset, Subset):
        base = dataset.dataset
        assert isinstance(base, TensorDataset)
        idx = torch.as_tensor(dataset.indices)
        x, y = base.tensors[0][idx], base.tensors[1][idx]
    else:
        assert isinstance(dataset, TensorDataset)
        x, y = dataset.tensors
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y
