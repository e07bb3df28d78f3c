"""``moezoo bench detection``: YOLO-MoE against a single detector and an equal-compute single detector.

Every variant is trained from scratch for the same number of steps on the same seeded canvases (real digit or
Fashion-MNIST items, a clean and a degraded domain mixed half and half) and evaluated with COCO metrics per
domain on held-out canvases whose items come from a disjoint pool. Variants:

- ``dense``: one expert (``dense=True``): the single-expert baseline;
- ``wide2`` / ``wide4``: one detector widened to the FLOPs of 2 / 4 experts (``match_compute_of``);
- ``moe2`` / ``moe4``: YOLO-MoE with 2 / 4 experts blended per scale by the learned router.

Printed per variant: mean +- std over seeds of mAP, mAP50 and AR100 per domain, parameters, forward MFLOPs per
image, inference throughput (images/s, batch 32, this CPU, median of repeats; compare within one run only), and
for mixtures the mean routing weight of each expert per domain (averaged over the three scales).

``--full`` (the default): nano models, 1000 steps of 32, 4000 training and 1000 test canvases, lr 2e-3.
``--quick``: debug-size models, 150 steps of 16, 512 training and 200 test canvases, lr 3e-3 (a few CPU minutes
for the four default variants and two seeds on one thread). Options given explicitly override either; the
result then records the settings ``"custom"``. Runs can be split across processes (``--variants``, ``--seeds``,
``--json``) and their tables merged with ``--merge A.json B.json ... [--json OUT]``.

``--json PATH`` writes the ``moezoo bench tables`` format (domain ``detection``, rewritten atomically after every
run): one row per variant, metric ``map`` = COCO mAP@[.5:.95] on the clean test canvases (mean over seeds),
``expert_load`` = mean routing weight per expert at each of the 3 blending scales, ``specialisation`` = mean
routing weight per expert per visual domain (mean over the scales); the raw per-run records stay under ``runs``.
This module needs the detection task package (``moezoo.tasks.detection``) and ``pycocotools``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from moezoo.bench.tables import BenchRow, write_domain_json

DOMAIN = "detection"
METRICS = ("mAP", "mAP50", "AR100")  # what the COCO evaluator reports, overall and per domain
METRIC_DOMAIN = "clean"  # the headline metric is mAP@[.5:.95] on the clean test canvases

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": dict(dense=True),
    "wide2": dict(dense=True, match_compute_of=2),
    "wide4": dict(dense=True, match_compute_of=4),
    "moe2": dict(num_experts=2),
    "moe4": dict(num_experts=4),
}


QUICK: dict[str, Any] = dict(size="debug", steps=150, batch_size=16, lr=3e-3, num_train=512, num_test=200)
FULL: dict[str, Any] = dict(size="nano", steps=1000, batch_size=32, lr=2e-3, num_train=4000, num_test=1000)
SHARED: dict[str, Any] = dict(source="digits", img_size=64)  # the same in both settings


def settings_of(args: dict[str, Any]) -> str:
    """``"quick"`` or ``"full"`` when ``args`` (``vars`` of the parsed arguments) are exactly those settings, else
    ``"custom"``. Variants, seeds and threads do not change the settings."""
    for name, preset in (("quick", QUICK), ("full", FULL)):
        if all(args.get(k) == v for k, v in {**preset, **SHARED}.items()):
            return name
    return "custom"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moezoo bench detection", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="debug models, 150 steps of 16, 512/200 canvases")
    mode.add_argument("--full", action="store_true", help="nano models, 1000 steps of 32, 4000/1000 canvases (default)")
    p.add_argument("--variants", default="dense,wide4,moe2,moe4", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--size", default=None, choices=("debug", "nano", "tiny"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--source", default=SHARED["source"], choices=("digits", "fashion_mnist"))
    p.add_argument("--img-size", type=int, default=SHARED["img_size"])
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--num-test", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="write the tables format plus every run's numbers to this file")
    p.add_argument("--merge", nargs="+", default=None, help="one table from the --json files of earlier runs")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "batch_size", "num_train", "num_test", "img_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    return args


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_and_evaluate(variant: str, seed: int, args: argparse.Namespace, data: Any) -> dict[str, Any]:
    """Train one variant for ``args.steps`` steps; COCO metrics per domain, routing by domain, speed."""
    from moezoo.layers import total_aux_loss, update_router_states
    from moezoo.models import create_model
    from moezoo.models.yolo import MoEYOLO, count_flops
    from moezoo.models.yolo_boxes import postprocess
    from moezoo.tasks.detection.data import AugmentedDataset, collate
    from moezoo.tasks.detection.evaluate import DetectionEvaluator
    from moezoo.tasks.detection.losses import DetectionLoss

    torch.manual_seed(seed)
    model: MoEYOLO = create_model(  # type: ignore[assignment]
        f"moe_yolo_{args.size}", num_classes=data.num_classes, in_chans=1, **VARIANTS[variant]
    )
    loss_fn = DetectionLoss(model.num_classes, model.reg_max, model.strides)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], args.lr
    )
    train = torch.utils.data.DataLoader(
        AugmentedDataset(data.train_set, hflip=False, scale_jitter=0.1, mosaic_prob=0.0),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    warmup = max(1, args.steps // 30)
    step, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    model.train()
    while step < args.steps:
        for batch in train:
            for group in opt.param_groups:
                group["lr"] = args.lr * _lr_factor(step, args.steps, warmup)
            out, auxes = model.forward_with_aux(batch["images"])
            loss, _ = loss_fn(out["preds"], batch["targets"])
            aux = total_aux_loss(auxes)
            if aux is not None:
                loss = loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            update_router_states(model)
            step += 1
            if step >= args.steps:
                break
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    model.eval()
    evaluator = DetectionEvaluator(model.num_classes, data.domain_names)
    test = torch.utils.data.DataLoader(data.test_set, batch_size=64, collate_fn=collate)
    with torch.no_grad():
        for batch in test:
            out = model(batch["images"])
            boxes, logits = model.decode(out["preds"])
            evaluator.update(postprocess(boxes, logits), batch["targets"], batch["domain"], out["routing"])
        x = torch.rand(32, 1, args.img_size, args.img_size)
        model(x)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    metrics = evaluator.compute()
    routing = {d: w.mean(0).tolist() for d, w in evaluator.routing_by_domain().items()}
    return {
        "variant": variant,
        "seed": seed,
        "model": f"moe_yolo_{args.size}",
        "train_images": args.steps * args.batch_size,
        # (S, N): mean routing weight of each expert at each blending scale over all test images
        "routing_load": torch.cat(evaluator.routing).mean(0).tolist() if evaluator.routing else None,
        "metrics": metrics,
        "routing": routing,
        "params": sum(p.numel() for p in model.parameters()),
        "mflops": count_flops(model, args.img_size, 1) / 1e6,
        "width": model.width,
        "img_per_s": 32 / statistics.median(times),
        "train_cpu_s": train_cpu,
        "train_wall_s": train_wall,
    }


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}+-{statistics.stdev(values):.3f}"


def report(runs: list[dict[str, Any]], domains: tuple[str, ...]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    cols = [f"{m}_{d}" for d in domains for m in ("mAP", "mAP50", "AR100")]
    lines = ["| variant | width | params | MFLOPs/img | img/s | " + " | ".join(cols) + " |"]
    lines.append("|---" * (len(cols) + 5) + "|")
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        cells = [_mean_std([r["metrics"].get(c, float("nan")) for r in rs]) for c in cols]
        head = f"| {v} | {rs[0]['width']} | {rs[0]['params'] / 1e6:.2f}M | {rs[0]['mflops']:.1f} | "
        lines.append(head + f"{statistics.mean(r['img_per_s'] for r in rs):.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean routing weight per expert, by domain (mean over seeds and the 3 scales):")
    for v in variants:
        rs = [r for r in runs if r["variant"] == v and r["routing"]]
        if not rs:
            continue
        parts = []
        for d in domains:
            per_seed = [torch.tensor(r["routing"][d]) for r in rs if d in r["routing"]]
            if per_seed:
                w = torch.stack(per_seed).mean(0)
                parts.append(f"{d}: " + " ".join(f"{x:.2f}" for x in w.tolist()))
        # How far apart the two domains route, per image average: total variation between domain means.
        tv = [0.5 * (torch.tensor(r["routing"][domains[0]]) - torch.tensor(r["routing"][domains[1]])).abs().sum()
              for r in rs if len(domains) > 1 and all(d in r["routing"] for d in domains[:2])]  # fmt: skip
        spread = f" | TV(clean, degraded) = {_mean_std([float(t) for t in tv])}" if tv else ""
        lines.append(f"  {v}: " + " | ".join(parts) + spread)
    cpu = {v: statistics.mean(r["train_cpu_s"] for r in runs if r["variant"] == v) for v in variants}
    lines.append("Training CPU seconds per run: " + ", ".join(f"{v} {s:.0f}" for v, s in cpu.items()))
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def describe(variant: str, width: int) -> str:
    """What a variant is, for the tables' ``extra``."""
    spec = VARIANTS[variant]
    if "match_compute_of" in spec:
        return (f"one detector widened to base width {width} so that its forward FLOPs match "
                f"{spec['match_compute_of']} experts: the mixture's total compute in a single detector")  # fmt: skip
    if spec.get("dense"):
        return f"one detector of base width {width}: the single-expert baseline (the dense twin)"
    return (f"{spec['num_experts']} detectors of base width {width} blended per scale by a learned per-image router; "
            "every expert runs on every image, so all parameters are active")  # fmt: skip


