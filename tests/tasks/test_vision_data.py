"""Vision data modules on small fixtures written in the real formats."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.tasks.vision.data import (
    CIFARDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    random_shift,
    read_idx,
)


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_idx_fixture(idx_root):
    dm = FashionMNISTDataModule(root=str(idx_root), batch_size=4, val_size=5)
    dm.setup()
    assert len(dm.train_set) == 25 and len(dm.val_set) == 5 and len(dm.test_set) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and y.dtype == torch.long
    assert read_idx(idx_root / "t10k-labels-idx1-ubyte.gz").tolist() == list(np.arange(10) % 10)


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


def test_digits_split_is_seeded_and_disjoint():
    a, b = DigitsDataModule(seed=1), DigitsDataModule(seed=1)
    a.setup(), b.setup()
    assert a.train_set.indices == b.train_set.indices
    parts = [set(a.train_set.indices), set(a.val_set.indices), set(a.test_set.indices)]
    assert sum(map(len, parts)) == 1797 and len(set.union(*parts)) == 1797
    with pytest.raises(ValueError, match="val_fraction and test_fraction"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5)


def test_random_shift_moves_content_within_bounds():
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    shifted = random_shift(x, 2)
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1.0)  # a shift of <= 2 keeps the pixel inside
    pos = shifted[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert torch.all((rows - 4).abs() <= 2) and torch.all((cols - 4).abs() <= 2)
    assert len(set(pos.tolist())) > 1


def test_image_folder_fixture(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4, num_workers=0)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    assert len(dm.test_set) == 6  # no test/ folder: val is the test set
    with pytest.raises(FileNotFoundError, match="root/train"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup()


def test_cifar_python_batches_fixture(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    dm = CIFARDataModule(str(tmp_path), num_classes=10, batch_size=5, val_size=4)
    dm.setup()
    assert len(dm.train_set) == 16 and len(dm.val_set) == 4 and len(dm.test_set) == 4
    x, _ = dm.train_set[0]
    assert x.shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="python-version archive"):
        CIFARDataModule(str(tmp_path / "nope")).setup()
