"""Crash soak harness: ``moezoo fit`` killed with SIGKILL at seeded random points and resumed until it ends.

:func:`soak` runs a config once uninterrupted (the reference) and then again in real subprocesses, each killed with
SIGKILL at a point drawn from ``random.Random(seed)`` (a random delay within one step's time after its n-th
checkpoint, n random among the steps it has left), and resumed
with ``--ckpt_path`` from a checkpoint of the run folder, until a run ends by itself. :func:`check_run_folder` then
loads every checkpoint, JSON, CSV and YAML file under the run folder and lists stray temporary files.

When the final weights equal the reference's (moezoo's :class:`~moezoo.tasks.callbacks.ResumableRandomState` puts
the global random state back on resume): for a single-process run resumed from a checkpoint written at the end of
an epoch (after its validation, or at its last training batch), bit for bit. A resume from the middle of an epoch is
not exact: Lightning restarts a plain DataLoader at the epoch's first batch (it warns "resuming from a checkpoint
that ended before the epoch ended"), so the resumed epoch sees its first batches again instead of the rest.
``resume="epoch_end"`` therefore resumes from the newest end-of-epoch checkpoint (the soak then asserts equal
weights); ``resume="last"`` from the newest checkpoint of any kind (``last.ckpt``, what a user would do; the soak
then asserts the run ends at the reference's step with intact files, not equal weights).

Run by hand: ``python -m tests.soak configs/smoke/vision_digits_moe_vit.yaml --kills 3 --seed 1``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

KINDS = ("epoch_end", "last")
# What a crash can leave beside a file that is written through a temporary one: moezoo.io's ".<name>.<pid>.<rand>.part",
# Lightning's "<name>.tmp" (save_final_checkpoint) and fsspec's "tmp<rand>" in TMPDIR.
STRAY_SUFFIXES = (".part", ".tmp")
STEPS, EPOCHS = "soak_checkpoints/steps", "soak_checkpoints/epochs"  # every training step; every epoch end


@dataclass
class Attempt:
    """One subprocess: what it resumed from, when it was killed (None: it ended by itself) and its exit code."""

    resumed_from: str | None
    resumed_step: int | None
    killed: str | None
    returncode: int


@dataclass
class SoakResult:
    config: str
    seed: int
    reference_s: float
    attempts: list[Attempt] = field(default_factory=list)
    final_step: int = -1
    reference_step: int = -1
    max_weight_diff: float = float("nan")
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)
    stray_in_tmpdir: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(a.killed is not None for a in self.attempts)


def moezoo_command() -> list[str]:
    """The ``moezoo`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "moezoo"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from moezoo.cli import main; sys.exit(main())"]


def fit_args(config: str | Path, run: Path, test_after_fit: bool) -> list[str]:
    """``moezoo fit`` of ``config`` writing everything under ``run``, with a checkpoint at every training step and
    ``last.ckpt`` (in ``STEPS``) and one at every epoch end, after validation (in ``EPOCHS``); every one is kept
    (``save_top_k=-1``), so every one is checked."""
    args = ["fit", "--config", str(Path(config).resolve()), "--trainer.default_root_dir", str(run)]
    loaded = yaml.safe_load(Path(config).read_text())
    logger = (loaded.get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        args += ["--trainer.logger.init_args.save_dir", str(run)]
    checkpoint = "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"
    args += [checkpoint, f"--trainer.callbacks.dirpath={run / STEPS}", "--trainer.callbacks.save_last=true"]
    args += ["--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.every_n_train_steps=1"]
    args += [checkpoint, f"--trainer.callbacks.dirpath={run / EPOCHS}", "--trainer.callbacks.save_top_k=-1"]
    args += ["--trainer.enable_checkpointing=true", "--test_after_fit", str(test_after_fit).lower()]
    return args


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def pick_resume(run: Path, kind: str) -> tuple[Path | None, int | None]:
    """The checkpoint to resume from: the newest (highest step) one of any kind (``"last"``), or the newest one
    written at an epoch end after validation (``"epoch_end"``). Unreadable checkpoints are skipped
    (:func:`check_run_folder` reports them)."""
    best: tuple[tuple[int, float], Path] | None = None
    folders = [run / EPOCHS] if kind == "epoch_end" else [run / STEPS, run / EPOCHS]
    for path in (p for folder in folders for p in folder.glob("*.ckpt")):
        try:
            checkpoint = _load(path)
        except Exception:  # noqa: BLE001 (a half-written file: reported by check_run_folder, never resumed from)
            continue
        key = (int(checkpoint["global_step"]), path.stat().st_mtime)
        if best is None or key > best[0]:
            best = (key, path)
    return (best[1], best[0][0]) if best else (None, None)


def final_checkpoint(run: Path) -> Path:
    """The newest ``last*.ckpt`` (Lightning names it ``last-v<N>.ckpt`` when a run that did not resume finds one)."""
    return max((run / STEPS).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)


def check_run_folder(run: Path, tmpdir: Path | None = None) -> tuple[int, list[str], list[str]]:
    """Load every ``.ckpt``, ``.json``, ``.csv``, ``.yaml`` file under ``run`` (a CSV's rows must all have the
    header's width) and list stray temporary files. Returns (files checked, problems, strays in ``tmpdir``)."""
    problems, checked = [], 0
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        name = path.name
        if name.endswith(STRAY_SUFFIXES) or ".tmp." in name:
            problems.append(f"stray temporary file {path}")
            continue
        try:
            if path.suffix == ".ckpt":
                checkpoint = _load(path)
                if "state_dict" not in checkpoint:
                    raise ValueError("no state_dict")
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif path.suffix == ".csv":
                rows = list(csv.reader(path.open(newline="")))
                if rows and any(len(row) != len(rows[0]) for row in rows[1:]):
                    raise ValueError("a row does not have the header's width (half-written?)")
            else:
                continue
        except Exception as err:  # noqa: BLE001 (any failure to load is what this check reports)
            problems.append(f"{path}: {type(err).__name__}: {err}")
            continue
        checked += 1
    strays = sorted(str(p) for p in tmpdir.iterdir() if p.is_file()) if tmpdir is not None and tmpdir.is_dir() else []
    return checked, problems, strays


def _step_files(run: Path) -> set[str]:
    return {p.name for p in (run / STEPS).glob("epoch=*-step=*.ckpt")}


def _run(
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    timeout: float,
    run: Path | None = None,
    kill: tuple[int, float] | None = None,
) -> tuple[int, bool]:
    """Run ``cmd`` to its end, or with ``kill=(n, delay)`` SIGKILL it ``delay`` seconds after it has written its
    ``n``-th new step checkpoint under ``run`` (so the kill lands in training, possibly inside a checkpoint write).
    Returns (exit code, killed)."""
    before = _step_files(run) if run is not None else set()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline, kill_at = time.monotonic() + timeout, None
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"{' '.join(cmd)} did not end within {timeout} s; log: {log}")
            if kill is not None and run is not None:
                if kill_at is None and len(_step_files(run) - before) >= kill[0]:
                    kill_at = now + kill[1]
                if kill_at is not None and now >= kill_at:
                    os.killpg(proc.pid, signal.SIGKILL)  # the fit and any DataLoader workers it started
                    proc.wait()
                    return proc.returncode, True
            time.sleep(0.02)
        return proc.returncode, False


def soak(
    config: str | Path,
    workdir: Path,
    *,
    seed: int = 0,
    kills: int = 3,
    resume: str = "epoch_end",
    test_after_fit: bool = False,
    extra_args: tuple[str, ...] = (),
    timeout: float = 600.0,
) -> SoakResult:
    """Soak ``config`` under ``workdir`` (see the module docstring); returns what happened, asserting nothing."""
    if resume not in KINDS:
        raise ValueError(f"resume must be one of {KINDS}, got {resume!r}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    base = moezoo_command()

    reference = workdir / "reference"
    start = time.monotonic()
    command = base + fit_args(config, reference, test_after_fit) + list(extra_args)
    code, _ = _run(command, env, workdir / "reference.log", timeout)
    if code != 0:
        raise RuntimeError(f"the uninterrupted fit of {config} failed ({code}); log: {workdir / 'reference.log'}")
    result = SoakResult(str(config), seed, time.monotonic() - start)
    result.reference_step = int(_load(final_checkpoint(reference))["global_step"])
    times = sorted(p.stat().st_mtime for p in (reference / STEPS).glob("epoch=*-step=*.ckpt"))
    step_s = (times[-1] - times[0]) / max(len(times) - 1, 1)  # the delay after a checkpoint is drawn within a step

    run = workdir / "soak"
    tmpdir = workdir / "tmp"  # fsspec (Lightning's checkpoint writer) stages checkpoints in TMPDIR
    tmpdir.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmpdir)
    for attempt in range(kills + 50):
        ckpt, step = pick_resume(run, resume)
        args = base + fit_args(config, run, test_after_fit) + list(extra_args)
        if ckpt is not None:
            args += ["--ckpt_path", str(ckpt)]
        remaining = result.reference_step - (step or 0)
        kill = (rng.randint(1, remaining), rng.uniform(0.0, step_s)) if result.kills < kills and remaining > 0 else None
        code, killed = _run(args, env, workdir / f"soak{attempt}.log", timeout, run, kill)
        point = f"{kill[1]:.2f} s after the attempt's checkpoint number {kill[0]}" if killed and kill else None
        result.attempts.append(Attempt(str(ckpt) if ckpt else None, step, point, code))
        if not killed:
            if code != 0:
                raise RuntimeError(f"resumed fit of {config} failed ({code}); log: {workdir / f'soak{attempt}.log'}")
            break
    final = _load(final_checkpoint(run))
    result.final_step = int(final["global_step"])
    ref = _load(final_checkpoint(reference))["state_dict"]
    result.max_weight_diff = max(
        (final["state_dict"][k].double() - v.double()).abs().max().item() if v.numel() else 0.0
        for k, v in ref.items()
        if v.is_floating_point()
    )
    result.files_checked, result.problems, result.stray_in_tmpdir = check_run_folder(run, tmpdir)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--workdir", default="runs/soak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--resume", choices=KINDS, default="epoch_end")
    args = parser.parse_args(argv)
    result = soak(args.config, Path(args.workdir), seed=args.seed, kills=args.kills, resume=args.resume)
    print(json.dumps(result.__dict__, default=lambda o: o.__dict__, indent=1))
    return 0 if not result.problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
