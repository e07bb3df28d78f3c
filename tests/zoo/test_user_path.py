"""A user's path through a release: raw input through its recorded transform, the tag's architecture without
weights, a changed head, the Hub folder layout, and cards in the Hugging Face format that run as written."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import moezoo
from moezoo.data import transform_for, transform_from_record
from moezoo.data.transforms import image_input, series_input
from moezoo.models import get_pretrained_cfg, list_models, save_pretrained
from moezoo.models.pretrained import read_record, registered_records
from moezoo.zoo.cards import result_metrics

ROOT = Path(__file__).resolve().parents[2]
CARDS = ROOT / "model_cards"
RELEASES = list_models(pretrained=True)


def test_raw_digits_through_the_transform_give_the_cards_accuracy() -> None:
    """Raw scikit-learn digits (0..16) -> transform_for -> the release: the card's test accuracy, not all 1s."""
    from sklearn.datasets import load_digits

    from moezoo.tasks.vision.data import DigitsDataModule

    datamodule = DigitsDataModule()
    datamodule.setup()
    test_idx = datamodule.test_set.indices  # the card's test split
    digits = load_digits()
    model = moezoo.create_model("moe_vit_tiny.digits", pretrained=True).eval()
    transform = transform_for("moe_vit_tiny.digits")
    assert transform == transform_for(model)
    with torch.no_grad():
        predicted = model(transform(list(digits.images[test_idx]))).argmax(-1).numpy()
        raw = model(torch.tensor(digits.images[test_idx], dtype=torch.float32)[:, None]).argmax(-1)
    accuracy = float((predicted == digits.target[test_idx]).mean())
    assert accuracy == pytest.approx(get_pretrained_cfg("moe_vit_tiny.digits").metrics["test/acc"], abs=1e-4)
    assert (raw == raw.mode().values).float().mean() > 0.9  # what the issue saw: raw pixels collapse to one class


def test_every_release_records_an_input_contract() -> None:
    for path in registered_records():
        name, cfg = read_record(path)
        assert cfg.input.get("kind") in ("image", "audio", "series"), name
        transform_from_record(cfg.input)  # builds


def test_old_records_without_an_input_still_load(tmp_path: Path) -> None:
    data = json.loads((ROOT / "moezoo/weights/moe_vit_tiny.digits.json").read_text())
    del data["cfg"]["input"]
    path = tmp_path / "moe_vit_tiny.digits.json"
    path.write_text(json.dumps(data))
    _, cfg = read_record(path)
    assert cfg.input == {}


def test_image_transform_layouts_resize_and_inverse() -> None:
    transform = transform_from_record(image_input(8, 1, 255, 0.5, 0.5))
    grey = np.full((16, 16), 255, dtype=np.uint8)
    assert transform(grey).shape == (1, 8, 8) and torch.allclose(transform(grey), torch.ones(1, 8, 8))
    rgb_hwc = np.zeros((8, 8, 3), dtype=np.uint8)
    assert transform(rgb_hwc).shape == (1, 8, 8) and torch.allclose(transform(rgb_hwc), -torch.ones(1, 8, 8))
    assert transform(np.zeros((5, 1, 8, 8))).shape == (5, 1, 8, 8)
    assert torch.allclose(transform.inverse(transform(grey)), torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        transform(np.zeros((2, 5, 8, 8)))


def test_series_transform_takes_the_look_back_and_inverts() -> None:
    transform = transform_from_record(series_input(4, ["a", "b"], [1.0, 10.0], [2.0, 5.0]))
    raw = np.arange(12, dtype=np.float64).reshape(6, 2)
    x = transform(raw)
    assert x.shape == (4, 2)
    assert torch.allclose(transform.inverse(x), torch.tensor(raw[-4:], dtype=torch.float32))
    with pytest.raises(ValueError, match="seq_len=4"):
        transform(raw[:3])


def test_speech_transform_matches_the_training_features() -> None:
    pytest.importorskip("torchaudio")
    from moezoo.tasks.speech.data import LogMel

    wave = torch.randn(8000, generator=torch.Generator().manual_seed(0)) * 0.1
    transform = transform_for("moe_conformer_tiny.numbers_omni")
    assert torch.allclose(transform(wave.numpy(), sample_rate=16000), LogMel()(wave))
    assert transform(np.zeros(4000, dtype=np.float32) + 0.01, sample_rate=8000).shape[1] == 80  # resampled


def test_a_tag_without_pretrained_builds_the_tags_architecture() -> None:
    model = moezoo.create_model("moe_conformer_tiny.numbers_omni")
    assert model.head.out_features == 58  # the release's vocabulary, not the size's default
    assert model.pretrained_cfg is get_pretrained_cfg("moe_conformer_tiny.numbers_omni")
    released = moezoo.create_model("moe_conformer_tiny.numbers_omni", pretrained=True)
    assert not torch.equal(model.head.weight, released.head.weight)  # random weights, same shapes
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in released.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "head"),
    [("moe_vit_tiny.digits", {"num_classes": 3}), ("moe_conformer_tiny.numbers_omni", {"vocab_size": 40})],
)
def test_a_changed_head_loads_the_rest_and_warns(
    name: str, head: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    released = moezoo.create_model(name, pretrained=True)
    with caplog.at_level(logging.WARNING, logger="moezoo.models.registry"):
        model = moezoo.create_model(name, pretrained=True, **head)
    assert model.head.out_features == next(iter(head.values()))
    assert "re-initialised" in caplog.text and "head.weight" in caplog.text and str(head) != ""
    body = {k: v for k, v in released.state_dict().items() if not k.startswith("head.")}
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in body.items())


