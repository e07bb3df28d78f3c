"""``moezoo bench vision [--quick|--full] [--seeds 0,1] [--tables dit,router] [--json PATH]``.

Two tables on Fashion-MNIST, each row the mean +- std over the seeds:

(a) DiT generation: the dense twin, softmax top-2 token choice, expert choice and ProMoE ``moe_dit`` at equal
    active FFN width per token and equal training steps (``configs/vision/dit_fmnist_{dense,topk,expert_choice,
    promoe}.yaml``: model, objective, sampler, guidance, EMA, learning rate). Columns: FD-FMNIST (Frechet distance
    in the feature space of the shipped Fashion-MNIST CNN, against the 10k test images; not FID), the CNN's
    accuracy on class-conditional samples, routing purity (share of each class's tokens on its most used expert,
    each token counted on its primary expert, averaged over the MoE layers, measured with the EMA weights on 1000
    noisy test images at seeded random times), expert-load CV and training throughput (images/s, wall clock).
(b) The ViT router study (``configs/vision/fmnist_vit_*.yaml``): top-k token choice, V-MoE batch-prioritized
    routing, expert choice, Sinkhorn, sigmoid with loss-free balancing, Soft MoE and the dense twin at the same
    active compute. Columns: test accuracy, training throughput, expert-load CV and dropped-token fraction on the
    test images.

Training loops are plain PyTorch (the tasks' ``compute_loss``, their optimiser groups and warmup-cosine schedule,
router state updates and EMA as in ``fit``), seeded per row. ``--quick`` (the default) is a short smoke of both
tables that fits a shared 2-core CPU; ``--full`` uses the configs' step counts. ``--json PATH`` writes table (b)
in the ``moezoo bench tables`` format (domain ``vision``) and, unless ``--tables`` says otherwise, runs only table
(b); table (a) in that format is the ``generation`` domain's, written by ``moezoo bench generation --json PATH``
(:mod:`moezoo.bench.generation` reuses :func:`run_dit`), so ``moezoo bench tables`` trains each table once.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

DOMAIN = "vision"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "vision"
DIT_VARIANTS = ("dense", "topk", "expert_choice", "promoe")
VIT_VARIANTS = ("topk", "bpr", "expert_choice", "sinkhorn", "sigmoid_lossfree", "soft", "dense")


@dataclass(frozen=True)
class Settings:
    dit_steps: int
    dit_batch: int
    eval_samples: int
    sampling_steps: int | None  # None: the config's
    vit_steps: int | None  # None: the config's epochs
    vit_batch: int | None  # None: the config's
    test_images: int
    seeds: tuple[int, ...]


QUICK = Settings(dit_steps=100, dit_batch=32, eval_samples=200, sampling_steps=8, vit_steps=100, vit_batch=64,
                 test_images=1000, seeds=(0, 1))  # fmt: skip
FULL = Settings(dit_steps=1000, dit_batch=64, eval_samples=2000, sampling_steps=None, vit_steps=None, vit_batch=None,
                test_images=10000, seeds=(0, 1, 2))  # fmt: skip


def load_config(name: str) -> dict[str, Any]:
    """A config of ``configs/vision`` as a plain dict (the bench runs from a source checkout)."""
    import yaml

    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `moezoo bench vision` reads the configs of a source checkout")
    return yaml.safe_load(path.read_text())


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): routed experts count ``top_k / num_experts`` of theirs (Soft MoE all)."""
    from moezoo.layers import MoE

    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if moe.router.kind != "soft":
            experts = sum(p.numel() for p in moe.experts.parameters())
            inactive += experts * (1.0 - moe.top_k / moe.num_experts)
    return total, int(round(total - inactive))


