"""Detection canvases composed from real Fashion-MNIST or scikit-learn digit items, with exact boxes.

Each canvas holds 1..``max_items`` items pasted at random scales and places (no two boxes overlapping more than
``max_overlap`` IoU); each box is the tight box of the pasted item's pixels above ``pixel_threshold``. Two visual
domains: ``clean`` (items on black) and ``degraded`` (fog, noise, blur and/or low light, drawn per image).
Everything is reproducible from a seed; train, val and test canvases draw items from disjoint item pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
DOMAINS = ("clean", "degraded")
SOURCES = ("digits", "fashion_mnist")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass
class ItemPool:
    """Item images in [0, 1], ``(N, h, w)`` float32, with integer labels ``(N,)`` and class names."""

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    def subset(self, idx: Tensor) -> ItemPool:
        return ItemPool(self.images[idx], self.labels[idx], self.class_names)


def load_items(source: str, root: str | None = None) -> ItemPool:
    """The real item images: scikit-learn's 1,797 digits (8x8) or Fashion-MNIST's 70,000 items (28x28)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        return ItemPool(images, torch.tensor(digits.target, dtype=torch.long), DIGIT_CLASSES)
    if source == "fashion_mnist":
        from moezoo.tasks.vision.data import read_idx

        folder = Path(root or FASHION_MNIST_DEBIAN_ROOT)
        parts_x, parts_y = [], []
        for prefix in ("train", "t10k"):
            found = [folder / f"{prefix}-{kind}-idx{d}-ubyte{ext}" for kind, d in (("images", 3), ("labels", 1))
                     for ext in (".gz", "")]  # fmt: skip
            img_path = next((p for p in found[:2] if p.is_file()), None)
            lab_path = next((p for p in found[2:] if p.is_file()), None)
            if img_path is None or lab_path is None:
                raise FileNotFoundError(
                    f"Fashion-MNIST IDX files for {prefix!r} not found under {folder}; install Debian's "
                    f"dataset-fashion-mnist (files in {FASHION_MNIST_DEBIAN_ROOT}) or set items_root"
                )
            parts_x.append(torch.from_numpy(read_idx(img_path).astype(np.float32) / 255.0))
            parts_y.append(torch.from_numpy(read_idx(lab_path).astype(np.int64)))
        return ItemPool(torch.cat(parts_x), torch.cat(parts_y), FASHION_CLASSES)
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def split_items(pool: ItemPool, fractions: tuple[float, float, float], seed: int) -> tuple[ItemPool, ...]:
    """Disjoint train / val / test item pools (seeded permutation)."""
    order = torch.randperm(len(pool.labels), generator=torch.Generator().manual_seed(seed))
    n = len(order)
    n_val, n_test = int(n * fractions[1]), int(n * fractions[2])
    return (
        pool.subset(order[: n - n_val - n_test]),
        pool.subset(order[n - n_val - n_test : n - n_test]),
        pool.subset(order[n - n_test :]),
    )


def _gaussian_blur(img_HW: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(3 * sigma))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = img_HW[None, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[0, 0]


def degrade(img_HW: Tensor, rng: np.random.Generator) -> tuple[Tensor, list[str]]:
    """The degraded domain: fog or low light, then noise and/or blur (at least two effects per image)."""
    h, w = img_HW.shape
    effects = []
    x = img_HW
    if rng.random() < 0.5:
        coarse = torch.from_numpy(rng.uniform(0.0, 1.0, (1, 1, 4, 4)).astype(np.float32))
        haze = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        density = float(rng.uniform(0.45, 0.7))
        x = x * (1 - density) + density * (0.55 + 0.35 * haze)
        effects.append("fog")
    else:
        x = x * float(rng.uniform(0.15, 0.35))
        effects.append("low_light")
    if rng.random() < 0.7:
        x = _gaussian_blur(x, float(rng.uniform(0.6, 1.3)))
        effects.append("blur")
    if rng.random() < 0.8 or len(effects) < 2:
        x = x + torch.from_numpy(rng.normal(0.0, rng.uniform(0.05, 0.15), (h, w)).astype(np.float32))
        effects.append("noise")
    return x.clamp(0.0, 1.0), effects


def compose_canvas(
    pool: ItemPool,
    rng: np.random.Generator,
    img_size: int,
    min_items: int,
    max_items: int,
    min_size: int,
    max_size: int,
    max_overlap: float = 0.1,
    pixel_threshold: float = 0.25,
) -> tuple[Tensor, Tensor, Tensor]:
    """One clean canvas ``(img_size, img_size)`` in [0, 1], its boxes ``(K, 4)`` xyxy and labels ``(K,)``."""
    canvas = torch.zeros(img_size, img_size)
    boxes: list[list[int]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(min_items, max_items + 1))):
        for _attempt in range(20):
            idx = int(rng.integers(len(pool.labels)))
            size = int(rng.integers(min_size, max_size + 1))
            item = F.interpolate(pool.images[idx][None, None], size=(size, size), mode="bilinear", antialias=True)
            item = item[0, 0].clamp(0, 1)
            on = item > pixel_threshold
            if not bool(on.any()):
                continue
            rows, cols = on.any(1).nonzero().squeeze(1), on.any(0).nonzero().squeeze(1)
            y0, x0 = int(rng.integers(0, img_size - size + 1)), int(rng.integers(0, img_size - size + 1))
            box = [x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1]
            if boxes and max(_iou(box, other) for other in boxes) > max_overlap:
                continue
            region = canvas[y0 : y0 + size, x0 : x0 + size]
            canvas[y0 : y0 + size, x0 : x0 + size] = torch.maximum(region, item)
            boxes.append(box)
            labels.append(int(pool.labels[idx]))
            break
    return canvas, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long)


def _iou(a: list[int], b: list[int]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class CanvasSet:
    """Canvases as uint8 ``(N, 1, S, S)``, per-image boxes/labels, domain ids ``(N,)`` (0 clean, 1 degraded)."""

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    domains: Tensor
    class_names: tuple[str, ...]


def make_canvases(
    pool: ItemPool,
    num: int,
    seed: int,
    img_size: int = 64,
    degraded_frac: float = 0.5,
    min_items: int = 1,
    max_items: int = 3,
    min_size: int = 16,
    max_size: int = 28,
) -> CanvasSet:
    """``num`` canvases, a ``degraded_frac`` share of them in the degraded domain, reproducible from ``seed``."""
    if not 0 <= degraded_frac <= 1:
        raise ValueError(f"degraded_frac must be in [0, 1], got {degraded_frac}")
    if not 1 <= min_items <= max_items:
        raise ValueError(f"need 1 <= min_items <= max_items, got {min_items}, {max_items}")
    if not 4 <= min_size <= max_size <= img_size:
        raise ValueError(f"need 4 <= min_size <= max_size <= img_size={img_size}, got {min_size}, {max_size}")
    rng = np.random.default_rng(seed)
    images = torch.empty(num, 1, img_size, img_size, dtype=torch.uint8)
    boxes, labels = [], []
    domains = torch.from_numpy((rng.random(num) < degraded_frac).astype(np.int64))
    for i in range(num):
        canvas, b, lab = compose_canvas(pool, rng, img_size, min_items, max_items, min_size, max_size)
        if int(domains[i]) == 1:
            canvas, _ = degrade(canvas, rng)
        images[i, 0] = (canvas * 255).round().to(torch.uint8)
        boxes.append(b)
        labels.append(lab)
    return CanvasSet(images, boxes, labels, domains, pool.class_names)