def test_a_non_head_change_with_pretrained_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="size mismatch"):
        moezoo.create_model("moe_vit_tiny.digits", pretrained=True, dim=32)


def test_save_pretrained_round_trip_in_the_hub_layout(tmp_path: Path) -> None:
    """A fine-tuned (changed-head) model saved as config.json + model.safetensors + README.md loads back by path."""
    model = moezoo.create_model("moe_vit_tiny.digits", pretrained=True, num_classes=3).eval()
    with torch.no_grad():
        model.head.weight.mul_(2.0)  # "fine-tuned"
    folder = save_pretrained(model, tmp_path / "my-digits", metrics={"test/acc": 0.5}, dataset="three classes")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = moezoo.create_model(str(folder), pretrained=True).eval()
    x = transform_for(loaded)(np.zeros((8, 8)))[None]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.pretrained_cfg.input == get_pretrained_cfg("moe_vit_tiny.digits").input
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "moezoo" and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    again = moezoo.create_model(str(folder))  # the architecture alone
    assert again.head.out_features == 3
    (folder / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(Exception, match="size|sha256"):
        moezoo.create_model(str(folder), pretrained=True)


def test_save_pretrained_refuses_a_model_not_built_by_create_model() -> None:
    with pytest.raises(ValueError, match="create_model"):
        save_pretrained(torch.nn.Linear(2, 2), "unused")


@pytest.mark.parametrize("name", RELEASES)
def test_card_front_matter_is_huggingface_metadata_in_step_with_the_record(name: str) -> None:
    text = (CARDS / f"{name}.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    cfg = get_pretrained_cfg(name)
    assert meta["library_name"] == "moezoo" and meta["license"] == cfg.license.lower()
    assert meta["datasets"] and meta["tags"] and meta["pipeline_tag"]
    results = meta["model-index"][0]["results"][0]
    recorded = {m["name"]: m["value"] for m in results["metrics"]}
    assert recorded and recorded == pytest.approx(result_metrics(name, cfg))
    for section in ("## Intended use and limits", "## How to use", "### Fine-tune", "## Training data and config",
                    "## Routing statistics", "## Citations"):  # fmt: skip
        assert section in text, (name, section)


@pytest.mark.parametrize("name", RELEASES)
def test_card_how_to_runs_as_written(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = re.search(r"```python\n(.*?)```", (CARDS / f"{name}.md").read_text(), re.S)
    assert code is not None
    exec(compile(code.group(1), f"model_cards/{name}.md", "exec"), {})  # noqa: S102 - our own card
    assert capsys.readouterr().out.strip()


def test_a_hub_id_loads_the_snapshot_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf-hub:owner/repo`` goes through huggingface_hub.snapshot_download (faked here: no network in tests)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = moezoo.create_model("moe_vit_tiny.digits", pretrained=True)
    folder = save_pretrained(model, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id: str, revision: str | None = None, **kwargs: object) -> str:
        calls.append((repo_id, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = moezoo.create_model("hf-hub:someone/my-digits@v1", pretrained=True)
    assert calls == [("someone/my-digits", "v1")]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert transform_for("hf-hub:someone/my-digits").size == (8, 8)
    with pytest.raises(ValueError, match="hf-hub:<owner>/<repo>"):
        moezoo.create_model("hf-hub:no-owner")
