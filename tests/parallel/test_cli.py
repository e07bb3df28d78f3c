"""The documented command: ``torchrun --nproc_per_node 2 -m moezoo.cli fit`` (2 CPU processes, DDP + EP=2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moezoo.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "smoke" / "parallel_digits_moe_vit_ep.yaml"


@pytest.mark.slow
def test_torchrun_fit_then_single_process_test(tmp_path, monkeypatch):
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "moezoo.cli", "fit"]
    command += ["--config", str(CONFIG), "--trainer.devices", "2", "--data.init_args.batch_size", "16"]
    command += ["--trainer.default_root_dir", "run", "--trainer.logger", "false"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Routing summary" in done.stdout
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["state_dict"]["model.blocks.0.ffn.experts.w_in"].shape[0] == 4
    metrics = json.loads(next((tmp_path / "run").rglob("test_metrics.json")).read_text())
    # the smoke model has no buffers: its full state dict counts exactly its parameters, experts at full size
    assert metrics["params/total"] == sum(value.numel() for value in state["state_dict"].values())
    monkeypatch.chdir(tmp_path)
    main(
        ["test", "--config", str(CONFIG), "--trainer.strategy", "auto", "--trainer.logger", "false"]
        + ["--ckpt_path", str(checkpoint)]
    )


@pytest.mark.slow
def test_bench_parallel_reports_time_and_bytes(capsys):
    argv = ["bench", "parallel", "--tokens", "64", "--dim", "16", "--ffn-dim", "32", "--experts", "4"]
    assert main(argv + ["--steps", "2", "--warmup", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    by_name = {row.split("|")[1].strip(): [cell.strip() for cell in row.split("|")[2:-1]] for row in rows[2:]}
    assert set(by_name) == {"1 process", "EP=1 (DP)", "EP=2"}
    moved = {name: [int(cell.replace(",", "")) for cell in cells[2:]] for name, cells in by_name.items()}
    assert moved["EP=2"][0] > 0 and moved["EP=1 (DP)"][0] == 0  # all_to_all only under EP
    assert moved["EP=1 (DP)"][1] > moved["EP=2"][1] == 16 * 4 * 4  # EP=2 all-reduces only the router (D x E fp32)