def bench_rows(runs: list[dict[str, Any]], domains: tuple[str, ...]) -> list[BenchRow]:
    """One tables-format row per (model, variant): seed means of what :func:`train_and_evaluate` recorded."""
    rows = []
    for model, variant in dict.fromkeys((r["model"], r["variant"]) for r in runs):
        rs = [r for r in runs if r["model"] == model and r["variant"] == variant]
        split = METRIC_DOMAIN if f"mAP_{METRIC_DOMAIN}" in rs[0]["metrics"] else None
        extra: dict[str, Any] = {
            "description": describe(variant, rs[0]["width"]),
            "metric_split": split or "all test canvases",
            "seeds": [r["seed"] for r in rs],
            "width": rs[0]["width"],
            "mflops_per_image": rs[0]["mflops"],
            "train_cpu_s": _mean([r["train_cpu_s"] for r in rs]),
            "train_images_per_cpu_s": _mean([r["train_images"] / r["train_cpu_s"] for r in rs]),
        }
        for key in [*METRICS, *(f"{m}_{d}" for d in domains for m in METRICS)]:
            values = [r["metrics"][key] for r in rs if key in r["metrics"]]
            if values:
                extra[key], extra[f"{key}_std"] = _mean(values), _std(values)
        metric = _mean([r["metrics"].get(f"mAP_{split}" if split else "mAP", math.nan) for r in rs])
        loads = [torch.tensor(r["routing_load"], dtype=torch.float64) for r in rs if r.get("routing_load")]
        routed = [r for r in rs if r["routing"]]
        expert_load = cv = dropped = specialisation = None
        if loads:
            expert_load = torch.stack(loads).mean(0).tolist()
            cv = _mean([float((w_SN.std(-1, unbiased=False) / w_SN.mean(-1)).mean()) for w_SN in loads])
            dropped = 0.0  # blending weights every expert's output; no image or token is dropped
        if routed:
            groups = [d for d in domains if all(d in r["routing"] for r in routed)]
            share = [torch.tensor([r["routing"][d] for r in routed]).mean(0).tolist() for d in groups]
            specialisation = {"by": "domain", "layer": "mean of the 3 scales", "groups": groups, "share": share}
            if len(groups) > 1:
                tv = [0.5 * sum(abs(a - b) for a, b in zip(r["routing"][groups[0]], r["routing"][groups[1]]))
                      for r in routed]  # fmt: skip
                extra[f"routing_tv_{groups[0]}_{groups[1]}"] = _mean(tv)
        rows.append(
            BenchRow(
                model=model,
                router="dense" if variant == "dense" else variant,
                metric=metric,
                active_params=rs[0]["params"],
                total_params=rs[0]["params"],
                train_throughput=_mean([r["train_images"] / r["train_wall_s"] for r in rs]),
                infer_throughput=_mean([r["img_per_s"] for r in rs]),
                expert_load_cv=cv,
                dropped_frac=dropped,
                expert_load=expert_load,
                specialisation=specialisation,
                extra=extra,
            )
        )
    return rows