def _optimizer(task: Any, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt, sched = task.build_optimizer(steps)  # the config's optimizer and lr_scheduler, as `moezoo fit` builds them
    assert sched is not None, "the study's configs name an lr_scheduler"
    return opt, sched


def _train(task: Any, sample_batch: Any, steps: int, after_step: Any) -> tuple[float, float]:
    """Run ``steps`` optimiser steps of ``task.compute_loss``; return training images per wall second and per
    CPU second of this process (all threads: steadier than wall time on a shared machine)."""
    from moezoo.layers import total_aux_loss

    opt, sched = _optimizer(task, steps)
    task.train()
    seconds, cpu_seconds, images = 0.0, 0.0, 0
    for step in range(steps):
        batch = sample_batch()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, auxes, _, batch_size = task.compute_loss(batch, "train")
        aux = total_aux_loss(auxes)
        if aux is not None:
            loss = loss + task.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        after_step()
        if step >= min(3, steps - 1):  # the first steps warm up allocators
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - cpu_start
            images += batch_size
    return images / max(seconds, 1e-9), images / max(cpu_seconds, 1e-9)


# -- (a) DiT generation ----------------------------------------------------------------------------------------------
def run_dit(variant: str, seed: int, settings: Settings, data: dict[str, Any]) -> dict[str, Any]:
    """One DiT row: the numbers of table (a), sampling throughput and (key ``routing``) the
    :func:`moezoo.bench.tables.routing_stats` of the EMA model on noisy test images, grouped by class."""
    from moezoo.bench.tables import routing_stats
    from moezoo.layers import update_router_states
    from moezoo.tasks.generation import ImageGenerationTask
    from moezoo.tasks.generation.fd import classifier_outputs, frechet_distance, gaussian_stats
    from moezoo.tasks.generation.metrics import routing_purity
    from moezoo.tasks.vision.data import FASHION_MNIST_CLASSES

    init = dict(load_config(f"dit_fmnist_{variant}")["model"]["init_args"])
    if settings.sampling_steps is not None:
        init["num_sampling_steps"] = settings.sampling_steps
    init.update(sample_every_n_steps=0, eval_num_samples=0, sample_seed=seed)
    torch.manual_seed(seed)
    task = ImageGenerationTask(**init)
    x_train, y_train = data["train"]
    gen = torch.Generator().manual_seed(seed)

    def sample_batch() -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x_train), (settings.dit_batch,), generator=gen)
        return x_train[idx], y_train[idx]

    def after_step() -> None:
        update_router_states(task.model)
        task.ema.update(task.model)

    throughput, cpu_throughput = _train(task, sample_batch, settings.dit_steps, after_step)
    task.eval()
    y = torch.arange(settings.eval_samples) % task.num_classes
    sample_start = time.perf_counter()
    fakes = torch.cat([task.generate(chunk, seed=1000 * seed + i) for i, chunk in enumerate(y.split(250))])
    sample_img_s = settings.eval_samples / (time.perf_counter() - sample_start)
    feats, logits = classifier_outputs(data["classifier"], fakes)
    fd = frechet_distance(*gaussian_stats(feats), *data["real_stats"])
    acc = float((logits.argmax(-1) == y).float().mean())
    x_test, y_test = data["test"]
    x_test, y_test = x_test[:1000], y_test[:1000]
    with torch.no_grad():
        noise_gen = torch.Generator().manual_seed(seed)
        noisy = [task.objective.training_example(xb, noise_gen)[:2] for xb in x_test.split(250)]
    x_t, t = torch.cat([n[0] for n in noisy]), torch.cat([n[1] for n in noisy])
    purities = []

    def forward_with_aux(idx_B: Tensor) -> tuple[Tensor, list[Any]]:
        out, auxes = task.ema.module.forward_with_aux(x_t[idx_B], t[idx_B], y_test[idx_B])
        purity = routing_purity(auxes, y_test[idx_B], task.num_classes)
        if purity is not None:
            purities.append(purity)
        return out, auxes

    batches = [(idx_B, y_test[idx_B]) for idx_B in torch.arange(len(y_test)).split(250)]
    routing = routing_stats(forward_with_aux, batches, FASHION_MNIST_CLASSES, "class")
    total, active = count_params(task.model)
    return {
        "fd_fmnist": fd,
        "sample_acc": acc,
        "routing_purity": sum(purities) / len(purities) if purities else math.nan,
        "expert_load_cv": routing.get("expert_load_cv", math.nan),
        "dropped_frac": routing.get("dropped_frac", math.nan),
        "train_img_s": throughput,
        "train_img_cpu_s": cpu_throughput,
        "sample_img_s": sample_img_s,
        "total_params": total,
        "active_params": active,
        "routing": routing,
    }


