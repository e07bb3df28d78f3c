"""Fuzzing the data loaders with generated corrupt files (hypothesis, default tier, bounded).

For image folders, speech manifests, CSV series and YOLO detection labels, hypothesis writes a small dataset with
good files and generated bad ones (truncated PNG/JPEG/WAV, random bytes under a media extension, empty files, odd
image modes and sizes, NaN/inf audio samples, wrong declared sample rates, CSVs with missing columns, non-numeric
cells, +-inf, huge values, duplicate or unordered timestamps, label rows out of range, of the wrong width or not
numbers). The property, for every loader: it either loads the good records, names every bad one in a
:class:`~moezoo.tasks.records.BadRecordWarning` (and its per-split ledger) and gives only finite batches, or raises a
``ValueError``/``TypeError`` naming the file or the argument; never another exception, never a NaN in a batch.

``MOEZOO_FUZZ_EXAMPLES`` scales the number of examples (default 200, as tests/layers/test_fuzz.py: each loader gets
a share of it: 60 each at the default).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from moezoo.tasks.records import BadRecordWarning

FUZZ_EXAMPLES = int(os.environ.get("MOEZOO_FUZZ_EXAMPLES", "200"))


def fuzz(share: float) -> settings:
    return settings(
        max_examples=max(5, int(FUZZ_EXAMPLES * share)),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )


def _run(load, names: list[str]) -> tuple[BaseException | None, list[str]]:
    """Call ``load()``; return the exception it raised (ValueError/TypeError only: anything else fails the test) and
    the messages of the BadRecordWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load()
        except (ValueError, TypeError) as err:
            error: BaseException | None = err
        else:
            error = None
    messages = [str(w.message) for w in caught if issubclass(w.category, BadRecordWarning)]
    if error is not None:
        text = str(error)
        assert any(name in text for name in names), f"{type(error).__name__} names no file or argument: {text}"
    return error, messages


def _finite(batch) -> None:
    tensors = batch.values() if isinstance(batch, dict) else batch
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            assert torch.isfinite(t).all(), "a NaN or inf reached a batch"


# -- images ----------------------------------------------------------------------------------------------------------