def write_json(path: str | Path, runs: list[dict[str, Any]], settings: str, dataset: str,
               domains: tuple[str, ...], extra: dict[str, Any]) -> None:  # fmt: skip
    """The tables format of ``runs`` plus the raw runs (key ``runs``, which ``--merge`` reads)."""
    rows = bench_rows(runs, domains)
    write_domain_json(path, DOMAIN, settings, dataset, "map", True, "images/s", rows, {**extra, "runs": runs})


def _dataset(args: dict[str, Any]) -> str:
    return (f"{args['source']} canvases {args['img_size']}px ({args['num_train']} train / {args['num_test']} test, "
            "half clean, half degraded; test items from a disjoint pool)")  # fmt: skip


def merge(paths: list[str], out: str | None) -> int:
    """Print one table from earlier ``--json`` files; with ``out``, write their merged tables-format file."""
    runs, settings, datasets = [], [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        file_args = data.get("args", {})
        settings.append(data.get("settings") or settings_of(file_args))
        if file_args:
            datasets.append(data.get("dataset") or _dataset(file_args))
        for run in data["runs"]:  # records of files written before these keys existed
            run.setdefault("model", f"moe_yolo_{file_args.get('size', 'nano')}")
            run.setdefault("train_images", file_args.get("steps", 0) * file_args.get("batch_size", 0))
            runs.append(run)
    domains = tuple(dict.fromkeys(k.split("_", 1)[1] for r in runs for k in r["metrics"] if "_" in k))
    print(report(runs, domains or ("all",)))
    if out:
        merged_settings = settings[0] if len(set(settings)) == 1 else "mixed"
        dataset = datasets[0] if len(set(datasets)) == 1 else "; ".join(dict.fromkeys(datasets))
        write_json(out, runs, merged_settings, dataset, domains, {"merged_from": list(paths)})
        print(f"wrote {out}")
    return 0


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    torch.set_num_threads(args.threads)
    from moezoo.tasks.detection.data import CanvasDataModule

    data = CanvasDataModule(
        source=args.source, img_size=args.img_size, num_train=args.num_train, num_val=1, num_test=args.num_test
    )
    data.setup()
    settings = settings_of(vars(args))
    print(
        f"detection bench ({settings}): {args.size} models, {args.steps} steps x batch {args.batch_size}, seeds "
        f"{args.seeds}, {args.source} canvases {args.img_size}px: {args.num_train} train / {args.num_test} test "
        "(half degraded)",
        flush=True,
    )
    runs = []
    for seed in args.seeds:
        for variant in args.variants.split(","):
            run = train_and_evaluate(variant, seed, args, data)
            m = run["metrics"]
            print(
                f"  seed {seed} {variant:>6}: mAP50 clean {m.get('mAP50_clean', float('nan')):.3f} degraded "
                f"{m.get('mAP50_degraded', float('nan')):.3f} ({run['train_cpu_s']:.0f} CPU s)",
                flush=True,
            )
            runs.append(run)
            if args.json:  # after every run, so that an interrupted bench keeps what it finished
                extra = {"args": vars(args), "runtime_s": round(time.perf_counter() - start, 1)}
                write_json(args.json, runs, settings, _dataset(vars(args)), data.domain_names, extra)
    print(report(runs, data.domain_names))
    return 0
