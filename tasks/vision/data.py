"""Image classification data: scikit-learn digits (embedded default), Fashion-MNIST IDX files, a user's
ImageFolder or CIFAR root. Nothing downloads: every loader reads local files.

Why one long file: the four sources (digits, Fashion-MNIST, ImageFolder, CIFAR) share one base data module (splits,
loaders, model settings, predict folders); each source adds only its reader.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

from moezoo.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    DIGITS_VALUE_RANGE,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
)
from moezoo.tasks.records import DEFAULT_MAX_SKIP_FRACTION, BadRecords

FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def random_shift(x_BCHW: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by an integer offset in ``[-max_shift, max_shift]`` (zero fill), vectorised."""
    if max_shift <= 0:
        return x_BCHW
    b, _, h, w = x_BCHW.shape
    padded = torch.nn.functional.pad(x_BCHW, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator, device=x_BCHW.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator, device=x_BCHW.device)
    rows = (dy[:, None] + torch.arange(h, device=x_BCHW.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x_BCHW.device))[:, None, None, :]
    batch = torch.arange(b, device=x_BCHW.device)[:, None, None, None]
    chan = torch.arange(x_BCHW.shape[1], device=x_BCHW.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
log = logging.getLogger(__name__)


def list_images(path: str | Path) -> list[Path]:
    """The image files under ``path`` (a flat folder, an ImageFolder tree, or a single image), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"predict_path={str(path)!r} is neither an image file nor a folder of images")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"predict_path={str(path)!r} holds no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


class ImageFileDataset(Dataset):
    """Predict-only images from files, as the training data was prepared: resized to ``image_size`` (square),
    ``in_chans`` channels (grey or RGB), scaled to [0, 1] and normalised with ``mean``/``std``.

    Items are ``(image (C, H, W), name)``, the name relative to the folder given. Files PIL cannot read are
    skipped when the list is built (``skipped``: name -> reason), with a warning.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        from PIL import Image

        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3 for image files, got {in_chans}")
        self.root = Path(path)
        self.image_size = image_size
        self.mode = "L" if in_chans == 1 else "RGB"
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.files: list[Path] = []
        self.skipped: dict[str, str] = {}
        for file in list_images(self.root):
            try:
                with Image.open(file) as image:
                    image.verify()
            except Exception as err:  # PIL raises many types for a damaged file
                self.skipped[self.name(file)] = f"{type(err).__name__}: {err}"
                log.warning("predict: skipped %s (not a readable image: %s)", file, err)
                continue
            self.files.append(file)
        if not self.files:
            raise ValueError(f"predict_path={str(path)!r}: no readable image ({len(self.skipped)} skipped)")

    def name(self, file: Path) -> str:
        return file.name if self.root.is_file() else str(file.relative_to(self.root))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        from PIL import Image

        file = self.files[index]
        with Image.open(file) as opened:
            image = opened.convert(self.mode).resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
        x = torch.from_numpy(array.copy()).view(self.image_size, self.image_size, -1).permute(2, 0, 1)
        return (x - self.mean) / self.std, self.name(file)


class _ArrayImageDataModule(L.LightningDataModule):
    """Images held in memory as normalised tensors; training batches get random shifts (and flips).

    With ``predict_path`` (a folder of images, flat or in class folders, or one image), ``predict`` reads those
    files, prepared as the training data (size, channels, ``mean``/``std``), and needs no training data.
    """

    num_classes: int
    image_size: int
    in_chans: int
    #: per-channel normalisation of the [0, 1]-scaled images (as the training tensors)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __init__(
        self, batch_size: int, num_workers: int, max_shift: int, hflip: bool, seed: int, predict_path: str | None = None
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.predict_path = predict_path
        self.predict_set: ImageFileDataset | None = None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_shift = max_shift
        self.hflip = hflip
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("setup() has not been run")
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers, drop_last=False
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def model_settings(self) -> dict[str, tuple[object, str]]:
        """What the model must match: ``{model kwarg: (value, this module's key)}`` (``moezoo fit`` links them)."""
        return {
            "img_size": (self.image_size, "image_size"),
            "in_chans": (self.in_chans, "in_chans"),
            "num_classes": (self.num_classes, "num_classes"),
        }

    def predict_files(self) -> ImageFileDataset:
        if self.predict_path is None:
            raise RuntimeError("predict_path is not set")
        return ImageFileDataset(self.predict_path, self.image_size, self.in_chans, self.mean, self.std)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_path is None:
            return self._loader(self.test_set, shuffle=False)
        if self.predict_set is None:
            self.predict_set = self.predict_files()
        return self._loader(self.predict_set, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        if self.trainer is None or not self.trainer.training:
            return batch
        x, y = batch
        x = random_shift(x, self.max_shift)
        if self.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y


class DigitsDataModule(_ArrayImageDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits (shipped in the wheel): the seconds-long default.

    Stratification-free seeded split into train / val / test by ``val_fraction`` and ``test_fraction``.
    """

    num_classes = 10
    image_size = 8
    in_chans = 1
    mean, std = (DIGITS_MEAN,), (DIGITS_STD,)
    class_names = tuple(str(i) for i in range(10))

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        max_shift: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        predict_path: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, max_shift, hflip=False, seed=seed, predict_path=predict_path)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be in (0, 1) with a sum < 1, got {val_fraction}, {test_fraction}"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or (stage == "predict" and self.predict_path is not None):
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / DIGITS_VALUE_RANGE
        images = (images - DIGITS_MEAN) / DIGITS_STD
        labels = torch.tensor(digits.target, dtype=torch.long)
        full = TensorDataset(images, labels)
        n = len(full)
        n_test = int(round(n * self.test_fraction))
        n_val = int(round(n * self.val_fraction))
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set, self.test_set = random_split(full, [n - n_val - n_test, n_val, n_test], generator)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.dtype(dtypes[dtype_code]), offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} elements for shape {shape}, found {array.size}")
    return array.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{stem}[.gz] not found under {root}. Install Debian's package (apt-get install dataset-fashion-mnist, "
        f"files in {FASHION_MNIST_DEBIAN_ROOT}) or set data.init_args.root to a folder with the IDX files"
    )


class FashionMNISTDataModule(_ArrayImageDataModule):
    """Fashion-MNIST (or any MNIST-format IDX set) from a local folder: 60k train (minus ``val_size``), 10k test."""

    num_classes = 10
    image_size = 28
    in_chans = 1
    mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    class_names = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str = FASHION_MNIST_DEBIAN_ROOT,
        batch_size: int = 128,
        val_size: int = 5000,
        train_limit: int | None = None,
        max_shift: int = 2,
        hflip: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        predict_path: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, max_shift, hflip, seed, predict_path)
        if val_size < 1:
            raise ValueError(f"val_size must be >= 1, got {val_size}")
        self.root = Path(root)
        self.val_size = val_size
        self.train_limit = train_limit

    @staticmethod
    def load_split(root: Path, split: str) -> tuple[Tensor, Tensor]:
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or (stage == "predict" and self.predict_path is not None):
            return
        x, y = self.load_split(self.root, "train")
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(x), generator=generator)
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        if self.train_limit is not None:
            train_idx = train_idx[: self.train_limit]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(*self.load_split(self.root, "test"))


class CheckedImageFolder(Dataset):
    """torchvision's ``ImageFolder`` listing with bad images skipped, not fatal (:mod:`moezoo.tasks.records`).

    Every file's header is opened here (missing, empty and non-image files are skipped and counted); an image that
    fails to decode later (a JPEG truncated after its header) is skipped when it is read, with a warning naming it,
    and the next image of the split takes its place in the batch.
    """

    def __init__(self, folder: Path, transform: Any, split: str, records: BadRecords) -> None:
        from PIL import Image
        from torchvision import datasets

        listing = datasets.ImageFolder(str(folder))
        self.classes = listing.classes
        self.transform = transform
        self.split = split
        self.records = records
        self.samples: list[tuple[str, int]] = []
        self.broken: set[int] = set()  # samples found corrupt while reading (skipped and counted once)
        for path, label in listing.samples:
            try:
                with Image.open(path):
                    pass
            except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
                records.skip(split, "unreadable_image", path, str(err))
                continue
            self.samples.append((path, label))
        records.check(split, len(listing.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        for attempt in range(len(self.samples)):
            position = (index + attempt) % len(self.samples)
            if position in self.broken:
                continue  # counted once, when it was first read
            path, label = self.samples[position]
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB")
            except (OSError, ValueError) as err:
                self.broken.add(position)
                self.records.skip(self.split, "corrupt_image", path, str(err))
                continue
            return self.transform(rgb), label
        raise ValueError(f"{self.records.source}: no image of the {self.split} split can be decoded")


class ImageFolderDataModule(L.LightningDataModule):
    """A user's ``root/{train,val[,test]}/<class>/*.png`` tree (torchvision ``ImageFolder``), resized and normalised.

    Class names are the ``root/train`` folder names (sorted, as ``ImageFolder`` numbers them). With
    ``predict_path`` (a folder of images, flat or in class folders, or one image) ``predict`` reads those files,
    prepared as the training images; ``root`` may then be left out (the checkpoint carries the class names).
    Unreadable or corrupt images are skipped with a warning naming them; a split with none usable, or with more than
    ``max_skip_fraction`` of its images bad, is an error (:class:`CheckedImageFolder`).
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 32,
        grayscale: bool = False,
        batch_size: int = 128,
        num_workers: int = 2,
        predict_path: str | None = None,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        super().__init__()
        if root is None and predict_path is None:
            raise ValueError("ImageFolderDataModule needs root (root/train/<class>/...) or predict_path (or both)")
        self.root = None if root is None else Path(root)
        self.image_size = image_size
        self.grayscale = grayscale
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.predict_path = predict_path
        self.predict_set: ImageFileDataset | None = None
        self.records = BadRecords(str(self.root), max_skip_fraction)

    @property
    def in_chans(self) -> int:
        return 1 if self.grayscale else 3

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class folder names of ``root/train`` (sorted), or ``None`` without a training folder."""
        train = None if self.root is None else self.root / "train"
        if train is None or not train.is_dir():
            return None
        return tuple(sorted(entry.name for entry in train.iterdir() if entry.is_dir()))

    @property
    def num_classes(self) -> int | None:
        names = self.class_names
        return None if names is None else len(names)

    def model_settings(self) -> dict[str, tuple[object, str]]:
        """What the model must match: ``{model kwarg: (value, this module's key)}`` (``moezoo fit`` links them);
        the class count only when ``root/train`` exists."""
        settings: dict[str, tuple[object, str]] = {
            "img_size": (self.image_size, "image_size"),
            "in_chans": (self.in_chans, "grayscale"),
        }
        if self.num_classes is not None:
            settings["num_classes"] = (self.num_classes, "root")
        return settings

    def _dataset(self, split: str, train: bool) -> Dataset:
        from torchvision import transforms

        if self.root is None:
            raise ValueError(f"ImageFolderDataModule: the {split} split needs root (root/{split}/<class>/)")
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageFolderDataModule: {folder} does not exist (expected root/{split}/<class>/)")
        steps: list = [transforms.Resize((self.image_size, self.image_size))]
        if self.grayscale:
            steps.append(transforms.Grayscale())
        if train:
            steps.append(transforms.RandomHorizontalFlip())
        channels = self.in_chans
        steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
        return CheckedImageFolder(folder, transforms.Compose(steps), split, self.records)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_path is not None:
            return
        self.train_set = self._dataset("train", train=True)
        self.val_set = self._dataset("val", train=False)
        assert self.root is not None  # _dataset checked
        test_dir = self.root / "test"
        self.test_set = self._dataset("test", train=False) if test_dir.is_dir() else self.val_set

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_path`` images, or the test split without it."""
        if self.predict_path is None:
            return self.test_dataloader()
        if self.predict_set is None:
            c = self.in_chans
            self.predict_set = ImageFileDataset(self.predict_path, self.image_size, c, [0.5] * c, [0.5] * c)
        return DataLoader(self.predict_set, batch_size=self.batch_size, num_workers=self.num_workers)


class CIFARUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files and nothing else: the only globals it resolves are the few numpy functions that
    rebuild an array, so a crafted file cannot run code (``pickle.load`` would import and call anything)."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"a CIFAR batch file may only hold dicts, lists, bytes and numpy arrays; it refers to {module}.{name}"
            )
        return super().find_class(module, name)


def read_cifar_batches(root: Path, files: list[str], label_key: str) -> tuple[Tensor, Tensor]:
    """Read CIFAR python-version batch files (pickled dicts with ``data`` (N, 3072) uint8 and labels) with the
    restricted :class:`CIFARUnpickler`."""
    images, labels = [], []
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: point root at the extracted python-version archive folder "
                f"(cifar-10-batches-py or cifar-100-python)"
            )
        with open(path, "rb") as f:
            try:
                batch = CIFARUnpickler(f, encoding="bytes").load()
            except pickle.UnpicklingError as err:
                raise ValueError(f"{path} is not a CIFAR batch file: {err}") from err
        if not isinstance(batch, dict):
            raise ValueError(f"{path} is not a CIFAR batch: expected a pickled dict, got {type(batch).__name__}")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{path} is not a CIFAR batch: expected keys 'data' and {label_key!r}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.tensor(batch[label_key], dtype=torch.long))
    return torch.cat(images).float() / 255.0, torch.cat(labels)


class CIFARDataModule(_ArrayImageDataModule):
    """CIFAR-10/100 from a user's extracted python-version archive folder (never downloads)."""

    image_size = 32
    in_chans = 3
    mean, std = CIFAR_MEAN, CIFAR_STD

    def __init__(
        self,
        root: str,
        num_classes: int = 10,
        batch_size: int = 128,
        val_size: int = 5000,
        max_shift: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        predict_path: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, max_shift, hflip=True, seed=seed, predict_path=predict_path)
        if num_classes not in (10, 100):
            raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")
        self.root = Path(root)
        self.num_classes = num_classes
        self.val_size = val_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or (stage == "predict" and self.predict_path is not None):
            return
        if self.num_classes == 10:
            train_files, test_files, key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
        else:
            train_files, test_files, key = ["train"], ["test"], "fine_labels"
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        x, y = read_cifar_batches(self.root, train_files, key)
        x = (x - mean) / std
        if not 0 < self.val_size < len(x):
            raise ValueError(f"val_size must be in (0, {len(x)}), got {self.val_size}")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        self.val_set = TensorDataset(x[order[: self.val_size]], y[order[: self.val_size]])
        self.train_set = TensorDataset(x[order[self.val_size :]], y[order[self.val_size :]])
        x_test, y_test = read_cifar_batches(self.root, test_files, key)
        self.test_set = TensorDataset((x_test - mean) / std, y_test)
