"""``moezoo bench timeseries``: ETTh1 long-term forecasting, dense vs token-wise MoE vs Seg-MoE (``moe_patchtst``).

For each horizon H and seed, every variant is trained with the forecasting task of ``moezoo fit`` (same data
module, loss, optimiser and schedule) on the standard protocol (12/4/4 months, scaler fitted on train, look-back
L): the weights of the epoch with the lowest validation MSE are restored and evaluated on the whole test split.
Printed: test MSE and MAE on the normalised scale (mean ± std over seeds), the wall time of ``fit`` (training and
per-epoch validation), the test expert-load CV (mean over MoE layers) and the parameter count, then the average
over horizons. On a shared, oversubscribed CPU pass ``--threads 1``: two intra-op threads that wait on each other
cost ~10x the CPU time per step there.

Variants (all ``moe_patchtst_tiny``, active FFN width 128 = PatchTST's ETTh1 ``d_ff``):

- ``dense``: the dense twin (segment size 1, a dense FFN of width 128): PatchTST with pre-norm;
- ``moe``: token-wise MoE, segment size 1 (4 experts of 64, top-1, plus a gated shared expert of 64);
- ``segmoe``: Seg-MoE, the same MoE with segments of [3, 5, 5] patches per block;
- ``segdense``: the Seg-MoE's dense twin (a dense FFN on the same segment views; optional).

``--quick`` is a minutes-long check (fewer epochs, horizons and seeds, every 4th training window); the default is
the full setting (H in 96/192/336/720, 3 seeds, all training windows, up to 30 epochs with early stopping).
The benchmark trains through the Lightning task, so it imports ``moezoo.tasks`` inside :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = "../shared/data/ett/ETTh1.csv"
PUBLISHED = {  # ETTh1, look-back 336, multivariate MSE (PatchTST/42, Nie et al. 2023, Table 3)
    "PatchTST/42": {96: 0.370, 192: 0.413, 336: 0.422, 720: 0.447},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"segment_sizes": 1, "dense": True},
    "moe": {"segment_sizes": 1},
    "segmoe": {"segment_sizes": [3, 5, 5]},
    "segdense": {"segment_sizes": [3, 5, 5], "dense": True},
}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moezoo bench timeseries", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="path of ETTh1.csv (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="H=96, 2 seeds, 3 epochs, batch 32, every 4th train/val window")
    p.add_argument("--seq-len", type=int, default=336)
    p.add_argument("--horizons", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs (val MSE)")
    p.add_argument("--train-stride", type=int, default=None, help="use every n-th training window")
    p.add_argument("--val-stride", type=int, default=None, help="use every n-th validation window (selection only)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--model", default="moe_patchtst_tiny")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write every run's numbers to this JSON file")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --json and skip them")
    args = p.parse_args(argv)
    quick = args.quick
    args.horizons = args.horizons or ([96] if quick else [96, 192, 336, 720])
    args.seeds = args.seeds or ([0, 1] if quick else [0, 1, 2])
    args.variants = args.variants or ["dense", "moe", "segmoe"]
    args.epochs = args.epochs or (3 if quick else 30)
    args.patience = args.patience or (args.epochs if quick else 5)
    args.train_stride = args.train_stride or (4 if quick else 1)
    args.val_stride = args.val_stride or (4 if quick else 1)
    args.batch_size = args.batch_size or (32 if quick else 128)
    return args


def run_one(args: argparse.Namespace, variant: str, horizon: int, seed: int) -> dict[str, float]:
    """Train one variant for one horizon and seed; return its test metrics, time and size."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping

    from moezoo.tasks.timeseries import BestValWeights, CSVForecastDataModule, ForecastingTask

    L.seed_everything(seed, verbose=False)
    data = CSVForecastDataModule(
        args.data,
        seq_len=args.seq_len,
        pred_len=horizon,
        batch_size=args.batch_size,
        train_stride=args.train_stride,
        val_stride=args.val_stride,
    )
    data.setup()
    kwargs = {"seq_len": args.seq_len, "pred_len": horizon, "num_channels": data.num_channels, **VARIANTS[variant]}
    task = ForecastingTask(args.model, kwargs, lr=args.lr, weight_decay=0.01, num_plot_windows=0)
    best = BestValWeights("val/mse")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[best, EarlyStopping("val/mse", patience=args.patience, mode="min")],
    )
    start = time.perf_counter()
    trainer.fit(task, datamodule=data)
    train_s = time.perf_counter() - start
    if best.state is not None:
        task.load_state_dict(best.state)
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    return {
        "mse": float(result["test/mse"]),
        "mae": float(result["test/mae"]),
        "load_cv": float(result.get("test/expert_load_cv", float("nan"))),
        "train_s": train_s,
        "epochs": float(trainer.current_epoch),
        "best_epoch": float(best.epoch),
        "params": float(sum(p.numel() for p in task.model.parameters())),
        "threads": float(torch.get_num_threads()),
    }


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"ETTh1 multivariate, look-back {args.seq_len}, model {args.model}, seeds {args.seeds}, "
        f"max epochs {args.epochs}, batch {args.batch_size}, lr {args.lr}, train/val window stride {args.train_stride}/"
        f"{args.val_stride}; test MSE/MAE on the normalised scale over every test window",
        "",
        "| H | variant | MSE | MAE | train s | epochs (best) | load CV | params | PatchTST/42 MSE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for horizon in args.horizons:
        for variant in args.variants:
            rows = [r for r in runs if r["variant"] == variant and r["horizon"] == horizon]
            if not rows:
                continue
            cv = [r["load_cv"] for r in rows]
            cv_text = "-" if any(c != c for c in cv) else f"{statistics.fmean(cv):.3f}"
            published = PUBLISHED["PatchTST/42"].get(horizon) if args.seq_len == 336 else None
            mse, mae = _mean_std([r["mse"] for r in rows]), _mean_std([r["mae"] for r in rows])
            train_s = statistics.fmean(r["train_s"] for r in rows)
            epochs = statistics.fmean(r["epochs"] for r in rows)
            best_epoch = statistics.fmean(r["best_epoch"] for r in rows) + 1
            lines.append(
                f"| {horizon} | {variant} | {mse} | {mae} | {train_s:.0f} | {epochs:.0f} ({best_epoch:.0f}) | {cv_text}"
                f" | {int(rows[0]['params'])} | {published if published else '-'} |"
            )
    lines += ["", "| variant | mean MSE over horizons | mean MAE over horizons |", "|---|---|---|"]
    for variant in args.variants:
        rows = [r for r in runs if r["variant"] == variant]
        if rows:
            per_h = [
                [r for r in rows if r["horizon"] == h] for h in args.horizons if any(r["horizon"] == h for r in rows)
            ]
            avg_mse = statistics.fmean(statistics.fmean(r["mse"] for r in g) for g in per_h)
            avg_mae = statistics.fmean(statistics.fmean(r["mae"] for r in g) for g in per_h)
            lines.append(f"| {variant} | {avg_mse:.3f} | {avg_mae:.3f} |")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if not Path(args.data).is_file():
        print(f"moezoo bench timeseries: --data {args.data!r} is not a file; pass the path of ETTh1.csv")
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs: list[dict[str, Any]] = []
    if args.resume:
        if not args.json:
            print("moezoo bench timeseries: --resume needs --json FILE (the runs to keep)")
            return 2
        if Path(args.json).is_file():
            runs = json.loads(Path(args.json).read_text())["runs"]
            print(f"resuming: {len(runs)} runs kept from {args.json}")
    done = {(r["variant"], r["horizon"], r["seed"]) for r in runs}
    for horizon in args.horizons:
        for seed in args.seeds:
            for variant in args.variants:
                if (variant, horizon, seed) in done:
                    continue
                metrics = run_one(args, variant, horizon, seed)
                runs.append({"variant": variant, "horizon": horizon, "seed": seed, **metrics})
                print(
                    f"H={horizon} seed={seed} {variant:8s} mse={metrics['mse']:.4f} mae={metrics['mae']:.4f} "
                    f"train={metrics['train_s']:.0f}s epochs={metrics['epochs']:.0f} load_cv={metrics['load_cv']:.3f}",
                    flush=True,
                )
                if args.json:
                    _write_atomic(Path(args.json), json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print()
    print(summarize(runs, args))
    return 0