# -- (b) ViT router study --------------------------------------------------------------------------------------------
def run_vit(variant: str, seed: int, settings: Settings, data: dict[str, Any]) -> dict[str, Any]:
    """One row of table (b); key ``routing``: :func:`moezoo.bench.tables.routing_stats` on the test images, grouped
    by class (empty for the dense model)."""
    from moezoo.bench.tables import routing_stats
    from moezoo.layers import update_router_states
    from moezoo.tasks.vision import ImageClassificationTask
    from moezoo.tasks.vision.data import FASHION_MNIST_CLASSES, random_shift

    config = load_config(f"fmnist_vit_{variant}")
    init = config["model"]["init_args"]
    data_args = config["data"]["init_args"]
    batch = settings.vit_batch or int(data_args["batch_size"])
    x_train, y_train = data["train_vit"]
    steps = settings.vit_steps or int(config["trainer"]["max_epochs"]) * (len(x_train) // batch)
    torch.manual_seed(seed)
    task = ImageClassificationTask(**init)
    gen = torch.Generator().manual_seed(seed)
    max_shift, hflip = int(data_args.get("max_shift", 0)), bool(data_args.get("hflip", False))

    def sample_batch() -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        xb = random_shift(x_train[idx], max_shift, gen)
        if hflip:
            xb = torch.where(torch.rand(batch, 1, 1, 1, generator=gen) < 0.5, xb.flip(-1), xb)
        return xb, y_train[idx]

    throughput, cpu_throughput = _train(task, sample_batch, steps, lambda: update_router_states(task.model))
    task.eval()
    x_test, y_test = data["test_vit"]
    correct = 0
    cvs: list[float] = []
    dropped: list[float] = []

    def forward_with_aux(idx_B: Tensor) -> tuple[Tensor, list[Any]]:
        nonlocal correct
        logits, auxes = task.model.forward_with_aux(x_test[idx_B])
        correct += int((logits.argmax(-1) == y_test[idx_B]).sum())
        cvs.extend(float(a.expert_load_cv) for a in auxes)
        dropped.extend(float(a.dropped_frac) for a in auxes)
        return logits, auxes

    batches = [(idx_B, y_test[idx_B]) for idx_B in torch.arange(len(y_test)).split(500)]
    with torch.no_grad():
        routing = routing_stats(forward_with_aux, batches, FASHION_MNIST_CLASSES, "class")
        if not routing:  # a dense model: routing_stats stops at the first batch
            for idx_B, _ in batches[1:]:
                forward_with_aux(idx_B)
    total, active = count_params(task.model)
    return {
        "test_acc": correct / len(y_test),
        "train_img_s": throughput,
        "train_img_cpu_s": cpu_throughput,
        "expert_load_cv": sum(cvs) / len(cvs) if cvs else math.nan,
        "dropped_frac": sum(dropped) / len(dropped) if dropped else math.nan,
        "total_params": total,
        "active_params": active,
        "steps": steps,
        "routing": routing,
    }


# -- tables ----------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    digits = 1 if abs(mean) >= 100 else 3
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def render(title: str, results: dict[str, list[dict[str, float]]], columns: list[tuple[str, str]]) -> str:
    lines = [title, "", "| variant | " + " | ".join(h for _, h in columns) + " | active / total params |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for variant, runs in results.items():
        cells = [_mean_std([r[key] for r in runs]) for key, _ in columns]
        params = f"{int(runs[0]['active_params'])} / {int(runs[0]['total_params'])}"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {params} |")
    return "\n".join(lines)


def load_data(settings: Settings, root: str | None, with_classifier: bool) -> dict[str, Any]:
    from moezoo.tasks.generation.data import fashion_mnist_unit_range
    from moezoo.tasks.generation.fd import classifier_outputs, gaussian_stats, load_classifier
    from moezoo.tasks.vision.data import FASHION_MNIST_DEBIAN_ROOT, FashionMNISTDataModule

    folder = Path(root or FASHION_MNIST_DEBIAN_ROOT)
    data: dict[str, Any] = {"train": fashion_mnist_unit_range(folder, "train")}
    x_test, y_test = fashion_mnist_unit_range(folder, "test")
    data["test"] = (x_test, y_test)
    data["train_vit"] = FashionMNISTDataModule.load_split(folder, "train")
    x_vit, y_vit = FashionMNISTDataModule.load_split(folder, "test")
    data["test_vit"] = (x_vit[: settings.test_images], y_vit[: settings.test_images])
    if with_classifier:
        data["classifier"] = load_classifier()
        feats, _ = classifier_outputs(data["classifier"], x_test)
        data["real_stats"] = gaussian_stats(feats)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moezoo bench vision", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short smoke of both tables (the default)")
    mode.add_argument("--full", action="store_true", help="the configs' step counts, 3 seeds")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (>= 2 for a std)")
    parser.add_argument(
        "--tables",
        default=None,
        help="which tables: dit, router or both (default: both; only router with --json, whose file holds table (b))",
    )
    parser.add_argument("--dit", default=",".join(DIT_VARIANTS), help=f"DiT variants, from {DIT_VARIANTS}")
    parser.add_argument("--routers", default=",".join(VIT_VARIANTS), help=f"ViT variants, from {VIT_VARIANTS}")
    parser.add_argument("--dit-steps", type=int, default=None, help="override the DiT training steps")
    parser.add_argument("--vit-steps", type=int, default=None, help="override the ViT training steps")
    parser.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per worker (1: no spin-waiting on a shared machine)"
    )
    parser.add_argument("--workers", type=int, default=1, help="run the (variant, seed) jobs in N processes")
    parser.add_argument("--json", default=None, help="write table (b) here (moezoo bench tables format)")
    args = parser.parse_args(argv)
    settings = FULL if args.full else QUICK
    if args.seeds:
        settings = replace(settings, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.dit_steps is not None:
        settings = replace(settings, dit_steps=args.dit_steps)
    if args.vit_steps is not None:
        settings = replace(settings, vit_steps=args.vit_steps)
    tables = set((args.tables or ("router" if args.json else "dit,router")).split(","))
    dit_variants, vit_variants = args.dit.split(","), args.routers.split(",")
    for name, chosen, allowed in (("--tables", tables, ("dit", "router")), ("--dit", dit_variants, DIT_VARIANTS),
                                  ("--routers", vit_variants, VIT_VARIANTS)):  # fmt: skip
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            raise ValueError(f"{name}: {unknown} are not allowed; choose from {list(allowed)}")
    if min(settings.dit_steps, settings.vit_steps or 1) < 1:
        raise ValueError(f"steps must be >= 1, got dit={settings.dit_steps}, vit={settings.vit_steps}")
    torch.set_num_threads(args.threads)
    mode_name = "full" if args.full else "quick"
    print(f"moezoo bench vision ({mode_name}): {settings}", flush=True)
    jobs = [("dit", v, s) for v in dit_variants for s in settings.seeds] if "dit" in tables else []
    jobs += [("router", v, s) for v in vit_variants for s in settings.seeds] if "router" in tables else []
    init = (settings, args.root, "dit" in tables, args.threads)
    results: dict[str, dict[str, list[dict[str, float]]]] = {"dit": {}, "router": {}}
    if args.workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers, mp.get_context("spawn"), _init_worker, init) as pool:
            done = list(pool.map(_run_job, jobs))
    else:
        _init_worker(*init)
        done = [_run_job(job) for job in jobs]
    for (table, variant, _), row in zip(jobs, done):
        results[table].setdefault(variant, []).append(row)
    out = []
    if "dit" in tables:
        title = (f"(a) DiT-MoE on Fashion-MNIST: {settings.dit_steps} steps x batch {settings.dit_batch}, "
                 f"{settings.eval_samples} samples, seeds {list(settings.seeds)}")  # fmt: skip
        columns = [("fd_fmnist", "FD-FMNIST (lower better)"), ("sample_acc", "sample acc"),
                   ("routing_purity", "routing purity"), ("expert_load_cv", "load CV"),
                   ("train_img_s", "train img/s"), ("train_img_cpu_s", "train img/CPU-s")]  # fmt: skip
        out.append(render(title, results["dit"], columns))
    if "router" in tables:
        steps = next(iter(results["router"].values()))[0]["steps"]
        title = (f"(b) ViT router study on Fashion-MNIST: {int(steps)} steps, {settings.test_images} test images, "
                 f"seeds {list(settings.seeds)}")  # fmt: skip
        columns = [("test_acc", "test acc"), ("train_img_s", "train img/s"), ("train_img_cpu_s", "train img/CPU-s"),
                   ("expert_load_cv", "load CV"), ("dropped_frac", "dropped")]  # fmt: skip
        out.append(render(title, results["router"], columns))
        if args.json:
            _write_json(Path(args.json), mode_name, settings, results["router"])
    print("\n\n".join(out), flush=True)
    return 0


