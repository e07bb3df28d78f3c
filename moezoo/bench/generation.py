"""``moezoo bench generation [--quick|--full] [--seeds 0,1] [--variants ...] [--json PATH]``: the DiT-MoE table.

Class-conditional Fashion-MNIST generation with ``moe_dit``: the dense twin, softmax top-2 token choice, expert
choice and ProMoE at equal active FFN width per token and equal training steps (``configs/vision/dit_fmnist_*.yaml``).
It is table (a) of ``moezoo bench vision`` (the same code, :func:`moezoo.bench.vision.run_dit`), run on its own as
the ``generation`` domain of ``moezoo bench tables``. Per row, mean +- std over the seeds: FD-FMNIST (Frechet
distance in the feature space of the shipped Fashion-MNIST CNN against the 10k test images; lower is better; not
FID), the CNN's accuracy on class-conditional samples, routing purity (share of a class's tokens on its most used
expert), expert-load CV, training throughput and sampling throughput (images/s, wall clock, this CPU).

``--quick`` (the default): 100 steps of 32, 200 samples with 8 sampler steps, 2 seeds (minutes on a 2-core CPU);
``--full``: 1000 steps of 64, 2000 samples with the configs' sampler, 3 seeds. Options given explicitly override
either; the result then records the settings ``"custom"``. ``--json PATH`` writes the ``moezoo bench tables``
format (domain ``generation``, metric ``fd_fmnist``), rewritten atomically after every finished run, with the raw
per-run records under ``runs``; ``expert_load`` and ``specialisation`` (by class) come from
:func:`moezoo.bench.tables.routing_stats` of the EMA model on 1000 noisy test images.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moezoo.bench.tables import BenchRow, write_domain_json
from moezoo.bench.vision import DIT_VARIANTS, FULL, QUICK, Settings, _init_worker, _run_job, load_config, render

DOMAIN = "generation"
COLUMNS = [("fd_fmnist", "FD-FMNIST (lower better)"), ("sample_acc", "sample acc"),
           ("routing_purity", "routing purity"), ("expert_load_cv", "load CV"), ("train_img_s", "train img/s"),
           ("train_img_cpu_s", "train img/CPU-s"), ("sample_img_s", "sample img/s")]  # fmt: skip
DATASET = "Fashion-MNIST (IDX files), 28x28, 10 classes; FD-FMNIST against the 10k test images"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings, str]:
    """The arguments, the resulting :class:`~moezoo.bench.vision.Settings` and their name (quick/full/custom)."""
    p = argparse.ArgumentParser(prog="moezoo bench generation", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="100 steps of 32, 200 samples, 2 seeds (the default)")
    mode.add_argument("--full", action="store_true", help="1000 steps of 64, 2000 samples, 3 seeds")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (>= 2 for a std)")
    p.add_argument("--variants", default=",".join(DIT_VARIANTS), help=f"comma list of {list(DIT_VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="override the training steps")
    p.add_argument("--batch-size", type=int, default=None, help="override the training batch size")
    p.add_argument("--eval-samples", type=int, default=None, help="override the number of generated samples")
    p.add_argument("--sampling-steps", type=int, default=None, help="override the sampler's steps")
    p.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--workers", type=int, default=1, help="run the (variant, seed) jobs in N processes")
    p.add_argument("--json", default=None, help="write the moezoo bench tables format (and the raw runs) here")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(DIT_VARIANTS))
    if unknown:
        p.error(f"--variants: {unknown} are not allowed; choose from {list(DIT_VARIANTS)}")
    base = FULL if args.full else QUICK
    settings = base
    for key, value in (("dit_steps", args.steps), ("dit_batch", args.batch_size), ("eval_samples", args.eval_samples),
                       ("sampling_steps", args.sampling_steps)):  # fmt: skip
        if value is not None:
            if value < 1:
                p.error(f"--{key.replace('dit_', '').replace('_', '-')} must be >= 1, got {value}")
            settings = replace(settings, **{key: value})
    name = "full" if args.full else "quick"
    if settings != base:
        name = "custom"
    if args.seeds:  # more or fewer seeds keep the settings' name, as a split run that is merged later would
        settings = replace(settings, seeds=tuple(int(s) for s in args.seeds.split(",")))
    return args, settings, name


def bench_rows(runs: list[dict[str, Any]]) -> list[BenchRow]:
    """One tables-format row per variant: seed means of :func:`moezoo.bench.vision.run_dit`'s numbers."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            values = [float(r[key]) for r in rs if not math.isnan(float(r[key]))]
            return statistics.fmean(values) if values else None

        def std(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            values = [float(r[key]) for r in rs if not math.isnan(float(r[key]))]
            return statistics.stdev(values) if len(values) > 1 else None

        extra: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"],
                                 "batch_size": rs[0]["batch_size"], "eval_samples": rs[0]["eval_samples"],
                                 "sampling_steps": rs[0]["sampling_steps"]}  # fmt: skip
        for key in ("fd_fmnist", "sample_acc", "routing_purity", "train_img_cpu_s"):
            extra[key], extra[f"{key}_std"] = mean(key), std(key)
        routed = [r["routing"] for r in rs if r["routing"]]
        expert_load = specialisation = None
        if routed:
            expert_load = torch.tensor([r["expert_load"] for r in routed]).mean(0).tolist()
            spec = routed[0]["specialisation"]
            if spec is not None:
                share = torch.tensor([r["specialisation"]["share"] for r in routed]).mean(0).tolist()
                specialisation = {**spec, "share": share}
        dense = variant == "dense"
        fd = mean("fd_fmnist")
        rows.append(
            BenchRow(
                model=rs[0]["model"],
                router=variant,
                metric=math.nan if fd is None else fd,
                active_params=int(rs[0]["active_params"]),
                total_params=int(rs[0]["total_params"]),
                train_throughput=mean("train_img_s"),
                infer_throughput=mean("sample_img_s"),
                expert_load_cv=None if dense else mean("expert_load_cv"),
                dropped_frac=None if dense else mean("dropped_frac"),
                expert_load=expert_load,
                specialisation=specialisation,
                extra=extra,
            )
        )
    return rows


