"""The detection task through the CLI: predict writes drawn images and routing weights; data/model mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moezoo.tasks.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke" / "detection_canvas_moe_yolo.yaml")


def test_predict_writes_images_and_routing_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "preds"
    # one batch of 8 test canvases; (--trainer.limit_predict_batches 1 can parse as the float 1.0 = 100%)
    args = ["predict", "--config", SMOKE, "--trainer.logger", "false", "--data.init_args.num_test", "8"]
    args += ["--model.init_args.predict_dir", str(out), "--model.init_args.predict_conf", "0.0"]
    cli_main(args)
    images = sorted(out.glob("*.png"))
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(images) == 8 and len(records) == 8
    for record in records:
        assert record["domain"] in ("clean", "degraded")
        assert len(record["routing"]) == 3 and all(len(w) == 2 for w in record["routing"])
        assert sum(record["routing"][0]) == pytest.approx(1.0, abs=1e-5)
        assert len(record["boxes"]) == len(record["scores"]) == len(record["labels"]) > 0


def test_num_classes_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    """A conflicting explicit setting stops before training, naming the model key and the data key."""
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", SMOKE, "--trainer.logger", "false"]
    both = r"model\.init_args\.model_kwargs\.num_classes=3 conflicts with data\.init_args\.source=10"
    with pytest.raises(ValueError, match=both):
        cli_main([*args, "--model.init_args.model_kwargs.num_classes", "3"])
    both = (
        r"model\.init_args\.model_kwargs\.in_chans=3 conflicts with CanvasDataModule\.in_chans \(fixed by the data\)=1"
    )
    with pytest.raises(ValueError, match=both):
        cli_main([*args, "--model.init_args.model_kwargs.in_chans", "3"])


def _config_without_model_settings(tmp_path: Path, data: dict) -> str:
    """The smoke config (which leaves the model's classes and channels to the data) with ``data`` as its data block."""
    config = yaml.safe_load(Path(SMOKE).read_text())
    assert "model_kwargs" not in config["model"]["init_args"]
    config["data"] = data
    path = tmp_path / "detection.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_model_settings_follow_the_detection_data(tmp_path, monkeypatch):
    """Classes and channels come from the data module: canvases (1 channel, 10 classes), a COCO folder (its
    annotation file's categories, RGB) and a YOLO folder (its class names, grayscale)."""
    monkeypatch.chdir(tmp_path)
    canvas = yaml.safe_load(Path(SMOKE).read_text())["data"]
    cli = cli_main(
        ["--config", _config_without_model_settings(tmp_path, canvas), "--trainer.logger", "false"], run=False
    )
    assert (cli.model.model.num_classes, cli.model.model.in_chans) == (10, 1)
    assert cli.model.hparams.data_settings["num_classes"] == {"value": 10, "from": "data.init_args.source"}

    categories = [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 11, "name": "fox"}]
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": categories}
    (tmp_path / "coco" / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    folder = {"class_path": "moezoo.tasks.detection.DetectionFolderDataModule"}
    folder["init_args"] = {"root": str(tmp_path / "coco"), "format": "coco", "img_size": 64}
    config = _config_without_model_settings(tmp_path, folder)
    cli = cli_main(["--config", config, "--trainer.logger", "false"], run=False)
    assert (cli.model.model.num_classes, cli.model.model.in_chans) == (3, 3)
    with pytest.raises(ValueError, match=r"model_kwargs\.num_classes=10 conflicts with data\.init_args\.root=3"):
        cli_main(
            ["--config", config, "--trainer.logger", "false", "--model.init_args.model_kwargs.num_classes", "10"],
            run=False,
        )

    yolo = {"class_path": "moezoo.tasks.detection.DetectionFolderDataModule"}
    yolo["init_args"] = {"root": "x", "format": "yolo", "class_names": ["a", "b"], "in_chans": 1, "img_size": 64}
    cli = cli_main(["--config", _config_without_model_settings(tmp_path, yolo), "--trainer.logger", "false"], run=False)
    assert (cli.model.model.num_classes, cli.model.model.in_chans) == (2, 1)


def test_checkpoint_keeps_the_class_names_it_was_trained_with(tmp_path, monkeypatch):
    """Trained on Fashion-MNIST canvases, predicting digit canvases: the boxes are named by the checkpoint's
    classes (the head's outputs), not by the predict data's."""
    from moezoo.tasks.detection.canvases import DIGIT_CLASSES, FASHION_CLASSES
    from moezoo.tasks.vision.data import FASHION_MNIST_DEBIAN_ROOT

    if not Path(FASHION_MNIST_DEBIAN_ROOT).is_dir():
        pytest.skip(f"Fashion-MNIST not installed ({FASHION_MNIST_DEBIAN_ROOT}; apt-get install dataset-fashion-mnist)")
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", SMOKE, "--data.init_args.source", "fashion_mnist", "--trainer.max_epochs", "1"]
    fit += ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0"]
    cli_main(fit)
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    import torch

    assert torch.load(checkpoints[-1], weights_only=False)["class_names"] == list(FASHION_CLASSES)
    out = tmp_path / "preds"
    predict = ["predict", "--config", SMOKE, "--ckpt_path", str(checkpoints[-1]), "--trainer.logger", "false"]
    predict += ["--data.init_args.num_test", "4", "--model.init_args.predict_dir", str(out)]
    predict += ["--model.init_args.predict_conf", "0.0"]
    cli_main(predict)
    labels = {
        name for line in (out / "predictions.jsonl").read_text().splitlines() for name in json.loads(line)["labels"]
    }
    assert labels and labels <= set(FASHION_CLASSES) and not labels & set(DIGIT_CLASSES)