_WORKER: dict[str, Any] = {}


def _init_worker(settings: Settings, root: str | None, with_classifier: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(settings=settings, data=load_data(settings, root, with_classifier))


def _run_job(job: tuple[str, str, int]) -> dict[str, Any]:
    table, variant, seed = job
    start = time.perf_counter()
    run = run_dit if table == "dit" else run_vit
    row = run(variant, seed, _WORKER["settings"], _WORKER["data"])
    numbers = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, (int, float)))
    print(f"{table} {variant:16s} seed {seed}: " + numbers
          + f" ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return row


def _write_json(path: Path, mode: str, settings: Settings, results: dict[str, list[dict[str, Any]]]) -> None:
    """Seed-averaged rows of table (b) in the ``moezoo bench tables`` format (``tables.write_domain_json``)."""
    from moezoo.bench.tables import BenchRow, write_domain_json

    rows = []
    for variant, runs in results.items():
        mean = {k: statistics.fmean(float(r[k]) for r in runs) for k in runs[0] if k != "routing"}
        routed = [r["routing"] for r in runs if r.get("routing")]
        expert_load = specialisation = None
        if routed:  # averaged over seeds (expert indices of different seeds need not match; the load shape does)
            expert_load = torch.tensor([r["expert_load"] for r in routed]).mean(0).tolist()
            spec = routed[0].get("specialisation")
            if spec is not None:
                share = torch.tensor([r["specialisation"]["share"] for r in routed]).mean(0).tolist()
                specialisation = {**spec, "share": share}
        cv = None if variant == "dense" or math.isnan(mean["expert_load_cv"]) else mean["expert_load_cv"]
        dropped_mean = mean.get("dropped_frac", 0.0)
        dropped = None if variant == "dense" or math.isnan(dropped_mean) else dropped_mean
        model = "moe_vit_tiny"
        extra: dict[str, Any] = {k: v for k, v in mean.items() if k not in ("total_params", "active_params")}
        extra["seeds"] = list(settings.seeds)
        rows.append(BenchRow(model, variant, mean["test_acc"], int(mean["active_params"]), int(mean["total_params"]),
                             mean["train_img_s"], None, cv, dropped, expert_load, specialisation,
                             extra=extra))  # fmt: skip
    dataset = "Fashion-MNIST (IDX files), 28x28, 10 classes"
    write_domain_json(path, DOMAIN, mode, dataset, "acc", True, "images/s", rows)


if __name__ == "__main__":
    sys.exit(main())