def write_json(path: str | Path, runs: list[dict[str, Any]], settings_name: str, runtime_s: float) -> None:
    """The tables format of ``runs`` with the raw runs (key ``runs``) and the wall time so far."""
    extra = {"runs": runs, "runtime_s": round(runtime_s, 1),
             "notes": "inference throughput = class-conditional sampling (the config's guidance, sampler steps "
                      "in extra.sampling_steps), images/s"}  # fmt: skip
    write_domain_json(path, DOMAIN, settings_name, DATASET, "fd_fmnist", False, "images/s", bench_rows(runs), extra)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args, settings, settings_name = parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    print(f"moezoo bench generation ({settings_name}): {settings}", flush=True)
    jobs = [("dit", v, s) for v in variants for s in settings.seeds]
    init = (settings, args.root, True, args.threads)
    runs: list[dict[str, Any]] = []
    models = {v: load_config(f"dit_fmnist_{v}")["model"]["init_args"]["model"] for v in variants}

    def collect(job: tuple[str, str, int], row: dict[str, Any]) -> None:
        _, variant, seed = job
        steps = settings.sampling_steps or load_config(f"dit_fmnist_{variant}")["model"]["init_args"].get(
            "num_sampling_steps"
        )
        runs.append({"variant": variant, "seed": seed, "model": models[variant], "steps": settings.dit_steps,
                     "batch_size": settings.dit_batch, "eval_samples": settings.eval_samples,
                     "sampling_steps": steps, **row})  # fmt: skip
        if args.json:  # after every run, so that an interrupted bench keeps what it finished
            write_json(args.json, runs, settings_name, time.perf_counter() - start)

    if args.workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers, mp.get_context("spawn"), _init_worker, init) as pool:
            for job, row in zip(jobs, pool.map(_run_job, jobs)):
                collect(job, row)
    else:
        _init_worker(*init)
        for job in jobs:
            collect(job, _run_job(job))
    results: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        results.setdefault(run["variant"], []).append(run)
    title = (f"DiT-MoE on Fashion-MNIST ({settings_name}): {settings.dit_steps} steps x batch {settings.dit_batch}, "
             f"{settings.eval_samples} samples, seeds {list(settings.seeds)}")  # fmt: skip
    print(render(title, results, COLUMNS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
