"""The README's "Use your own data" commands for every domain, run as written (only the repository's config paths
and the fitted checkpoint substituted) on files a user would have: a folder of PNG/JPEG images with a corrupt one,
JSONL manifests of WAV files, a CSV, a COCO-JSON folder. The image-classification walk-through runs in the default
tier; the other four domains (20-30 s each here) in the slow tier (``pytest -m slow tests/tasks/test_own_data.py``)."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.tasks.test_predict import readme_commands, run_readme

CLASSES = ("circle", "square")


def _shape_image(path: Path, kind: str, rng: np.random.Generator, size: int = 24) -> None:
    """A real image file (PNG or JPEG by suffix): a filled circle or square of a random colour on a random
    background."""
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(0, 100, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(2, 8, 2))
    side = int(rng.integers(10, 15))
    colour = tuple(int(v) for v in rng.integers(150, 256, 3))
    (draw.ellipse if kind == "circle" else draw.rectangle)([x, y, x + side, y + side], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _truncated_jpeg(path: Path, rng: np.random.Generator) -> None:
    """A JPEG cut off half way: the header reads, the pixels do not."""
    _shape_image(path, "circle", rng)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _image_folder(root: Path, per_class: dict[str, int], rng: np.random.Generator) -> None:
    for split, count in per_class.items():
        for kind in CLASSES:
            for i in range(count):
                _shape_image(root / split / kind / f"{kind}{i}.{'png' if i % 2 else 'jpg'}", kind, rng)


def test_readme_own_data_commands_cover_every_domain():
    for config in ("imagefolder_moe_vit", "manifest_moe_conformer", "csv_seg_moe", "imagefolder_dit", "coco_moe_yolo"):
        commands = readme_commands(f"{config}.yaml", "own")
        assert [c.split()[1] for c in commands] == ["fit", "predict"], config
        assert commands[1].endswith("--ckpt_path CKPT")


def test_imagefolder_walkthrough(tmp_path, monkeypatch, caplog):
    """A new user's folder of PNG and JPEG images with one corrupt file: fit trains and names the skipped file,
    validation writes the routing pictures, predict names the classes by their folders and skips a corrupt file."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    _image_folder(tmp_path / "my_images", {"train": 12, "val": 4}, rng)
    _truncated_jpeg(tmp_path / "my_images" / "train" / "circle" / "broken.jpg", rng)  # 1 of 25: under the 5 % limit
    for i, kind in enumerate(("square", "circle", "square")):
        _shape_image(tmp_path / "my_new_images" / f"photo{i}.{'jpg' if i else 'png'}", kind, rng)
    (tmp_path / "my_new_images" / "notes.png").write_bytes(b"not an image")
    _shape_image(tmp_path / "my_new_images" / "cut.jpg", "square", rng, size=64)
    data = (tmp_path / "my_new_images" / "cut.jpg").read_bytes()
    (tmp_path / "my_new_images" / "cut.jpg").write_bytes(data[: len(data) * 3 // 4])  # the header intact
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        out = run_readme("imagefolder_moe_vit.yaml", tmp_path, "own")
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(skipped) == 1 and "my_images/train/circle/broken.jpg in the train split" in skipped[0], skipped
    predict_skips = [r.getMessage() for r in caplog.records if "predict: skipped" in r.getMessage()]
    assert sorted(Path(m.split()[2]).name for m in predict_skips) == ["cut.jpg", "notes.png"], predict_skips

    run_dir = tmp_path / "runs" / "own" / "imagefolder_moe_vit" / "lightning_logs"
    routing = run_dir / "version_0" / "routing"
    loads = sorted(routing.glob("val_step*_expert_load.png"))
    assert loads and all(p.stat().st_size > 0 for p in loads), sorted(routing.iterdir())
    assert sorted(routing.glob("val_step*_specialisation.png"))
    record = json.loads(sorted(routing.glob("val_step*.json"))[-1].read_text())
    assert set(json.dumps(record).split('"')) >= set(CLASSES)  # the per-class routing names the folders

    assert out == run_dir / "version_1" / "predictions"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["file"] for row in rows] == ["photo0.png", "photo1.jpg", "photo2.jpg"]  # notes.png skipped
    assert all(row["class"] in CLASSES and {t["class"] for t in row["top5"]} == set(CLASSES) for row in rows)
    with open(out / "predictions.csv") as f:
        assert [r["class"] for r in csv.DictReader(f)] == [row["class"] for row in rows]


@pytest.mark.slow  # 20-30 s on a shared 2-core machine; the image walk-through stays in the default tier
def test_speech_manifest(tmp_path, monkeypatch):
    import soundfile as sf

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    folder = tmp_path / "my_speech"
    (folder / "new").mkdir(parents=True)
    words = ["one", "two", "three", "four"]
    for split, count in (("train", 8), ("val", 4)):
        lines = []
        for i in range(count):
            name = f"{split}{i}.wav"
            t = np.arange(4000 + 800 * (i % 3)) / 16000
            wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * (i % 4)) * t) + 0.01 * rng.standard_normal(t.size)
            sf.write(folder / name, wave.astype("float32"), 16000)
            lines.append(json.dumps({"audio": name, "text": words[i % 4], "language": "en"}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    sf.write(folder / "new" / "clip.wav", (0.3 * np.sin(np.arange(6000) / 10)).astype("float32"), 16000)
    out = run_readme("manifest_moe_conformer.yaml", tmp_path, "own")
    rows = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert [row["file"] for row in rows] == ["clip.wav"] and isinstance(rows[0]["text"], str)


@pytest.mark.slow  # 20-30 s on a shared 2-core machine; the image walk-through stays in the default tier
def test_timeseries_csv(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    steps = np.arange(300)
    temperature = 15 + 5 * np.sin(2 * np.pi * steps / 48)
    load = 100 + 20 * np.sin(2 * np.pi * steps / 24) + 0.5 * temperature
    frame = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=300, freq="h")})
    frame["temperature"], frame["load"] = temperature.round(3), load.round(3)
    frame.to_csv(tmp_path / "my_series.csv", index=False)
    out = run_readme("csv_seg_moe.yaml", tmp_path, "own")
    with open(out / "forecasts.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["window", "step", "date", "temperature", "load"]  # the target last
    assert [int(r["step"]) for r in table] == list(range(1, 9))
    assert table[0]["date"] == "2024-01-13T12:00:00"  # the hour after the last row (11:00 on day 13)
    assert 50 < np.mean([float(r["load"]) for r in table]) < 150  # the data's units


@pytest.mark.slow  # 20-30 s on a shared 2-core machine; the image walk-through stays in the default tier
def test_generation_imagefolder(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "my_images", {"train": 6, "val": 2}, np.random.default_rng(0))
    out = run_readme("imagefolder_dit.yaml", tmp_path, "own")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["class"], r["grid_row"]) for r in rows] == [("circle", 0), ("square", 1)]
    with Image.open(out / "samples.png") as grid:
        assert grid.height > grid.width // 2  # two rows of two samples


@pytest.mark.slow  # 20-30 s on a shared 2-core machine; the image walk-through stays in the default tier
def test_detection_coco_folder(tmp_path, monkeypatch):
    from PIL import Image, ImageDraw

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    root = tmp_path / "my_boxes"
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    for split, count in (("train", 8), ("val", 4)):
        images, annotations = [], []
        for i in range(count):
            image = Image.new("RGB", (80, 64), (20, 20, 20))
            x, y, side = int(rng.integers(0, 40)), int(rng.integers(0, 30)), int(rng.integers(16, 30))
            kind = i % 2
            (ImageDraw.Draw(image).ellipse if kind == 0 else ImageDraw.Draw(image).rectangle)(
                [x, y, x + side, y + side], fill=(230, 200, 60)
            )
            (root / split).mkdir(parents=True, exist_ok=True)
            image.save(root / split / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": 80, "height": 64})
            annotations.append({"id": i, "image_id": i, "category_id": kind + 1, "bbox": [x, y, side, side]})
        (root / "annotations").mkdir(exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    out = run_readme("coco_moe_yolo.yaml", tmp_path, "own")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(set(r["labels"]) <= {"circle", "square"} for r in rows)
    assert len(list(out.glob("*.png"))) >= 1
