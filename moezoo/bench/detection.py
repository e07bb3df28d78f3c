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

``--quick``: debug-size models, 150 steps of 16, 512 training and 200 test canvases, lr 3e-3 (a few CPU minutes
for the four default variants and two seeds on one thread). Runs can be split across processes (``--variants``,
``--seeds``, ``--json``) and their tables merged with ``--merge A.json B.json ...``.
This module needs the detection task package (``moezoo.tasks.detection``) and ``pycocotools``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": dict(dense=True),
    "wide2": dict(dense=True, match_compute_of=2),
    "wide4": dict(dense=True, match_compute_of=4),
    "moe2": dict(num_experts=2),
    "moe4": dict(num_experts=4),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moezoo bench detection", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="debug models, 150 steps of 16, 512/200 canvases")
    p.add_argument("--variants", default="dense,wide4,moe2,moe4", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--size", default="nano", choices=("debug", "nano", "tiny"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--source", default="digits", choices=("digits", "fashion_mnist"))
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="also write every run's numbers to this file")
    p.add_argument("--merge", nargs="+", default=None, help="print one table from the --json files of earlier runs")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.num_train, args.num_test = "debug", 150, 512, 200
        args.batch_size, args.lr = 16, 3e-3
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


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.merge:
        runs = []
        for path in args.merge:
            with open(path) as f:
                runs.extend(json.load(f)["runs"])
        domains = tuple(dict.fromkeys(k.split("_", 1)[1] for r in runs for k in r["metrics"] if "_" in k))
        print(report(runs, domains or ("all",)))
        return 0
    torch.set_num_threads(args.threads)
    from moezoo.tasks.detection.data import CanvasDataModule

    data = CanvasDataModule(
        source=args.source, img_size=args.img_size, num_train=args.num_train, num_val=1, num_test=args.num_test
    )
    data.setup()
    print(
        f"detection bench: {args.size} models, {args.steps} steps x batch {args.batch_size}, seeds {args.seeds}, "
        f"{args.source} canvases {args.img_size}px: {args.num_train} train / {args.num_test} test (half degraded)",
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
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    print(report(runs, data.domain_names))
    return 0
