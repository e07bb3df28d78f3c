"""Detection data: canvases (the embedded default), a user's COCO-JSON or YOLO-txt dataset, and DeepForest's
real aerial tree images. Nothing downloads.

A sample is ``(image (C, S, S) float in [0, 1], boxes (K, 4) xyxy pixels, labels (K,), domain id, image id)``;
:func:`collate` stacks a batch into a dict with ``targets`` rows ``[image_idx, class, x1, y1, x2, y2]``.
Bad annotations are either a ``ValueError`` naming the file, the value and what is allowed (unknown class id,
malformed rows, a dataset without images) or a counted skip reported in ``skipped`` and warned about naming the file
(boxes outside the image, degenerate boxes, unreadable or corrupt image files; :mod:`moezoo.tasks.records`, which
also makes a split without a readable image, or with more than ``max_skip_fraction`` of them unreadable, an error).

Why one long file: the three sources (canvases, COCO-JSON/YOLO-txt folders, DeepForest) share one sample format,
collate, augmentation and bad-record handling; each reader is a short function beside its data module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from moezoo.tasks.detection.canvases import (
    DIGIT_CLASSES,
    DOMAINS,
    FASHION_CLASSES,
    CanvasSet,
    load_items,
    make_canvases,
    split_items,
)
from moezoo.tasks.records import DEFAULT_MAX_SKIP_FRACTION, BadRecords, check_skip_fraction

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
Sample = tuple[Tensor, Tensor, Tensor, int, int]


def collate(samples: Sequence[Sample]) -> dict[str, Tensor]:
    """Stack samples into ``images (B, C, S, S)``, ``targets (M, 6)``, ``domain (B,)``, ``image_id (B,)``."""
    images = torch.stack([s[0] for s in samples])
    rows = [
        torch.cat([torch.full((len(s[2]), 1), float(i)), s[2].float()[:, None], s[1].float()], 1)
        for i, s in enumerate(samples)
    ]
    targets = torch.cat(rows) if rows else torch.zeros(0, 6)
    return {
        "images": images,
        "targets": targets.reshape(-1, 6),
        "domain": torch.tensor([s[3] for s in samples], dtype=torch.long),
        "image_id": torch.tensor([s[4] for s in samples], dtype=torch.long),
    }


def clip_boxes(boxes: Tensor, width: int, height: int, min_keep: float = 0.4, min_side: float = 2.0) -> Tensor:
    """Keep-mask of boxes that keep ``min_keep`` of their area and ``min_side`` px inside the image (clips in place)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (w >= min_side) & (h >= min_side) & (w * h >= min_keep * area.clamp_min(1e-9))


