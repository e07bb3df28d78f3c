"""Detection data: reproducible canvases with exact boxes, COCO-JSON and YOLO-txt fixtures written here, bad input,
augmentations, DeepForest's trees (skipped when the wheel's data files are absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.tasks.detection.canvases import ItemPool, degrade, load_items, make_canvases
from moezoo.tasks.detection.data import (
    DEEPFOREST_TEST,
    AugmentedDataset,
    CanvasDataModule,
    CanvasDataset,
    DeepForestDataModule,
    DetectionFolderDataModule,
    collate,
    find_deepforest_data,
)


@pytest.fixture(scope="module")
def digits() -> ItemPool:
    return load_items("digits")


def test_canvases_are_reproducible_and_boxes_are_exact(digits):
    a = make_canvases(digits, 12, seed=3, degraded_frac=0.0)
    b = make_canvases(digits, 12, seed=3, degraded_frac=0.0)
    c = make_canvases(digits, 12, seed=4, degraded_frac=0.0)
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert not torch.equal(a.images, c.images)
    thr = 0.25 * 255
    for img, boxes, labels in zip(a.images[:, 0].int(), a.boxes, a.labels):
        assert 1 <= len(boxes) <= 3 and len(labels) == len(boxes)
        inside = torch.zeros_like(img, dtype=torch.bool)
        for x1, y1, x2, y2 in boxes.int().tolist():
            inside[y1:y2, x1:x2] = True
            # Tight: every border row and column of the box holds an item pixel.
            for line in (img[y1, x1:x2], img[y2 - 1, x1:x2], img[y1:y2, x1], img[y1:y2, x2 - 1]):
                assert int(line.max()) >= thr - 1
        outside = torch.cat([img[~inside], torch.zeros(1, dtype=img.dtype)])
        assert int(outside.max()) <= thr + 1  # no item pixel outside every box


def test_degraded_domain_differs(digits):
    clean = make_canvases(digits, 40, seed=0, degraded_frac=0.0)
    mixed = make_canvases(digits, 40, seed=0, degraded_frac=1.0)
    assert mixed.domains.tolist() == [1] * 40 and clean.domains.tolist() == [0] * 40
    # Same items and places (the degradations draw after composing), different pixels.
    assert all(torch.equal(x, y) for x, y in zip(clean.boxes[:1], mixed.boxes[:1]))
    background = clean.images.float() < 1
    assert mixed.images.float()[background].std() > 5  # fog / noise / low light fill the black background
    img, effects = degrade(torch.zeros(16, 16), np.random.default_rng(0))
    assert len(effects) >= 2 and img.shape == (16, 16) and 0 <= float(img.min()) <= float(img.max()) <= 1


def test_canvas_datamodule_and_collate():
    dm = CanvasDataModule(num_train=10, num_val=4, num_test=6, batch_size=4, scale_jitter=0.2, hflip=True)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 4, 6)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 1, 64, 64) and batch["targets"].shape[1] == 6
    assert batch["targets"][:, 0].max() < 4 and batch["domain"].shape == (4,)
    with pytest.raises(ValueError, match="source"):
        CanvasDataModule(source="cifar")
    with pytest.raises(ValueError, match="img_size"):
        CanvasDataModule(img_size=50)


def test_flip_and_scale_jitter_keep_boxes_on_their_items(digits):
    ds = CanvasDataset(make_canvases(digits, 8, seed=1, degraded_frac=0.0))
    torch.manual_seed(0)
    flip = AugmentedDataset(ds, hflip=True, scale_jitter=0.3, mosaic_prob=0.5)
    for i in range(8):
        img, boxes, labels, _, _ = flip[i]
        assert img.shape == (1, 64, 64) and len(boxes) == len(labels)
        for x1, y1, x2, y2 in boxes.round().int().tolist():
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            assert float(img[0, y1:y2, x1:x2].max()) > 0.2  # the box still covers its item


def _png(path: Path, size=(48, 40), value=128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _coco_fixture(root: Path, extra_ann: dict | None = None) -> None:
    for split in ("train", "val"):
        _png(root / split / "a.png")
        _png(root / split / "b.png", size=(96, 48))
        (root / split / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        anns = [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 20, 10]},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [40, 10, 30, 20]},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [200, 100, 10, 10]},  # outside the 96x48 image
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [80, 30, 40, 30]},  # partly outside: clipped
            {"id": 5, "image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5]},
        ] + ([extra_ann] if extra_ann else [])
        data = {
            "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"},
                       {"id": 3, "file_name": "broken.png"}, {"id": 4, "file_name": "a.png"}],
            "annotations": anns,
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        }  # fmt: skip
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def test_coco_json_loader_counts_skips_and_letterboxes(tmp_path):
    _coco_fixture(tmp_path)
    kwargs = dict(format="coco", img_size=96, batch_size=2, augment=False)
    with pytest.warns(UserWarning, match="skip"), pytest.raises(ValueError, match=r"1 of 4 records of the train"):
        DetectionFolderDataModule(str(tmp_path), **kwargs).setup()  # 25 % unreadable > the 5 % default
    dm = DetectionFolderDataModule(str(tmp_path), **kwargs, max_skip_fraction=0.25)
    with pytest.warns(UserWarning, match="skipping .*broken.png in the train split"):
        dm.setup()
    assert dm.class_names == ("cat", "dog") and dm.num_classes == 2
    assert len(dm.train_set) == 3  # broken.png skipped; image 4 (no annotations) kept as a negative
    assert dm.skipped["unreadable_image"] == 2 and dm.skipped["box_outside_image"] == 2  # train + val
    img, boxes, labels, _, _ = dm.train_set[0]  # a.png 48x40 -> scale 2
    assert img.shape == (3, 96, 96) and labels.tolist() == [1]
    assert boxes.tolist() == [[8.0, 8.0, 48.0, 28.0]]
    _, boxes_b, labels_b, _, _ = dm.train_set[1]  # b.png 96x48 -> scale 1; clipped box ends at the border
    assert labels_b.tolist() == [0, 0] and boxes_b.tolist() == [[40, 10, 70, 30], [80, 30, 96, 48]]
    assert len(dm.train_set[2][1]) == 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 96, 96)


def test_coco_json_unknown_category_and_empty_images(tmp_path):
    _coco_fixture(tmp_path, {"id": 9, "image_id": 1, "category_id": 42, "bbox": [0, 0, 4, 4]})
    dm = DetectionFolderDataModule(str(tmp_path), format="coco", img_size=64)
    with pytest.raises(ValueError, match="category_id=42"):
        dm.setup()
    empty = tmp_path / "empty"
    (empty / "annotations").mkdir(parents=True)
    (empty / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]})
    )
    with pytest.raises(ValueError, match="'images' is empty"):
        DetectionFolderDataModule(str(empty), format="coco").setup()


def _yolo_fixture(root: Path, lines: str) -> None:
    for split in ("train", "val"):
        _png(root / "images" / split / "x.png", size=(64, 32))
        _png(root / "images" / split / "y.png", size=(32, 32))
        (root / "images" / split / "z.jpg").write_bytes(b"garbage")
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split / "x.txt").write_text(lines)


def test_yolo_txt_loader(tmp_path):
    _yolo_fixture(tmp_path, "1 0.5 0.5 0.25 0.5\n\n0 1.5 1.5 0.1 0.1\n")
    dm = DetectionFolderDataModule(
        str(tmp_path), format="yolo", class_names=["a", "b"], img_size=64, augment=False, max_skip_fraction=0.5
    )
    with pytest.warns(UserWarning, match="skip"):
        dm.setup()
    assert len(dm.train_set) == 2 and dm.skipped["unreadable_image"] == 2 and dm.skipped["box_outside_image"] == 2
    img, boxes, labels, _, _ = dm.train_set[0]  # x.png 64x32: box centre (32, 16), size 16x16
    assert labels.tolist() == [1] and boxes.tolist() == [[24.0, 8.0, 40.0, 24.0]]
    assert len(dm.train_set[1][1]) == 0  # y.png has no label file: a negative image


@pytest.mark.parametrize(
    "lines,match",
    [("2 0.5 0.5 0.1 0.1\n", "class id 2 is unknown"), ("0 0.5 0.5\n", "expected 'class cx cy w h'")],
)
def test_yolo_txt_bad_rows(tmp_path, lines, match):
    _yolo_fixture(tmp_path, lines)
    dm = DetectionFolderDataModule(str(tmp_path), format="yolo", num_classes=2, img_size=64)
    with pytest.raises(ValueError, match=match):
        dm.setup()


def test_folder_arguments():
    with pytest.raises(ValueError, match="format"):
        DetectionFolderDataModule("x", format="voc")
    with pytest.raises(ValueError, match="class_names or num_classes"):
        DetectionFolderDataModule("x", format="yolo")


def _deepforest_folder() -> Path:
    try:
        return find_deepforest_data()
    except FileNotFoundError:
        pytest.skip("deepforest's data files are not installed (pip install --no-deps deepforest)")


def test_deepforest_test_tiles():
    folder = _deepforest_folder()
    dm = DeepForestDataModule(tile_size=200, img_size=192, augment=False)
    tiles = dm._tiles(folder, DEEPFOREST_TEST, 200)
    assert len(tiles) == 8  # 2 test images of 400x400 -> 4 tiles each
    num_boxes = sum(len(tiles[i][1]) for i in range(len(tiles)))
    assert 90 <= num_boxes <= 130  # 98 trees, some split between tiles
    img, boxes, labels, _, _ = tiles[0]
    assert img.shape == (3, 192, 192) and labels.unique().tolist() == [0]
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= 192
    batch = collate([tiles[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 192, 192)


@pytest.mark.slow
def test_deepforest_datamodule():
    _deepforest_folder()
    dm = DeepForestDataModule(tile_size=200, img_size=192)
    dm.setup()
    assert len(dm.val_set) == 8 and len(dm.train_set) > 50


def test_a_split_of_unreadable_images_is_an_error_naming_them(tmp_path):
    _yolo_fixture(tmp_path, "")
    for path in (tmp_path / "images" / "val").glob("*.png"):
        path.write_bytes(b"")
    dm = DetectionFolderDataModule(str(tmp_path), format="yolo", num_classes=2, img_size=64, max_skip_fraction=0.5)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"the val split has no usable records .*x.png"):
        dm.setup()
