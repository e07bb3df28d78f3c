"""The detection task through the CLI: predict writes drawn images and routing weights; data/model mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", SMOKE, "--trainer.logger", "false"]
    args += ["--model.init_args.model_kwargs.num_classes", "3"]
    with pytest.raises(ValueError, match="num_classes=10"):
        cli_main(args)
