"""``moezoo bench timeseries``: ETTh1 long-term forecasting, dense vs token-wise MoE vs Seg-MoE (``moe_patchtst``).

Legend: W windows, L look-back, C channels, N = W * C channel series (one sample of the channel-independent model).

For each horizon H and seed, every variant is trained with the forecasting task of ``moezoo fit`` (same data
module, loss, optimiser and schedule) on the standard protocol (12/4/4 months, scaler fitted on train, look-back
L): the weights of the epoch with the lowest validation MSE are restored and evaluated on the whole test split.
Printed: test MSE and MAE on the normalised scale (mean ± std over seeds), the wall time of ``fit`` (training and
per-epoch validation), the test expert-load CV (mean over MoE layers) and the parameter count, then the average
over horizons and the ``moezoo bench tables`` rows. On a shared, oversubscribed CPU pass ``--threads 1``: two
intra-op threads that wait on each other cost ~10x the CPU time per step there.

Variants (all ``moe_patchtst_tiny``, active FFN width 128 = PatchTST's ETTh1 ``d_ff``):

- ``dense``: the dense twin (segment size 1, a dense FFN of width 128): PatchTST with pre-norm;
- ``moe``: token-wise MoE, segment size 1 (4 experts of 64, top-1, plus a gated shared expert of 64);
- ``segmoe``: Seg-MoE, the same MoE with segments of [3, 5, 5] patches per block;
- ``segdense``: the Seg-MoE's dense twin (a dense FFN on the same segment views; optional).

Per run, besides MSE/MAE: the train throughput in *windows* per second of ``fit`` wall time (training windows x
epochs run / fit seconds; one window holds all C = 7 channels, i.e. C channel-independent series), the inference
throughput (windows/s of ``model(x)`` on 256 test windows, :func:`~moezoo.bench.tables.inference_throughput`),
and on the whole test split the expert load per MoE layer, its CV, the dropped fraction and the routing
specialisation by channel (:func:`~moezoo.bench.tables.routing_stats` on the channel-series view: each of the N
series is one sample whose group is its channel, the grouping the channel-independent backbone sees), and the
parameters in total and active per token (router + top-k experts + shared expert; dense: all).

``--quick`` is a minutes-long check (fewer epochs, horizons and seeds, every 4th training window); ``--full`` (or
neither) is the full setting (H in 96/192/336/720, 3 seeds, all training windows, up to 30 epochs with early
stopping). ``--json PATH`` is rewritten atomically after every run in the ``moezoo bench tables`` format (one row
per variant: test MSE averaged over horizons of the mean over seeds) plus the raw ``args`` and ``runs`` that
``--resume`` reads; ``--from-json RAW`` rebuilds the tables and that file from a raw file without training (runs
written before these fields existed have no inference throughput or routing statistics: null in the rows).
The benchmark trains through the Lightning task, so it imports ``moezoo.tasks`` inside its functions.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DOMAIN = "timeseries"
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
# Router column of the tables: "segment_dense" (the Seg-MoE's dense twin) is not "dense", so that the tables pair
# the MoE rows with the one plain dense twin of the same model.
ROUTERS = {"dense": "dense", "moe": "topk", "segmoe": "segment", "segdense": "segment_dense"}
INFER_WINDOWS = 256


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moezoo bench timeseries", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="path of ETTh1.csv (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="H=96, 2 seeds, 3 epochs, batch 32, every 4th train/val window"
    )
    mode.add_argument("--full", action="store_true", help="the full setting (the default)")
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
    p.add_argument("--json", default=None, help="write the tables format and every run's numbers to this JSON file")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --json and skip them")
    p.add_argument("--from-json", default=None, help="no training: tabulate the runs of this raw --json file")
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


def _data_module(args: argparse.Namespace, horizon: int) -> Any:
    from moezoo.tasks.timeseries import CSVForecastDataModule

    data = CSVForecastDataModule(
        args.data,
        seq_len=args.seq_len,
        pred_len=horizon,
        batch_size=args.batch_size,
        train_stride=args.train_stride,
        val_stride=args.val_stride,
    )
    data.setup()
    return data


def _model_kwargs(args: argparse.Namespace, variant: str, horizon: int, num_channels: int) -> dict[str, Any]:
    return {"seq_len": args.seq_len, "pred_len": horizon, "num_channels": num_channels, **VARIANTS[variant]}


def _series_batches(x_WLC: Any, batch_size: int) -> Iterator[tuple[Any, Any]]:
    """The channel-series view ``(x (N, L), channel (N,))`` of windows, N = W * C, series n = window * C + channel
    (the order in which the channel-independent model flattens its batch)."""
    import torch

    num_channels = x_WLC.shape[2]
    for chunk_WLC in x_WLC.split(batch_size):
        series_NL = chunk_WLC.permute(0, 2, 1).reshape(-1, chunk_WLC.shape[1])
        yield series_NL, torch.arange(series_NL.shape[0]) % num_channels


def channel_routing_stats(model: Any, x_WLC: Any, batch_size: int, channel_names: list[str]) -> dict[str, Any]:
    """:func:`~moezoo.bench.tables.routing_stats` of a channel-independent forecaster over windows ``x_WLC``, one
    sample per channel series grouped by its channel ({} for a dense model)."""
    from moezoo.bench.tables import routing_stats

    num_channels, seq_len = x_WLC.shape[2], x_WLC.shape[1]

    def forward_series(series_NL: Any) -> Any:
        return model.forward_with_aux(series_NL.reshape(-1, num_channels, seq_len).permute(0, 2, 1))

    return routing_stats(forward_series, _series_batches(x_WLC, batch_size), channel_names, "channel")


def run_one(args: argparse.Namespace, variant: str, horizon: int, seed: int) -> dict[str, Any]:
    """Train one variant for one horizon and seed; return its test metrics, time, throughput, routing and size."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping

    from moezoo.bench.speech import count_params
    from moezoo.bench.tables import inference_throughput
    from moezoo.tasks.timeseries import BestValWeights, ForecastingTask

    L.seed_everything(seed, verbose=False)
    data = _data_module(args, horizon)
    kwargs = _model_kwargs(args, variant, horizon, data.num_channels)
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": args.lr, "weight_decay": 0.01}}
    task = ForecastingTask(args.model, kwargs, optimizer=optimizer, num_plot_windows=0)
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
    model = task.model.eval()
    test_set = data.datasets["test"]
    x_WLC = torch.stack([test_set[i][0] for i in range(len(test_set))])
    stats = channel_routing_stats(model, x_WLC, args.batch_size, data.columns)
    spread = torch.linspace(0, len(x_WLC) - 1, min(INFER_WINDOWS, len(x_WLC))).long()
    infer = inference_throughput(model, x_WLC[spread], batch_size=args.batch_size)
    total, active = count_params(model)
    epochs = trainer.current_epoch
    train_windows = len(data.datasets["train"])
    return {
        "mse": float(result["test/mse"]),
        "mae": float(result["test/mae"]),
        "load_cv": float(result.get("test/expert_load_cv", float("nan"))),
        "train_s": train_s,
        "epochs": float(epochs),
        "best_epoch": float(best.epoch),
        "params": float(total),
        "threads": float(torch.get_num_threads()),
        "train_windows": train_windows,
        "train_throughput": train_windows * epochs / train_s,
        "infer_throughput": infer,
        "active_params": active,
        "total_params": total,
        "num_channels": data.num_channels,
        "expert_load": stats.get("expert_load"),
        "expert_load_cv": stats.get("expert_load_cv"),
        "dropped_frac": stats.get("dropped_frac"),
        "specialisation": stats.get("specialisation"),
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


# -- the moezoo bench tables format -----------------------------------------------------------------------------
def _finite_mean(values: list[Any]) -> float | None:
    """Mean of the known (not None, not NaN) values; None when there is none."""
    known = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.fmean(known) if known else None


class _Derived:
    """What a run written before the new per-run fields can still be given exactly: its parameter counts (from
    the architecture) and its number of training windows (from the data split), cached per horizon/variant."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data: dict[int, Any] = {}
        self.params: dict[tuple[str, int], tuple[int, int]] = {}

    def _data(self, horizon: int) -> Any:
        if horizon not in self.data:
            if not Path(self.args.data).is_file():
                raise FileNotFoundError(
                    f"--data {self.args.data!r} is not a file: runs without parameter counts need the CSV to "
                    f"rebuild their model and data split; pass the path of ETTh1.csv"
                )
            self.data[horizon] = _data_module(self.args, horizon)
        return self.data[horizon]

    def train_windows(self, run: dict[str, Any]) -> int:
        return (
            int(run["train_windows"]) if "train_windows" in run else len(self._data(run["horizon"]).datasets["train"])
        )

    def param_counts(self, run: dict[str, Any]) -> tuple[int, int]:
        """(active, total)."""
        if "active_params" in run and "total_params" in run:
            return int(run["active_params"]), int(run["total_params"])
        key = (run["variant"], run["horizon"])
        if key not in self.params:
            from moezoo.bench.speech import count_params
            from moezoo.models import create_model

            channels = self._data(run["horizon"]).num_channels
            model = create_model(self.args.model, **_model_kwargs(self.args, *key, channels))
            total, active = count_params(model)
            self.params[key] = (active, total)
        return self.params[key]


def table_rows(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Any]:
    """One :class:`~moezoo.bench.tables.BenchRow` per variant: test MSE averaged over horizons of the per-horizon
    mean over seeds. Throughputs, load CV and dropped fraction are means over the runs that recorded them; the
    expert load and specialisation are those of one run (the shortest horizon, lowest seed: expert indices of
    different runs are unrelated); parameters are those of the shortest horizon (the head grows with H)."""
    from moezoo.bench.tables import BenchRow

    derived = _Derived(args)
    variants = list(dict.fromkeys([*args.variants, *(r["variant"] for r in runs)]))
    rows = []
    for variant in variants:
        vruns = sorted((r for r in runs if r["variant"] == variant), key=lambda r: (r["horizon"], r["seed"]))
        if not vruns:
            continue
        horizons: dict[str, dict[str, Any]] = {}
        for h in sorted({r["horizon"] for r in vruns}):
            hruns = [r for r in vruns if r["horizon"] == h]
            mse, mae = [r["mse"] for r in hruns], [r["mae"] for r in hruns]
            horizons[str(h)] = {
                "mse": statistics.fmean(mse), "mse_std": statistics.stdev(mse) if len(mse) > 1 else 0.0,
                "mae": statistics.fmean(mae), "mae_std": statistics.stdev(mae) if len(mae) > 1 else 0.0,
                "seeds": [r["seed"] for r in hruns],
            }  # fmt: skip
        moe = not VARIANTS[variant].get("dense", False)
        train_rates, derived_rates = [], 0
        for r in vruns:
            if r.get("train_throughput") is not None:
                train_rates.append(r["train_throughput"])
            elif r.get("train_s") and r.get("epochs") is not None:
                train_rates.append(derived.train_windows(r) * r["epochs"] / r["train_s"])
                derived_rates += 1
        cv = _finite_mean([r.get("expert_load_cv") for r in vruns]) if moe else None
        extra: dict[str, Any] = {
            "segment_sizes": VARIANTS[variant]["segment_sizes"],
            "mae": statistics.fmean(h["mae"] for h in horizons.values()),
            "horizons": horizons,
            "seeds": sorted({r["seed"] for r in vruns}),
            "params_horizon": vruns[0]["horizon"],
            "train_s": statistics.fmean(r["train_s"] for r in vruns),
            "runs": len(vruns),
        }
        if derived_rates:
            extra["train_throughput_derived_runs"] = derived_rates
        if moe and cv is None:  # only runs from before routing_stats: the task's batch-mean test CV
            cv = _finite_mean([r.get("load_cv") for r in vruns])
            extra["expert_load_cv_from"] = "test/expert_load_cv (mean over test batches)"
        routed = next((r for r in vruns if r.get("expert_load")), None) if moe else None
        if routed is not None:
            extra["routing_run"] = {"horizon": routed["horizon"], "seed": routed["seed"]}
        active, total = derived.param_counts(vruns[0])
        rows.append(
            BenchRow(
                model=args.model,
                router=ROUTERS[variant],
                metric=statistics.fmean(h["mse"] for h in horizons.values()),
                active_params=active,
                total_params=total,
                train_throughput=statistics.fmean(train_rates) if train_rates else None,
                infer_throughput=_finite_mean([r.get("infer_throughput") for r in vruns]),
                expert_load_cv=cv,
                dropped_frac=_finite_mean([r.get("dropped_frac") for r in vruns]) if moe else None,
                expert_load=routed["expert_load"] if routed is not None else None,
                specialisation=routed["specialisation"] if routed is not None else None,
                extra=extra,
            )
        )
    return rows


def tables_data(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The ``moezoo bench tables`` object plus the raw ``args`` and ``runs`` (what ``--resume`` reads) and, when
    every run recorded its wall time, ``runtime_s`` (their sum)."""
    from dataclasses import asdict

    horizons = sorted({r["horizon"] for r in runs})
    dataset = (
        f"{Path(args.data).name}, multivariate, look-back {args.seq_len}, horizons {horizons}, train/val window "
        f"stride {args.train_stride}/{args.val_stride}, <= {args.epochs} epochs (patience {args.patience}), "
        f"test MSE on the normalised scale (mean over horizons of the mean over seeds)"
    )
    return {
        "domain": DOMAIN,
        "settings": "quick" if args.quick else "full",
        "dataset": dataset,
        "metric": "mse",
        "higher_is_better": False,
        "throughput_unit": "windows/s",
        "rows": [asdict(r) for r in table_rows(runs, args)],
        "args": vars(args),
        "runs": runs,
        **({"runtime_s": round(sum(r["wall_s"] for r in runs), 1)} if all("wall_s" in r for r in runs) else {}),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write :func:`tables_data` atomically with :func:`~moezoo.bench.tables.write_domain_json`."""
    from moezoo.bench.tables import BenchRow, write_domain_json

    header = ("domain", "settings", "dataset", "metric", "higher_is_better", "throughput_unit")
    rows = [BenchRow(**r) for r in data["rows"]]
    extra = {k: v for k, v in data.items() if k not in (*header, "rows")}
    write_domain_json(
        path, DOMAIN, data["settings"], data["dataset"], "mse", False, data["throughput_unit"], rows, extra=extra
    )


def rows_markdown(data: dict[str, Any]) -> str:
    lines = [
        f"moezoo bench tables rows ({data['settings']}): {data['dataset']}",
        "",
        "| model | router | MSE ↓ | active / total params | train windows/s | infer windows/s | load CV | dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in data["rows"]:
        lines.append(
            f"| {r['model']} | {r['router']} | {r['metric']:.4f} | {r['active_params']} / {r['total_params']} "
            f"| {num(r['train_throughput'], '.0f')} | {num(r['infer_throughput'], '.0f')} "
            f"| {num(r['expert_load_cv'], '.3f')} | {num(r['dropped_frac'], '.3f')} |"
        )
    return "\n".join(lines)


def _from_json(args: argparse.Namespace) -> int:
    """Rebuild the tables (and ``--json``) from a raw file: its own ``args`` and ``runs``, no training."""
    raw_path = Path(args.from_json)
    if not raw_path.is_file():
        print(f"moezoo bench timeseries: --from-json {args.from_json!r} is not a file")
        return 2
    raw = json.loads(raw_path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("runs"), list) or not isinstance(raw.get("args"), dict):
        print(f"moezoo bench timeseries: {args.from_json} has no 'args' and 'runs' (write it with --json)")
        return 2
    saved = argparse.Namespace(**{**vars(args), **raw["args"]})
    saved.json, saved.from_json, saved.resume = args.json, args.from_json, False
    if not Path(saved.data).is_file() and Path(args.data).is_file():
        saved.data = args.data  # the raw file's path is relative to where it ran
    runs = raw["runs"]
    data = tables_data(runs, saved)
    print(summarize(runs, saved))
    print()
    print(rows_markdown(data))
    if args.json:
        write_json(Path(args.json), data)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.from_json:
        return _from_json(args)
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
                start = time.perf_counter()
                metrics = run_one(args, variant, horizon, seed)
                wall_s = time.perf_counter() - start
                runs.append({"variant": variant, "horizon": horizon, "seed": seed, **metrics, "wall_s": wall_s})
                print(
                    f"H={horizon} seed={seed} {variant:8s} mse={metrics['mse']:.4f} mae={metrics['mae']:.4f} "
                    f"train={metrics['train_s']:.0f}s epochs={metrics['epochs']:.0f} load_cv={metrics['load_cv']:.3f}",
                    flush=True,
                )
                if args.json:
                    write_json(Path(args.json), tables_data(runs, args))
    if args.json and runs and done >= {(v, h, s) for h in args.horizons for s in args.seeds for v in args.variants}:
        write_json(Path(args.json), tables_data(runs, args))  # all resumed: the file in this format all the same
    print()
    print(summarize(runs, args))
    if runs:
        print()
        print(rows_markdown(tables_data(runs, args)))
    return 0