def _png(mode: str = "RGB", size: tuple[int, int] = (6, 5), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(sum(size))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.standard_normal(size[::-1]).astype(np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


IMAGE_GOOD = {
    "rgb": lambda d: ("png", _png()),
    "gray": lambda d: ("png", _png("L")),
    "rgba": lambda d: ("png", _png("RGBA")),
    "palette": lambda d: ("png", _png("P")),
    "bilevel": lambda d: ("png", _png("1")),
    "uint16": lambda d: ("png", _png("I;16")),
    "float_tiff": lambda d: ("tiff", _png("F", fmt="TIFF")),
    "cmyk_jpeg": lambda d: ("jpg", _png("CMYK", fmt="JPEG")),
    "one_pixel": lambda d: ("png", _png(size=(1, 1))),
    "long_strip": lambda d: ("jpg", _png(size=(40, 1), fmt="JPEG")),
}
IMAGE_BAD = {
    "truncated_png": lambda d: ("png", _png(size=(16, 16))[: d.draw(st.integers(0, 60))]),
    "truncated_jpeg": lambda d: (
        "jpg",
        (lambda b: b[: d.draw(st.integers(0, len(b) - 200))])(_png(size=(32, 32), fmt="JPEG")),
    ),
    "random_bytes": lambda d: (d.draw(st.sampled_from(["png", "jpg", "jpeg", "bmp"])), d.draw(st.binary(max_size=64))),
    "zero_bytes": lambda d: ("png", b""),
    "text": lambda d: ("jpg", b"not an image\n" * 3),
}


def _decodes(path: Path) -> bool:
    """The oracle: PIL decodes the whole file."""
    try:
        with Image.open(path) as image:
            image.convert("RGB").load()
    except Exception:  # noqa: BLE001
        return False
    return True


@fuzz(0.3)
@given(data=st.data())
def test_fuzz_image_folder_with_corrupt_files(data):
    from moezoo.tasks.vision.data import ImageFolderDataModule

    kinds = data.draw(st.lists(st.sampled_from(sorted(IMAGE_GOOD) + sorted(IMAGE_BAD)), min_size=0, max_size=6))
    max_skip = data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = []
        for split in ("train", "val"):
            for c, cls in enumerate(("cat", "dog")):
                (root / split / cls).mkdir(parents=True)
                Image.fromarray(np.full((5, 5, 3), 40 * c, np.uint8)).save(root / split / cls / "good.png")
        for i, kind in enumerate(kinds):
            suffix, payload = (IMAGE_GOOD.get(kind) or IMAGE_BAD[kind])(data)
            path = root / "train" / ("cat", "dog")[i % 2] / f"{i}_{kind}.{suffix}"
            path.write_bytes(payload)
            files.append(path)
        dm = ImageFolderDataModule(str(root), image_size=8, batch_size=3, num_workers=0, max_skip_fraction=max_skip)

        def load():
            dm.setup("fit")
            for loader in (dm.train_dataloader(), dm.val_dataloader()):
                for x, y in loader:
                    assert x.shape[1:] == (3, 8, 8) and y.dtype == torch.long
                    _finite((x,))

        error, messages = _run(load, [str(root), "max_skip_fraction"])
        if error is None:
            for path in files:
                named = any(str(path) in m for m in messages)
                assert named == (not _decodes(path)), (path, named, messages)


# -- audio -----------------------------------------------------------------------------------------------------------


def _wav(samples: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype=subtype)
    return out.getvalue()


TONE = (0.3 * np.sin(np.linspace(0, 400, 16000))).astype(np.float32)  # 1 s
AUDIO = {  # kind -> (file bytes, declared rate or None, a bad record?)  (None: depends on what libsndfile reads)
    "good": lambda d: (_wav(TONE), None, False),
    "pcm16_8k": lambda d: (_wav(TONE[::2], 8000, "PCM_16"), None, False),
    "stereo_44k": lambda d: (_wav(np.stack([TONE, TONE], 1), 44100), None, False),
    "declared_right": lambda d: (_wav(TONE), 16000, False),
    "declared_wrong": lambda d: (_wav(TONE), d.draw(st.sampled_from([8000, 22050, 0, -1, "16k", 1.5])), True),
    "truncated": lambda d: ((lambda b: b[: d.draw(st.integers(0, len(b) - 1))])(_wav(TONE)), None, None),
    "bad_header": lambda d: (b"RIFF" + d.draw(st.binary(max_size=60)), None, True),
    "empty_file": lambda d: (b"", None, True),
    "zero_samples": lambda d: (_wav(np.zeros(0, np.float32)), None, True),
    "nan_samples": lambda d: (_wav(np.where(np.arange(16000) % 97 == 0, np.nan, TONE).astype(np.float32)), None, True),
    "inf_samples": lambda d: (_wav(np.where(np.arange(16000) == 5, np.inf, TONE).astype(np.float32)), None, True),
}


@fuzz(0.3)
@given(data=st.data())
def test_fuzz_speech_manifest_with_corrupt_audio(data):
    from moezoo.tasks.speech.data import ManifestDataModule, collate_speech

    kinds = data.draw(st.lists(st.sampled_from(sorted(AUDIO)), min_size=1, max_size=6))
    max_skip = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    preload = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows, expect = [], {}
        for i, kind in enumerate(kinds):
            payload, rate, bad = AUDIO[kind](data)
            (root / f"{i}.wav").write_bytes(payload)
            row = {"id": f"u{i}", "audio": f"{i}.wav", "text": "one"}
            if rate is not None:
                row["sample_rate"] = rate
            rows.append(json.dumps(row))
            expect[f"u{i}"] = bad
        (root / "m.jsonl").write_text("\n".join(rows) + "\n")
        dm = ManifestDataModule(str(root / "m.jsonl"), str(root / "m.jsonl"), batch_size=2, preload=preload,
                                max_skip_fraction=max_skip)  # fmt: skip
        seen: set[str] = set()

        def load():
            dm.setup("fit")
            ds = dm.dataset("train")
            for start in range(0, len(ds), 2):
                batch = collate_speech([ds[i] for i in range(start, min(start + 2, len(ds)))])
                if batch is not None:
                    _finite(batch)
                    seen.update(batch["uids"])

        error, messages = _run(load, [str(root / "m.jsonl"), "ManifestDataModule", "max_skip_fraction"])
        if error is None:
            for uid, bad in expect.items():
                named = [m for m in messages if f"skipping {uid} (" in m]
                assert bool(named) != (uid in seen), (uid, named, seen, messages)  # loaded or named, not both/neither
                if bad is not None:  # a truncated file may still hold a usable (or too short) utterance
                    assert bool(named) == bad, (uid, named, messages)


# -- CSV time series -------------------------------------------------------------------------------------------------

CSV_FAULTS = (
    *("none", "drop_date", "drop_target", "drop_other", "text_cell", "plus_inf", "minus_inf", "nan", "huge"),
    *("empty_file", "header_only", "duplicate_time", "unordered_time", "bad_date", "gap", "constant"),
)


@fuzz(0.3)
@given(fault=st.sampled_from(CSV_FAULTS), row=st.integers(0, 199), features=st.sampled_from(["M", "S"]))
def test_fuzz_csv_series_with_corrupt_cells(fault, row, features):
    import pandas as pd

    from moezoo.tasks.timeseries.data import CSVForecastDataModule

    n = 200
    frame = pd.DataFrame(
        {
            "date": pd.date_range("2020-01-01", periods=n, freq="h").astype(str),
            "a": np.sin(np.arange(n) / 5.0),
            "OT": np.cos(np.arange(n) / 7.0),
        }
    )
    frame = frame.astype(object)
    if fault.startswith("drop_"):
        frame = frame.drop(columns={"drop_date": "date", "drop_target": "OT", "drop_other": "a"}[fault])
    elif fault in ("text_cell", "plus_inf", "minus_inf", "nan", "huge"):
        frame.loc[row, "OT"] = {"text_cell": "n/a?", "plus_inf": "inf", "minus_inf": "-inf", "nan": "",
                                "huge": "1e308"}[fault]  # fmt: skip
    elif fault == "duplicate_time":
        frame.loc[row, "date"] = frame.loc[max(row - 1, 0), "date"]
    elif fault == "unordered_time":
        frame.loc[row, "date"] = "2030-01-01 00:00:00" if row == 0 else "2019-01-01 00:00:00"
    elif fault == "bad_date":
        frame.loc[row, "date"] = "yesterday"
    elif fault == "gap":
        frame = frame.drop(index=row).reset_index(drop=True)
    elif fault == "constant":
        frame["OT"] = 3.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "series.csv"
        if fault == "empty_file":
            path.write_text("")
        elif fault == "header_only":
            path.write_text(",".join(frame.columns) + "\n")
        else:
            frame.to_csv(path, index=False)
        dm = CSVForecastDataModule(str(path), features=features, seq_len=16, pred_len=4, split="ratio", batch_size=8)

        def load():
            dm.setup("fit")
            for loader in (dm.train_dataloader(), dm.val_dataloader()):
                for batch in loader:
                    _finite(batch)

        error, _ = _run(load, ["series.csv", "target", "date_column"])
        clean = fault in ("none", "duplicate_time", "gap", "constant", "drop_other")
        if clean:
            assert error is None, f"{fault}: {error}"
        elif fault != "huge":
            assert error is not None, f"{fault} was accepted"


# -- detection labels (YOLO txt) -------------------------------------------------------------------------------------

LABEL_LINES = {
    "ok": st.just("0 0.5 0.5 0.4 0.4"),
    "out_of_range": st.tuples(st.floats(-2, 3), st.floats(-2, 3), st.floats(-1, 3), st.floats(-1, 3)).map(
        lambda v: "1 " + " ".join(f"{x:.3f}" for x in v)
    ),
    "columns": st.lists(st.just("0.5"), min_size=0, max_size=8)
    .filter(lambda v: len(v) != 4)
    .map(lambda v: " ".join(["0", *v])),
    "non_numeric": st.sampled_from(["0 a b c d", "x 0.5 0.5 0.1 0.1", "0 0.5 0,5 0.1 0.1"]),
    "special": st.sampled_from(["nan", "inf", "-inf", "1e40"]).map(lambda s: f"0 {s} 0.5 0.2 0.2"),
    "special_class": st.sampled_from(["nan", "inf", "-1", "1.5", "7", "1e30"]).map(lambda s: f"{s} 0.5 0.5 0.2 0.2"),
}


@fuzz(0.3)
@given(data=st.data())
def test_fuzz_yolo_labels_with_bad_rows(data):
    from moezoo.tasks.detection.data import DetectionFolderDataModule

    kinds = data.draw(st.lists(st.sampled_from(sorted(LABEL_LINES)), min_size=0, max_size=4))
    lines = [data.draw(LABEL_LINES[k]) for k in kinds]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for split in ("train", "val"):
            (root / "images" / split).mkdir(parents=True)
            (root / "labels" / split).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "images" / split / f"{i}.png")
                (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.3 0.3\n")
        label = root / "labels" / "train" / "0.txt"
        label.write_text("\n".join(["0 0.5 0.5 0.3 0.3", *lines]) + "\n")
        dm = DetectionFolderDataModule(str(root), format="yolo", num_classes=2, img_size=32, batch_size=2,
                                       augment=False, max_skip_fraction=1.0)  # fmt: skip

        def load():
            dm.setup("fit")
            for loader in (dm.train_dataloader(), dm.val_dataloader()):
                for batch in loader:
                    _finite(batch)
                    boxes = batch["targets"][:, 2:]
                    assert ((boxes >= -1e-3) & (boxes <= 32 + 1e-3)).all(), boxes

        error, _ = _run(load, [str(label)])
        bad_rows = [k for k in kinds if k in ("columns", "non_numeric", "special_class")]
        if any(k == "special" for k, line in zip(kinds, lines) if "1e40" not in line):
            bad_rows.append("special")
        if not bad_rows:
            assert error is None, f"{kinds} {lines}: {error}"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_audio_with_non_finite_samples_is_a_bad_file_naming_it(tmp_path, value):
    from moezoo.tasks.speech.data import BadAudioError, load_audio

    path = tmp_path / "x.wav"
    path.write_bytes(_wav(np.where(np.arange(16000) == 3, value, TONE).astype(np.float32)))
    with pytest.raises(BadAudioError, match=r"x\.wav.*(NaN|infinite)"):
        load_audio(path)


def test_audio_shorter_than_one_analysis_window_is_a_bad_file_naming_it(tmp_path):
    """Found by the fuzz: a WAV truncated to a few samples crashed the log-mel features with a RuntimeError."""
    from moezoo.tasks.speech.data import BadAudioError, load_audio

    path = tmp_path / "short.wav"
    path.write_bytes(_wav(TONE[:84]))
    with pytest.raises(BadAudioError, match=r"short\.wav.*too short"):
        load_audio(path)


def test_an_empty_or_header_only_csv_is_an_error_naming_the_file(tmp_path):
    """Found by the fuzz: an empty CSV raised pandas' EmptyDataError without naming the file."""
    from moezoo.tasks.timeseries.data import read_csv_series

    for text in ("", "date,a,OT\n"):
        path = tmp_path / "series.csv"
        path.write_text(text)
        with pytest.raises(ValueError, match=r"series\.csv: .*(cannot read|no rows)"):
            read_csv_series(path)


@pytest.mark.parametrize("row", ["inf 0.5 0.5 0.2 0.2", "nan 0.5 0.5 0.2 0.2", "0 nan 0.5 0.2 0.2", "0 0.5 0.5 inf 1"])
def test_a_yolo_row_with_non_finite_numbers_is_an_error_naming_the_file_and_line(tmp_path, row):
    """Found by the fuzz: a class id of inf raised OverflowError, of nan a ValueError naming nothing."""
    from moezoo.tasks.detection.data import read_yolo_labels

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "lab" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n" + row + "\n")
    with pytest.raises(ValueError, match=r"a\.txt:2: expected 'class cx cy w h'"):
        read_yolo_labels(tmp_path / "img", tmp_path / "lab", num_classes=2)


def test_a_file_found_corrupt_while_reading_is_counted_once_over_epochs(tmp_path):
    """Found while writing the fuzz: an image (or audio file) that fails only when decoded was counted again every
    epoch, so a split at 1 bad file in 21 (under the 5 % ceiling) failed the ceiling in its second epoch."""
    from moezoo.tasks.records import BadRecords
    from moezoo.tasks.vision.data import CheckedImageFolder

    for i in range(20):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / "c" / f"{i}.png")
    jpeg = _png(size=(64, 64), fmt="JPEG")
    (tmp_path / "c" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # the header opens, decoding fails
    records = BadRecords(str(tmp_path))
    ds = CheckedImageFolder(tmp_path, lambda im: torch.zeros(1), "train", records)
    with pytest.warns(BadRecordWarning, match="cut.jpg"):
        for _ in range(3):
            assert len([ds[i] for i in range(len(ds))]) == 21
    assert records.skipped("train") == {"corrupt_image": 1}


def test_boxes_dropped_from_an_image_do_not_make_the_split_empty():
    """Found by the fuzz: two out-of-image boxes in a split of two images made it "a split with no usable records"
    (box skips were subtracted from the image count)."""
    from moezoo.tasks.records import BadRecords

    records = BadRecords("ds")
    with pytest.warns(BadRecordWarning):
        for _ in range(2):
            records.skip("train", "box_outside_image", "a box of a.png", bad=False, whole=False)
    assert records.check("train", 2) == 2
    records.skip("val", "unreadable_image", "b.png")
    with pytest.raises(ValueError, match="no usable records"):
        records.check("val", 1)
