"""``moezoo bench surgery``: the evidence for :mod:`moezoo.surgery` (issue 17), two studies.

``moezoo bench surgery upcycle [--domains vision,timeseries,speech] [--steps 100,300] [--seeds 0,1] [--scratch last]
[--trainer.*|--model.*|--data.* VALUE ...]``
  Sparse upcycling against continued dense training. From a released dense twin, for each number S of extra
  training steps, each seed: (a) ``dense``: the dense model trained S more steps; (b) ``upcycled``: the dense model
  upcycled (each FFN cut into 2 halves, 4 copies: 8 experts of half width, top-2, so the MoE costs the dense FLOPs
  per token; virtual-group router, :func:`moezoo.surgery.upcycle`) and trained S steps with (a)'s recipe;
  (c) ``scratch``: the same MoE trained from scratch for the dense twin's training steps plus S (equal *total*
  compute), for the largest S (``--scratch last``), every S (``all``) or none. Each run is ``moezoo fit`` of a
  config in ``configs/surgery/`` with ``--trainer.max_steps`` (and any fit overrides given, e.g.
  ``--data.init_args.preset smoke`` for a smoke run of one domain); the final weights are tested.
  Domains: ``vision`` (``moe_vit_tiny.fmnist_dense``, Fashion-MNIST test accuracy; released after 3870 steps),
  ``timeseries`` (``moe_patchtst_tiny.etth1_dense_336_96``, ETTh1 336->96 test MSE; released after 650 steps) and
  ``speech`` (``moe_conformer_tiny.numbers_dense``, Conformer-CTC on the generated spoken-number corpus, test CER;
  released after 1128 steps).

``moezoo bench surgery prune [--domains vision,timeseries,speech] [--seeds 0,1] [--calib 256]
[--data.init_args.KEY VALUE ...]``
  Expert pruning and merging of a released MoE without retraining: for E, 3E/4, E/2 and E/4 experts kept per
  layer, REAP and frequency pruning (:func:`moezoo.surgery.prune_experts`) and frequency-weighted merging
  (:func:`moezoo.surgery.merge_experts`), each from the statistics of a calibration subset of ``--calib``
  training samples drawn with each seed (:func:`moezoo.surgery.calibrate`); the metric is that of the whole test
  set (``--data.init_args.*`` change a domain's data module, e.g. ``preset smoke`` for a smoke run of speech).
  Domains: ``vision`` (``moe_vit_tiny.digits``, 8 experts top-2, accuracy), ``timeseries``
  (``moe_patchtst_tiny.etth1_seg_336_96``, Seg-MoE, 4 experts top-1 + a shared expert, MSE) and ``speech``
  (``moe_conformer_tiny.numbers_omni``, 4 experts top-1 in all 8 feed-forward modules under one shared
  Omni-Router, so every layer keeps the same experts; CER by the speech task's own test step, on the release's
  recorded data module).

Both write ``--json`` after every run (``--resume`` keeps what is there) and print Markdown tables: mean ± std over
seeds, and a verdict per comparison by the seed-spread rule of :mod:`moezoo.tasks.compare` (a difference counts
only when it exceeds the larger of the two standard deviations).

Why one long file: the two studies share the command line, the JSON store with ``--resume`` and the verdict
rendering (mean ± std, which side wins beyond the spread); each study alone is about half of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moezoo.tasks.bench.runner import RunSpec, merge_overrides
from moezoo.tasks.bench.suite import FIT_PREFIXES, run_pending

VARIANTS = ("dense", "upcycled", "scratch")
DATA_ARGS = "--data.init_args."  # the overrides the prune study passes to its data modules
SCRATCH = ("last", "all", "none")


@dataclass(frozen=True)
class UpcycleDomain:
    """One upcycling study: the release it starts from, the steps it was trained for and the three configs."""

    release: str
    dataset: str
    sunk_steps: int  # optimiser steps of the released dense checkpoint (its model card)
    metric: str
    higher_is_better: bool
    configs: dict[str, str]


UPCYCLE = {
    "vision": UpcycleDomain(
        "moe_vit_tiny.fmnist_dense", "Fashion-MNIST", 3870, "test/acc", True,
        {v: f"configs/surgery/fmnist_{c}.yaml" for v, c in
         zip(VARIANTS, ("dense_continue", "upcycled", "moe_scratch"))},
    ),
    "timeseries": UpcycleDomain(
        "moe_patchtst_tiny.etth1_dense_336_96", "ETTh1 336->96", 650, "test/mse", False,
        {v: f"configs/surgery/etth1_{c}.yaml" for v, c in
         zip(VARIANTS, ("dense_continue", "upcycled", "moe_scratch"))},
    ),
    "speech": UpcycleDomain(
        "moe_conformer_tiny.numbers_dense", "generated spoken numbers", 1128, "test/cer", False,
        {v: f"configs/surgery/numbers_{c}.yaml" for v, c in
         zip(VARIANTS, ("dense_continue", "upcycled", "moe_scratch"))},
    ),
}  # fmt: skip


@dataclass(frozen=True)
class PruneDomain:
    release: str
    dataset: str
    metric: str
    higher_is_better: bool


PRUNE = {
    "vision": PruneDomain("moe_vit_tiny.digits", "scikit-learn digits", "test/acc", True),
    "timeseries": PruneDomain("moe_patchtst_tiny.etth1_seg_336_96", "ETTh1 336->96", "test/mse", False),
    "speech": PruneDomain("moe_conformer_tiny.numbers_omni", "generated spoken numbers", "test/cer", False),
}
PRUNE_METHODS = ("reap", "frequency", "merge")


def _list(values: Sequence[str] | None) -> list[str]:
    return [v for value in values or () for v in value.split(",") if v]


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


def _table_head(title: str, columns: Sequence[str]) -> list[str]:
    return [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _load(path: str | None, resume: bool) -> list[dict[str, Any]]:
    if not (resume and path and Path(path).is_file()):
        return []
    runs = json.loads(Path(path).read_text()).get("runs")
    if not isinstance(runs, list):
        raise ValueError(f"{path} has no 'runs' list")
    return runs


def _save(path: str | None, study: str, args: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    if path:
        from moezoo.io import write_json_atomic

        write_json_atomic(Path(path), {"study": study, "args": args, "runs": runs})


def _verdict_text(metric: str, name: str, a: Sequence[float], baseline: str, b: Sequence[float]) -> str:
    from moezoo.tasks.compare import verdict

    return verdict(metric, name, _mean_std(a), baseline, _mean_std(b)).text


# -- upcycling -----------------------------------------------------------------------------------------------------
def upcycle_runs(
    domains: Sequence[str], steps: Sequence[int], seeds: Sequence[int], scratch: str, fit_overrides: Sequence[str] = ()
) -> list[RunSpec]:
    """Every run of the upcycling study, cheapest first (all dense/upcycled runs before the scratch runs).
    ``fit_overrides`` (``--trainer.*``, ``--model.*``, ``--data.*`` pairs) go to every run; the study's step
    budget replaces any ``--trainer.max_steps`` among them."""
    runs, late = [], []
    for domain in domains:
        spec = UPCYCLE[domain]
        for s in steps:
            for seed in seeds:
                for variant in ("dense", "upcycled"):
                    overrides = merge_overrides(fit_overrides, ("--trainer.max_steps", str(s)))
                    runs.append(RunSpec(f"{domain}/{variant}", seed, spec.configs[variant], overrides, str(s)))
                if scratch == "all" or (scratch == "last" and s == max(steps)):
                    overrides = merge_overrides(fit_overrides, ("--trainer.max_steps", str(spec.sunk_steps + s)))
                    late.append(RunSpec(f"{domain}/scratch", seed, spec.configs["scratch"], overrides, str(s)))
    return runs + late


def upcycle_tables(runs: Sequence[dict[str, Any]]) -> str:
    """One table per domain: rows = extra steps S, columns = the three variants (mean ± std over seeds), and the
    verdicts of the upcycled MoE against each other column."""
    out = []
    for domain, spec in UPCYCLE.items():
        mine = [r for r in runs if r["variant"].startswith(f"{domain}/")]
        if not mine:
            continue
        out += _table_head(
            f"**{domain}**: {spec.release} ({spec.dataset}), {spec.metric} {_arrow(spec.higher_is_better)}, mean ± std "
            f"over seeds (scratch: {spec.sunk_steps} + S steps from random weights)",
            ("extra steps S", "(a) dense + S", "(b) upcycled + S", "(c) MoE from scratch, total compute", "seeds"),
        )
        verdicts = []
        for cell in sorted({r["cell"] for r in mine}, key=int):
            vals = {
                v: [r["metrics"][spec.metric] for r in mine if r["cell"] == cell and r["variant"] == f"{domain}/{v}"]
                for v in VARIANTS
            }
            seeds = sorted({r["seed"] for r in mine if r["cell"] == cell})
            out.append(f"| {cell} | " + " | ".join(_pm(*_mean_std(vals[v])) for v in VARIANTS) + f" | {seeds} |")
            for other in ("dense", "scratch"):
                if vals["upcycled"] and vals[other]:
                    verdicts.append(
                        f"- S={cell}: " + _verdict_text(spec.metric, "upcycled", vals["upcycled"], other, vals[other])
                    )
        out += ["", *verdicts, ""]
    return "\n".join(out)


# -- pruning and merging -------------------------------------------------------------------------------------------
def _prune_data(domain: str, data_args: dict[str, Any]) -> Any:
    """The domain's data module (``data_args``: constructor arguments that replace the study's)."""
    if domain == "vision":
        from moezoo.tasks.vision import DigitsDataModule

        dm: Any = DigitsDataModule(**{"batch_size": 256, **data_args})
    elif domain == "timeseries":
        from moezoo.tasks.timeseries import CSVForecastDataModule

        dm = CSVForecastDataModule(**{"path": "../shared/data/ett/ETTh1.csv", "target": "OT", "features": "M",
                                      "seq_len": 336, "pred_len": 96, "batch_size": 256, **data_args})  # fmt: skip
    else:  # the data module the release records (its corpus, its features)
        from moezoo.models import get_pretrained_cfg
        from moezoo.tasks.zoo.specs import instantiate

        spec = dict(get_pretrained_cfg(PRUNE[domain].release).data)
        dm = instantiate({**spec, "init_args": {**spec.get("init_args", {}), **data_args}})
    dm.setup("fit")
    dm.setup("test")
    return dm


def _calibration_forward(domain: str) -> Callable[[Any, Any], Any] | None:
    """How :func:`moezoo.surgery.calibrate` runs a batch (``None``: its default, the inputs of a tuple)."""
    if domain == "speech":
        return lambda model, batch: model(batch["features"], batch["lengths"])
    return None


def _evaluate(model: Any, dm: Any, domain: str) -> float:
    """The metric of the whole test split: accuracy (vision), MSE on the normalised scale (time series), or the
    speech task's CER (its own test step: CTC decoding, error counts; the release's task with this model)."""
    import torch

    if domain == "speech":
        from moezoo.models import get_pretrained_cfg
        from moezoo.tasks.specs import instantiate_task
        from moezoo.tasks.zoo.evaluation import evaluate_task

        task = instantiate_task(get_pretrained_cfg(PRUNE[domain].release).task)
        task.model = model
        return evaluate_task(task, dm)[PRUNE[domain].metric]
    loader = dm.test_dataloader()
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            if domain == "vision":
                total += float((out.argmax(-1) == y).sum())
            else:
                total += float(((out - y) ** 2).mean(dim=tuple(range(1, y.dim()))).sum())
            count += int(y.shape[0])
    return total / count


def _calibration_loader(dm: Any, size: int, seed: int) -> list[Any]:
    """``size`` training samples drawn with ``seed``, in batches of 64 put together as the training loader does."""
    import torch
    from torch.utils.data import DataLoader, Subset

    train = dm.train_dataloader()
    data = train.dataset
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size].tolist()
    return list(DataLoader(Subset(data, order), batch_size=64, collate_fn=train.collate_fn))


def prune_cells(num_experts: int) -> list[int]:
    """E, 3E/4, E/2, E/4 (rounded, at least 1, distinct)."""
    return list(dict.fromkeys(max(1, round(num_experts * f)) for f in (1.0, 0.75, 0.5, 0.25)))


def run_prune(
    domain: str,
    seeds: Sequence[int],
    calib: int,
    runs: list[dict[str, Any]],
    save: Callable,
    data_args: dict[str, Any] | None = None,
) -> None:
    from moezoo.models import create_model
    from moezoo.surgery import calibrate, merge_experts, moe_layers, prune_experts

    spec = PRUNE[domain]
    dm = _prune_data(domain, data_args or {})
    base = create_model(spec.release, pretrained=True).eval()
    num_experts = next(m.num_experts for _, m in moe_layers(base))
    done = {(r["domain"], r["method"], r["keep"], r["seed"]) for r in runs}
    for seed in seeds:
        stats = None
        for keep in prune_cells(num_experts):
            for method in PRUNE_METHODS if keep < num_experts else ("none",):
                if (domain, method, keep, seed) in done:
                    continue
                start = time.perf_counter()
                if stats is None:
                    stats = calibrate(base, _calibration_loader(dm, calib, seed), _calibration_forward(domain))
                model = copy.deepcopy(base)
                if method in ("reap", "frequency"):
                    prune_experts(model, keep=keep, criterion=method, stats=stats)
                elif method == "merge":
                    merge_experts(model, groups=keep, method="frequency_weighted", stats=stats)
                value = _evaluate(model, dm, domain)
                record = {"domain": domain, "release": spec.release, "method": method, "keep": keep,
                          "num_experts": num_experts, "seed": seed, "calib": calib, spec.metric: value,
                          "params": sum(p.numel() for p in model.parameters()),
                          "wall_s": time.perf_counter() - start}  # fmt: skip
                runs.append(record)
                print(f"[surgery prune] {domain} {method} keep {keep}/{num_experts} seed {seed}: "
                      f"{spec.metric} {value:.4f}", flush=True)  # fmt: skip
                save(runs)


def prune_tables(runs: Sequence[dict[str, Any]]) -> str:
    """One table per domain: rows = experts kept, columns = the methods (mean ± std over calibration seeds)."""
    out = []
    for domain, spec in PRUNE.items():
        mine = [r for r in runs if r["domain"] == domain]
        if not mine:
            continue
        num_experts = mine[0]["num_experts"]
        out += _table_head(
            f"**{domain}**: {spec.release} ({spec.dataset}), {spec.metric} {_arrow(spec.higher_is_better)} of the "
            f"whole test set, mean ± std over calibration subsets ({mine[0]['calib']} training samples each)",
            ("experts kept per layer", "params", "REAP prune", "frequency prune", "frequency-weighted merge"),
        )
        verdicts = []
        for keep in sorted({r["keep"] for r in mine}, reverse=True):
            cells = {m: [r[spec.metric] for r in mine if r["keep"] == keep and r["method"] == m] for m in
                     (*PRUNE_METHODS, "none")}  # fmt: skip
            params = next(r["params"] for r in mine if r["keep"] == keep)
            if keep == num_experts:
                row = [_pm(*_mean_std(cells["none"]))] * 3
            else:
                row = [_pm(*_mean_std(cells[m])) for m in PRUNE_METHODS]
                for other in ("frequency", "merge"):
                    if cells["reap"] and cells[other]:
                        verdicts.append(
                            f"- {keep}/{num_experts}: " + _verdict_text(spec.metric, "reap", cells["reap"], other,
                                                                          cells[other])
                        )  # fmt: skip
            out.append(f"| {keep}/{num_experts} | {params:,} | " + " | ".join(row) + " |")
        out += ["", *verdicts, ""]
    return "\n".join(out)


# -- the command ---------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="moezoo bench surgery",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", choices=("upcycle", "prune"))
    p.add_argument("--domains", nargs="+", default=None, help="comma or space separated: vision, timeseries, speech")
    p.add_argument("--seeds", nargs="+", default=["0,1"], help="training seeds (upcycle), calibration seeds (prune)")
    p.add_argument("--steps", nargs="+", default=["100,300"], help="upcycle: extra training steps S")
    p.add_argument("--scratch", choices=SCRATCH, default="last", help="upcycle: for which S to train (c)")
    p.add_argument("--calib", type=int, default=256, help="prune: calibration samples per seed")
    p.add_argument("--json", default=None, help="write the runs here (after every run)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --json and skip them")
    p.add_argument("--tables", action="store_true", help="only print the tables of --json")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="bench_results/runs/surgery", help="upcycle: folder of the runs' files")
    args, rest = p.parse_known_args(list(argv))
    unknown = [a for a in rest if a.startswith("--") and not a.startswith(FIT_PREFIXES)]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (fit overrides start with {', '.join(FIT_PREFIXES)})")
    try:
        args.fit_overrides = list(merge_overrides(rest))
    except ValueError as err:
        p.error(str(err))
    pairs = dict(zip(args.fit_overrides[::2], args.fit_overrides[1::2]))
    if args.study == "prune" and any(not k.startswith(DATA_ARGS) for k in pairs):
        p.error(f"the prune study takes only {DATA_ARGS}* overrides (its data module's arguments), got {rest}")
    args.data_args = {k[len(DATA_ARGS) :]: yaml.safe_load(v) for k, v in pairs.items() if k.startswith(DATA_ARGS)}
    args.domains = _list(args.domains) or list(UPCYCLE)
    bad = [d for d in args.domains if d not in UPCYCLE]
    if bad:
        p.error(f"--domains: {bad} are unknown; choose from {list(UPCYCLE)}")
    try:
        args.seeds = [int(s) for s in _list(args.seeds)]
        args.steps = [int(s) for s in _list(args.steps)]
    except ValueError:
        p.error("--seeds and --steps must be integers")
    if not args.seeds or any(s < 1 for s in args.steps) or not args.steps:
        p.error("--seeds and --steps need at least one value; steps must be positive")
    if args.calib < 1:
        p.error(f"--calib must be a positive integer, got {args.calib}")
    if (args.resume or args.tables) and not args.json:
        p.error("--resume and --tables need --json FILE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = _load(args.json, args.resume or args.tables)
    tables = upcycle_tables if args.study == "upcycle" else prune_tables
    if args.tables:
        print(tables(runs))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    record_args = {k: v for k, v in vars(args).items() if k not in ("resume", "tables", "json")}

    def save(done: list[dict[str, Any]]) -> None:
        _save(args.json, args.study, record_args, done)

    if args.study == "upcycle":
        todo = upcycle_runs(args.domains, args.steps, args.seeds, args.scratch, args.fit_overrides)
        print(f"moezoo bench surgery upcycle: {len(todo)} runs, {len(runs)} kept", flush=True)

        def show(record: dict[str, Any]) -> str:
            metric = UPCYCLE[record["variant"].split("/")[0]].metric
            return f"{metric} {record['metrics'][metric]:.4f}"

        run_pending(todo, runs, Path(args.out), "surgery upcycle", show, save=save)
    else:
        for domain in args.domains:
            run_prune(domain, args.seeds, args.calib, runs, save, args.data_args)
    save(runs)
    print(tables(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