class AugmentedDataset(Dataset):
    """Training augmentations on a detection dataset: mosaic (optional), scale jitter, horizontal flip."""

    def __init__(self, base: Dataset, hflip: bool, scale_jitter: float, mosaic_prob: float) -> None:
        if not 0 <= scale_jitter < 1:
            raise ValueError(f"scale_jitter must be in [0, 1), got {scale_jitter}")
        if not 0 <= mosaic_prob <= 1:
            raise ValueError(f"mosaic_prob must be in [0, 1], got {mosaic_prob}")
        self.base = base
        self.hflip = hflip
        self.scale_jitter = scale_jitter
        self.mosaic_prob = mosaic_prob

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _mosaic(self, index: int) -> Sample:
        first = self.base[index]
        img, size = first[0], first[0].shape[-1]
        half = size // 2
        others = torch.randint(len(self), (3,)).tolist()
        out = torch.zeros_like(img)
        boxes, labels = [], []
        for q, sample in enumerate([first] + [self.base[i] for i in others]):
            oy, ox = (q // 2) * half, (q % 2) * half
            out[:, oy : oy + half, ox : ox + half] = F.interpolate(
                sample[0][None], size=(half, half), mode="bilinear", antialias=True
            )[0]
            b = sample[1] * (half / size)
            boxes.append(b + torch.tensor([ox, oy, ox, oy], dtype=b.dtype))
            labels.append(sample[2])
        boxes_k4, labels_k = torch.cat(boxes), torch.cat(labels)
        keep = clip_boxes(boxes_k4, size, size, min_side=3.0)
        return out, boxes_k4[keep], labels_k[keep], first[3], first[4]

    def __getitem__(self, index: int) -> Sample:
        if self.mosaic_prob > 0 and float(torch.rand(())) < self.mosaic_prob:
            img, boxes, labels, domain, image_id = self._mosaic(index)
        else:
            img, boxes, labels, domain, image_id = self.base[index]
            boxes = boxes.clone()
        size = img.shape[-1]
        if self.scale_jitter > 0:
            factor = 1.0 + (2 * float(torch.rand(())) - 1) * self.scale_jitter
            new = max(8, int(round(size * factor)))
            scaled = F.interpolate(img[None], size=(new, new), mode="bilinear", antialias=True)[0]
            boxes = boxes * (new / size)
            off = int(torch.randint(abs(new - size) + 1, ()))
            canvas = torch.zeros_like(img)
            if new >= size:
                canvas = scaled[:, off : off + size, off : off + size]
                boxes = boxes - off
            else:
                canvas[:, off : off + new, off : off + new] = scaled
                boxes = boxes + off
            keep = clip_boxes(boxes, size, size)
            img, boxes, labels = canvas.contiguous(), boxes[keep], labels[keep]
        if self.hflip and float(torch.rand(())) < 0.5:
            img = img.flip(-1)
            boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
        return img, boxes, labels, domain, image_id


class CanvasDataset(Dataset):
    def __init__(self, canvases: CanvasSet) -> None:
        self.canvases = canvases

    def __len__(self) -> int:
        return len(self.canvases.domains)

    def __getitem__(self, index: int) -> Sample:
        c = self.canvases
        return c.images[index].float() / 255.0, c.boxes[index], c.labels[index], int(c.domains[index]), index


class _DetectionDataModule(L.LightningDataModule):
    """Shared loaders; subclasses fill ``train_set``, ``val_set``, ``test_set`` in ``setup``."""

    num_classes: int
    class_names: tuple[str, ...]
    in_chans: int
    domain_names: tuple[str, ...] = ("all",)
    #: the key of this module that decides the class count (an init argument, or a name for a fixed count)
    classes_key = "num_classes"

    def __init__(
        self, batch_size: int, num_workers: int, hflip: bool, scale_jitter: float, mosaic_prob: float, augment: bool
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.scale_jitter = scale_jitter
        self.mosaic_prob = mosaic_prob
        self.augment = augment
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.records = BadRecords(type(self).__name__)

    def model_settings(self) -> dict[str, tuple[object, str]]:
        """What the model must match: ``{model kwarg: (value, this module's key)}`` (``moezoo fit`` links them):
        the class count and the image channels (``moe_yolo`` is fully convolutional: any ``img_size`` that is a
        multiple of 32 runs)."""
        return {"num_classes": (self.num_classes, self.classes_key), "in_chans": (self.in_chans, "in_chans")}

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped images and boxes of every split, by reason (:mod:`moezoo.tasks.records`)."""
        return self.records.skipped()

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("setup() has not been run")
        if train and self.augment:
            dataset = AugmentedDataset(dataset, self.hflip, self.scale_jitter, self.mosaic_prob)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class CanvasDataModule(_DetectionDataModule):
    """The embedded default: seeded canvases of real digit or Fashion-MNIST items in a clean and a degraded domain.

    Train, val and test canvases use disjoint item pools (70/10/20 %) and different seeds. Every split mixes
    the two domains (``degraded_frac`` degraded); evaluation reports each domain.
    """

    domain_names = DOMAINS
    in_chans = 1

    def __init__(
        self,
        source: str = "digits",
        items_root: str | None = None,
        img_size: int = 64,
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 1000,
        degraded_frac: float = 0.5,
        min_items: int = 1,
        max_items: int = 3,
        min_size: int = 16,
        max_size: int = 28,
        batch_size: int = 32,
        hflip: bool = False,
        scale_jitter: float = 0.0,
        mosaic_prob: float = 0.0,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, hflip, scale_jitter, mosaic_prob, augment)
        if source not in ("digits", "fashion_mnist"):
            raise ValueError(f"source must be 'digits' or 'fashion_mnist', got {source!r}")
        if img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {img_size}")
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.source = source
        self.items_root = items_root
        self.img_size = img_size
        self.counts = (num_train, num_val, num_test)
        self.canvas_kwargs = dict(
            img_size=img_size,
            degraded_frac=degraded_frac,
            min_items=min_items,
            max_items=max_items,
            min_size=min_size,
            max_size=max_size,
        )
        self.seed = seed
        self.class_names = DIGIT_CLASSES if source == "digits" else FASHION_CLASSES
        self.num_classes = len(self.class_names)

    classes_key = "source"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pool = load_items(self.source, self.items_root)
        self.class_names = pool.class_names
        self.num_classes = len(pool.class_names)
        pools = split_items(pool, (0.7, 0.1, 0.2), self.seed)
        sets = [
            CanvasDataset(make_canvases(p, n, seed=self.seed * 1000 + i, **self.canvas_kwargs))  # type: ignore[arg-type]
            for i, (p, n) in enumerate(zip(pools, self.counts))
        ]
        self.train_set, self.val_set, self.test_set = sets


# -- user datasets ----------------------------------------------------------------------------------------------


def read_image(path: Path, in_chans: int) -> np.ndarray | None:
    """``(H, W, C)`` uint8, or ``None`` for a missing, unreadable or corrupt file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            array = np.asarray(im.convert("L" if in_chans == 1 else "RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    return array[..., None] if array.ndim == 2 else array


def letterbox(image_HWC: np.ndarray, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Resize the longer side to ``size`` and pad to a square (top-left); boxes follow."""
    h, w = image_HWC.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = torch.from_numpy(np.ascontiguousarray(image_HWC)).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(nh, nw), mode="bilinear", antialias=True)[0]
    out = torch.zeros(img.shape[0], size, size)
    out[:, :nh, :nw] = img
    return out, boxes * scale


class ImageBoxDataset(Dataset):
    """Images (decoded and letterboxed once, cached as uint8) with boxes in pixels of the letterboxed image."""

    def __init__(
        self, items: list[tuple[Path, Tensor, Tensor]], img_size: int, in_chans: int, split: str, records: BadRecords
    ) -> None:
        self.images: list[Tensor] = []
        self.boxes: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.paths: list[Path] = []
        for path, boxes, labels in items:
            array = read_image(path, in_chans)
            if array is None:
                records.skip(split, "unreadable_image", str(path), "missing, unreadable or corrupt")
                continue
            h, w = array.shape[:2]
            boxes = boxes.clone()
            keep = clip_boxes(boxes, w, h, min_keep=0.0, min_side=1.0)
            for box in boxes[~keep].tolist():
                records.skip(
                    split, "box_outside_image", f"a box of {path}", f"{box} in a {w}x{h} image", bad=False, whole=False
                )
            img, boxes = letterbox(array, boxes[keep], img_size)
            self.images.append((img * 255).round().to(torch.uint8))
            self.boxes.append(boxes)
            self.labels.append(labels[keep])
            self.paths.append(path)
        records.check(split, len(items))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        return self.images[index].float() / 255.0, self.boxes[index], self.labels[index], 0, index


def read_coco_json(ann_file: Path, image_dir: Path) -> tuple[list[tuple[Path, Tensor, Tensor]], tuple[str, ...]]:
    """COCO instances JSON -> (image path, boxes xyxy, contiguous labels) per image, and the class names."""
    try:
        data = json.loads(Path(ann_file).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read COCO annotation file {ann_file}: {err}") from err
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: a COCO annotation file needs a list under {key!r}")
    if not data["images"]:
        raise ValueError(f"{ann_file}: 'images' is empty; a dataset needs at least one image")
    if not data["categories"]:
        raise ValueError(f"{ann_file}: 'categories' is empty; a dataset needs at least one class")
    cat_ids = sorted(int(c["id"]) for c in data["categories"])
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    contiguous = {cid: i for i, cid in enumerate(cat_ids)}
    per_image: dict[int, list[tuple[list[float], int]]] = {int(im["id"]): [] for im in data["images"]}
    for ann in data["annotations"]:
        if int(ann["category_id"]) not in contiguous:
            raise ValueError(
                f"{ann_file}: annotation {ann.get('id')} has category_id={ann['category_id']}; "
                f"allowed are the declared categories {cat_ids}"
            )
        if int(ann["image_id"]) not in per_image:
            raise ValueError(f"{ann_file}: annotation {ann.get('id')} refers to unknown image_id={ann['image_id']}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{ann_file}: annotation {ann.get('id')} has bbox={bbox!r}; expected [x, y, w, h]")
        x, y, w, h = (float(v) for v in bbox)
        per_image[int(ann["image_id"])].append(([x, y, x + w, y + h], contiguous[int(ann["category_id"])]))
    items = []
    for im in data["images"]:
        anns = per_image[int(im["id"])]
        boxes = torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a[1] for a in anns], dtype=torch.long)
        items.append((Path(image_dir) / im["file_name"], boxes, labels))
    return items, tuple(names[c] for c in cat_ids)


def read_yolo_labels(image_dir: Path, label_dir: Path, num_classes: int) -> list[tuple[Path, Tensor, Tensor]]:
    """Ultralytics layout: ``images/<split>/*.jpg`` with ``labels/<split>/<stem>.txt`` of ``cls cx cy w h``
    (normalised). Boxes come back in normalised xyxy; :class:`YOLOFolderDataset` scales them per image."""
    paths = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {image_dir}")
    items = []
    for path in paths:
        label_file = Path(label_dir) / f"{path.stem}.txt"
        rows: list[list[float]] = []
        if label_file.is_file():
            for line_no, line in enumerate(label_file.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    values = [float(v) for v in parts]
                except ValueError:
                    values = []
                if len(values) != 5 or not all(math.isfinite(v) for v in values) or values[0] != int(values[0]):
                    raise ValueError(
                        f"{label_file}:{line_no}: expected 'class cx cy w h' (an integer class and four finite "
                        f"numbers), got {line.strip()!r}"
                    )
                if not 0 <= int(values[0]) < num_classes:
                    raise ValueError(
                        f"{label_file}:{line_no}: class id {int(values[0])} is unknown; "
                        f"allowed are 0..{num_classes - 1}"
                    )
                rows.append(values)
        values_K5 = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
        cx, cy, w, h = values_K5[:, 1:].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        items.append((path, boxes, values_K5[:, 0].long()))
    return items


class DetectionFolderDataModule(_DetectionDataModule):
    """A user's dataset under ``root`` in COCO-JSON or YOLO-txt form, letterboxed to ``img_size``.

    - ``format="coco"``: ``root/annotations/instances_<split>.json`` and images in ``root/<split>/``;
    - ``format="yolo"``: ``root/images/<split>/`` and ``root/labels/<split>/<stem>.txt``; ``class_names``
      (or ``num_classes``) is required.
    ``test_split`` defaults to the validation split.
    """

    def __init__(
        self,
        root: str,
        format: str = "coco",
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        img_size: int = 320,
        in_chans: int = 3,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        batch_size: int = 16,
        hflip: bool = True,
        scale_jitter: float = 0.2,
        mosaic_prob: float = 0.0,
        augment: bool = True,
        num_workers: int = 0,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        super().__init__(batch_size, num_workers, hflip, scale_jitter, mosaic_prob, augment)
        self.max_skip_fraction = check_skip_fraction(max_skip_fraction)
        if format not in ("coco", "yolo"):
            raise ValueError(f"format must be 'coco' or 'yolo', got {format!r}")
        if img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {img_size}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if format == "yolo" and class_names is None and num_classes is None:
            raise ValueError("format='yolo' needs class_names or num_classes")
        self.root = Path(root)
        self.format = format
        self.img_size = img_size
        self.in_chans = in_chans
        self.splits = (train_split, val_split, test_split or val_split)
        if class_names is not None:
            self.class_names = tuple(class_names)
        else:
            self.class_names = tuple(str(i) for i in range(num_classes or 0))
        self.num_classes = len(self.class_names)
        self.classes_key = "class_names" if class_names is not None else "num_classes"

    def model_settings(self) -> dict[str, tuple[object, str]]:
        """As :meth:`_DetectionDataModule.model_settings`; a COCO dataset's classes are the training annotation
        file's categories (read here, before ``setup``; left out while that file does not exist)."""
        if self.format == "coco":
            ann_file = self.root / "annotations" / f"instances_{self.splits[0]}.json"
            if not ann_file.is_file():
                return {"in_chans": (self.in_chans, "in_chans")}
            _, names = read_coco_json(ann_file, self.root / self.splits[0])
            self.class_names, self.num_classes, self.classes_key = names, len(names), "root"
        return super().model_settings()

    def _split(self, split: str) -> ImageBoxDataset:
        if self.format == "coco":
            items, names = read_coco_json(self.root / "annotations" / f"instances_{split}.json", self.root / split)
            self.class_names, self.num_classes = names, len(names)
            return ImageBoxDataset(items, self.img_size, self.in_chans, split, self.records)
        items = read_yolo_labels(self.root / "images" / split, self.root / "labels" / split, self.num_classes)
        scaled = []
        for path, boxes, labels in items:
            array = read_image(path, self.in_chans)
            if array is None:
                scaled.append((path, boxes, labels))  # counted as unreadable by ImageBoxDataset
                continue
            h, w = array.shape[:2]
            scaled.append((path, boxes * torch.tensor([w, h, w, h], dtype=torch.float32), labels))
        return ImageBoxDataset(scaled, self.img_size, self.in_chans, split, self.records)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.records = BadRecords(str(self.root), self.max_skip_fraction)  # each split checks itself when built
        train, val, test = self.splits
        self.train_set = self._split(train)
        self.val_set = self._split(val)
        self.test_set = self.val_set if test == val else self._split(test)


# -- DeepForest's aerial trees ------------------------------------------------------------------------------------

DEEPFOREST_TRAIN = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")
DEEPFOREST_TEST = ("OSBS_029", "SOAP_061")


def find_deepforest_data(root: str | None = None) -> Path:
    """The ``deepforest/data`` folder: ``root`` itself, or the installed package's folder (found without importing
    deepforest, whose import pulls heavy dependencies)."""
    import importlib.util

    if root is not None:
        folder = Path(root)
    else:
        spec = importlib.util.find_spec("deepforest")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "deepforest's data files were not found: `pip install --no-deps deepforest` (only its data files "
                "are read) or pass root=<folder with the .png and .xml files> (e.g. unzipped from the wheel)"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f"{stem}.{ext}" for stem in DEEPFOREST_TRAIN + DEEPFOREST_TEST for ext in ("png", "xml")
               if not (folder / f"{stem}.{ext}").is_file()]  # fmt: skip
    if missing:
        raise FileNotFoundError(f"deepforest data folder {folder} lacks {missing}")
    return folder


def read_voc_boxes(xml_file: Path) -> Tensor:
    """Pascal-VOC XML -> boxes ``(K, 4)`` xyxy."""
    import xml.etree.ElementTree as ET

    rows = []
    for obj in ET.parse(xml_file).getroot().iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{xml_file}: an <object> without <bndbox>")
        rows.append([float(bb.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")])
    boxes = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
    if bool(torch.isnan(boxes).any()):
        raise ValueError(f"{xml_file}: a <bndbox> lacks one of xmin, ymin, xmax, ymax")
    return boxes


def tile_image(image_HWC: np.ndarray, boxes: Tensor, tile: int, stride: int) -> list[tuple[np.ndarray, Tensor]]:
    """Square tiles (the last row/column flush with the border); boxes clipped, kept when >= 40% inside."""
    h, w = image_HWC.shape[:2]
    ys = sorted({*range(0, max(1, h - tile + 1), stride), max(0, h - tile)})
    xs = sorted({*range(0, max(1, w - tile + 1), stride), max(0, w - tile)})
    tiles = []
    for y in ys:
        for x in xs:
            b = boxes - torch.tensor([x, y, x, y], dtype=torch.float32)
            keep = clip_boxes(b, tile, tile)
            tiles.append((image_HWC[y : y + tile, x : x + tile], b[keep]))
    return tiles


class DeepForestDataModule(_DetectionDataModule):
    """DeepForest's real aerial RGB images with labelled tree crowns (951 boxes, shipped in the ``deepforest``
    wheel): tiles of the two Yellowstone images to train, OSBS_029 and SOAP_061 (98 trees) to validate and test.
    Tiles of ``tile_size`` px are resized to ``img_size``."""

    domain_names = ("aerial",)
    in_chans = 3

    def __init__(
        self,
        root: str | None = None,
        tile_size: int = 200,
        img_size: int = 192,
        batch_size: int = 8,
        hflip: bool = True,
        scale_jitter: float = 0.2,
        mosaic_prob: float = 0.0,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, hflip, scale_jitter, mosaic_prob, augment)
        if img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {img_size}")
        self.root = root
        self.tile_size = tile_size
        self.img_size = img_size
        self.num_classes = 1
        self.class_names = ("Tree",)

    def _tiles(self, folder: Path, stems: Sequence[str], stride: int) -> Dataset:
        samples: list[tuple[Tensor, Tensor]] = []
        for stem in stems:
            array = read_image(folder / f"{stem}.png", 3)
            if array is None:
                raise ValueError(f"cannot read {folder / (stem + '.png')}")
            for tile, boxes in tile_image(array, read_voc_boxes(folder / f"{stem}.xml"), self.tile_size, stride):
                img, b = letterbox(tile, boxes, self.img_size)
                samples.append(((img * 255).round().to(torch.uint8), b))
        return _TileDataset(samples)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        folder = find_deepforest_data(self.root)
        self.train_set = self._tiles(folder, DEEPFOREST_TRAIN, self.tile_size // 2)
        self.val_set = self._tiles(folder, DEEPFOREST_TEST, self.tile_size)
        self.test_set = self.val_set


class _TileDataset(Dataset):
    def __init__(self, samples: list[tuple[Tensor, Tensor]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        img, boxes = self.samples[index]
        return img.float() / 255.0, boxes, torch.zeros(len(boxes), dtype=torch.long), 0, index


def describe(datamodule: Any) -> str:
    """One line: classes, domains and split sizes of a set-up detection data module."""
    sizes = {n: len(getattr(datamodule, f"{n}_set") or []) for n in ("train", "val", "test")}
    return f"{datamodule.num_classes} classes, domains {datamodule.domain_names}, sizes {sizes}"
