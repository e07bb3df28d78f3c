"""``moezoo bench speech``: dense vs Switch vs Omni-router vs LR-MoE vs global-embedding routing on the generated
multilingual / code-switched corpus, at equal active parameters, over several seeds.

Legend: B utterances, L encoder frames, E experts, G groups (the languages and "cs").

Each (variant, seed) trains ``moe_conformer_<size>`` for a fixed number of optimiser steps (AdamW, warmup +
cosine, SpecAugment) on the training voices and is evaluated on the held-out test voices. Reported, mean +- std
over seeds: CER and WER (monolingual and code-switched utterances separately), LID frame accuracy (LR-MoE),
training throughput (utterances/s, wall clock, this process only), inference throughput (utterances/s of the
model on up to 128 test utterances in batches of 32, eval mode, median of 3 passes after a warm-up), expert-load CV
(test set, CV of each layer's summed expert counts, mean over layers), the dropped-frame fraction, cross-layer
agreement of top-1 routing decisions (raw, and after the best one-to-one relabelling of experts between
consecutive layers), and the out-of-domain CER/WER on the 10 recordings of ``pocketsphinx-testdata``.

Routing specialisation by language (the shapes of :func:`moezoo.bench.tables.routing_stats`, counted here because
utterances are padded and the MoE layers route only real frames): at the last sparse MoE layer, the share of each
group's routed (frame, expert) pairs per expert, where the group of a monolingual test utterance is its language
and every code-switched utterance counts in the extra group ``"cs"`` (its frames mix languages).

``--quick`` is the small corpus preset, 400 steps of 8 and one seed (minutes; 400 steps is about where CTC leaves
its all-blank plateau here: 120 steps left every variant at CER ~100%); ``--full`` (or neither) is the default
setting, 1500 steps of 16 over two seeds.
``--json PATH`` is rewritten atomically after every run in the ``moezoo bench tables`` format (one row per
variant, CER on the held-out test voices, mean over seeds) plus the raw ``args`` (the run settings) and
``results`` (``{variant: [run, ...]}``); ``--resume`` skips the (variant, seed) already there, and
``--merge A.json B.json [--json OUT]`` tabulates runs made in separate processes (files written before this
format, whose raw settings sit under ``"settings"``, are read too).

The task code lives in :mod:`moezoo.tasks.speech` (imported lazily, as the CLI does).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"router": "topk", "dense": True},
    "switch": {"router": "topk"},
    "omni": {"router": "omni"},
    "lrmoe": {"router": "language", "lid_layer": 1},
    "global": {"router": "global_embedding"},
}
# Run settings that must agree for runs to be averaged (--resume, --merge); threads, OOD and paths may differ.
TRAINING_KEYS = ("steps", "size", "batch_size", "lr", "preset")
INFER_UTTERANCES = 128


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total parameters, active parameters per frame): each MoE layer counts its router + top-k experts."""
    from moezoo.layers import MoE

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = (m.experts.w_in.numel() + m.experts.w_out.numel()) // m.num_experts
            inactive += per_expert * (m.num_experts - m.top_k)
    return total, total - inactive


def run_one(variant: str, seed: int, args: argparse.Namespace, data: Any, ood: Any) -> dict[str, Any]:
    from moezoo.layers import update_router_states
    from moezoo.layers.speech_routers import cross_layer_agreement
    from moezoo.models.conformer import lengths_to_mask, subsampled_lengths
    from moezoo.tasks.base import param_groups, warmup_cosine
    from moezoo.tasks.speech import SpeechRecognitionTask
    from moezoo.tasks.speech.asr import encoder_frame_labels

    torch.manual_seed(seed)
    kwargs = {"num_experts": 4, "top_k": 1, **VARIANTS[variant]}
    task = SpeechRecognitionTask(f"moe_conformer_{args.size}", kwargs, lid_coef=0.3, spec_augment=True)
    total, active = count_params(task.model)
    optimizer = torch.optim.AdamW(param_groups(task.model, 0.01), lr=args.lr)
    warmup = max(1, int(0.05 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.steps, warmup, 0.01))
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data.dataset("train"), batch_size=args.batch_size, shuffle=True, generator=generator, collate_fn=_collate()
    )
    task.train()
    step, utterances, start = 0, 0, time.perf_counter()
    while step < args.steps:
        for batch in loader:
            if batch is None:
                continue
            loss, auxes, _, bs = task.compute_loss(batch, "train")
            aux = sum((a.aux_loss for a in auxes), torch.zeros(()))
            optimizer.zero_grad(set_to_none=True)
            (loss + aux).backward()
            torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            update_router_states(task.model)
            step, utterances = step + 1, utterances + bs
            if step >= args.steps:
                break
    train_s = time.perf_counter() - start
    task.eval()
    task.errors.clear()
    lid_hits, lid_frames = 0.0, 0
    load: dict[int, torch.Tensor] = {}
    agree: dict[str, list[float]] = defaultdict(list)
    groups = [*data.languages, "cs"]
    group_counts_GE: torch.Tensor | None = None
    spec_layer = -1
    dropped = frames = 0.0
    infer_batches: list[dict[str, Any]] = []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(data.dataset("test"), batch_size=32, collate_fn=_collate()):
            if batch is None:
                continue
            if sum(len(b["kinds"]) for b in infer_batches) < INFER_UTTERANCES:
                infer_batches.append(batch)
            _, auxes, metrics, _ = task.compute_loss(batch, "test")
            if "lid_acc" in metrics:  # weight by the labelled encoder frames of the batch, as the metric counts
                lengths = subsampled_lengths(batch["lengths"])
                labels = encoder_frame_labels(batch["lid"], int(lengths.max()))
                valid = int(((labels >= 0) & lengths_to_mask(lengths, labels.shape[1])).sum())
                lid_hits += float(metrics["lid_acc"]) * valid
                lid_frames += valid
            for i, a in enumerate(auxes):
                load[i] = load.get(i, torch.zeros_like(a.tokens_per_expert_E)) + a.tokens_per_expert_E
                dropped += float(a.dropped_frac) * a.num_tokens
                frames += a.num_tokens
            routings = [a.routing for a in auxes if a.routing is not None]
            if len(routings) >= 2:
                tokens = routings[0].num_tokens
                agree["raw"].append(cross_layer_agreement(routings) * tokens)
                agree["matched"].append(cross_layer_agreement(routings, matched=True) * tokens)
                agree["tokens"].append(tokens)
            if routings:
                spec_layer = max(i for i, a in enumerate(auxes) if a.routing is not None)
                group_B = utterance_groups(batch, data.languages)
                counts_GE = group_counts(routings[-1], subsampled_lengths(batch["lengths"]), group_B, len(groups))
                group_counts_GE = counts_GE if group_counts_GE is None else group_counts_GE + counts_GE
        result = {f"test_{k}": v for k, v in task.error_rates().items()}
        task.errors.clear()
        if ood is not None:
            for batch in torch.utils.data.DataLoader(ood, batch_size=10, collate_fn=_collate()):
                task.compute_loss(batch, "test")
            result.update({f"ood_{k}": v for k, v in task.error_rates().items() if k in ("cer", "wer")})
            task.errors.clear()
        infer = inference_rate(task.model, infer_batches)
    cvs = [float(v.std(unbiased=False) / v.mean().clamp_min(1e-12)) for v in load.values()]
    tokens = sum(agree["tokens"])
    specialisation = None
    if group_counts_GE is not None:
        share_GE = group_counts_GE / group_counts_GE.sum(-1, keepdim=True).clamp_min(1.0)
        specialisation = {"by": "language", "layer": spec_layer, "groups": groups, "share": share_GE.tolist()}
    result.update(
        {
            "seed": seed,
            "lid_acc": lid_hits / lid_frames if lid_frames else math.nan,
            "utt_per_s": utterances / train_s,
            "infer_utt_per_s": infer,
            "train_s": train_s,
            "load_cv": sum(cvs) / len(cvs) if cvs else math.nan,
            "dropped_frac": dropped / frames if frames else None,
            "expert_load": [(v / v.sum().clamp_min(1.0)).tolist() for v in load.values()] or None,
            "specialisation": specialisation,
            "agree_raw": sum(agree["raw"]) / tokens if tokens else math.nan,
            "agree_matched": sum(agree["matched"]) / tokens if tokens else math.nan,
            "params_total": float(total),
            "params_active": float(active),
        }
    )
    return result


def utterance_groups(batch: dict[str, Any], languages: tuple[str, ...]) -> torch.Tensor:
    """Group of each utterance ``(B,)``: the index of its language if monolingual (the language of its labelled
    frames), ``len(languages)`` ("cs") if code-switched, -1 (not counted) for any other kind or no label."""
    group_B = torch.full((len(batch["kinds"]),), -1, dtype=torch.long)
    for b, kind in enumerate(batch["kinds"]):
        if kind == "cs":
            group_B[b] = len(languages)
        elif kind == "mono":
            labels = batch["lid"][b][batch["lid"][b] >= 0]
            if labels.numel():
                group_B[b] = int(torch.bincount(labels).argmax())
    return group_B


def group_counts(routing: Any, lengths_B: torch.Tensor, group_B: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Routed (frame, expert) pairs per group and expert ``(G, E)`` of one batch of one MoE layer.

    The layer routes only real frames, in (utterance, frame) order: kept frame t belongs to utterance
    ``repeat_interleave(arange(B), lengths_B)[t]`` (``lengths_B``: encoder frames). Groups -1 are left out.
    """
    sample_T = torch.repeat_interleave(torch.arange(len(lengths_B)), lengths_B.cpu())
    assert sample_T.numel() == routing.num_tokens, (sample_T.numel(), routing.num_tokens)
    group_N = group_B[sample_T[routing.token_idx_N.cpu()]]
    keep_N = group_N >= 0
    flat_N = group_N[keep_N] * routing.num_experts + routing.expert_idx_N.cpu()[keep_N]
    counts = torch.bincount(flat_N, minlength=num_groups * routing.num_experts).double()
    return counts.reshape(num_groups, routing.num_experts)


@torch.no_grad()
def inference_rate(model: torch.nn.Module, batches: list[dict[str, Any]], repeats: int = 3) -> float | None:
    """Median utterances per second of ``model(features, lengths)`` in eval mode over ``repeats`` passes over the
    padded test batches (after one warm-up pass), as :func:`moezoo.bench.tables.inference_throughput` times."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    utterances = sum(len(b["lengths"]) for b in batches)
    rates = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for b in batches:
            model(b["features"], b["lengths"])
        if i:
            rates.append(utterances / (time.perf_counter() - start))
    model.train(was_training)
    return statistics.median(rates)


def _collate() -> Any:
    from moezoo.tasks.speech.data import collate_speech

    return collate_speech


def _fmt(values: list[float], pct: bool) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    scale = 100.0 if pct else 1.0
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}" if pct else f"{mean:.3g}"
    std = statistics.stdev(values) * scale
    return f"{mean:.1f} ± {std:.1f}" if pct else f"{mean:.3g} ± {std:.2g}"


COLUMNS = (
    ("test_cer_mono", "CER mono %", True),
    ("test_cer_cs", "CER cs %", True),
    ("test_wer_mono", "WER mono %", True),
    ("test_wer_cs", "WER cs %", True),
    ("test_cer", "CER all %", True),
    ("lid_acc", "LID acc %", True),
    ("utt_per_s", "train utt/s", False),
    ("load_cv", "load CV", False),
    ("agree_raw", "agree %", True),
    ("agree_matched", "agree matched %", True),
    ("ood_cer", "OOD CER %", True),
    ("ood_wer", "OOD WER %", True),
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moezoo bench speech", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the small corpus preset, fewer steps (minutes)")
    mode.add_argument("--full", action="store_true", help="the default corpus and steps (the default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1, quick 0")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 1500, quick 400)")
    parser.add_argument("--size", default="tiny", choices=("debug", "tiny", "small"))
    parser.add_argument("--batch-size", type=int, default=None, help="default 16, quick 8")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--preset", default=None, help="corpus preset (default 'default', quick 'quick')")
    parser.add_argument("--root", default=None, help="corpus cache root")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--no-ood", action="store_true", help="skip the pocketsphinx-testdata recordings")
    parser.add_argument(
        "--json", default=None, help="write the tables format and the per-run results here (after every run)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json and skip them")
    parser.add_argument(
        "--merge", nargs="+", default=None, help="only tabulate earlier --json files (and write --json if given)"
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    args.steps = args.steps or (400 if args.quick else 1500)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    args.preset = args.preset or ("quick" if args.quick else "default")
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.resume and not args.json:
        parser.error("--resume needs --json FILE (the runs to keep)")
    settings = {k: v for k, v in vars(args).items() if k not in ("merge", "resume")}
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if args.resume and Path(args.json).is_file():
        try:
            saved, kept = load_record(args.json)
        except ValueError as err:
            print(f"moezoo bench speech: --resume: {err}")
            return 2
        differ = [f"{k}={saved[k]!r} (now {settings[k]!r})" for k in TRAINING_KEYS if saved.get(k) != settings[k]]
        if differ:
            print(f"moezoo bench speech: --resume: {args.json} was run with other settings: {', '.join(differ)}")
            return 2
        results.update(kept)
        print(f"resuming: {sum(len(r) for r in kept.values())} runs kept from {args.json}")
    torch.set_num_threads(args.threads)

    from moezoo.tasks.speech.corpus import missing_engines
    from moezoo.tasks.speech.data import SpeechCorpusDataModule, SpeechDataset, pocketsphinx_entries

    if missing_engines():
        print(f"moezoo bench speech: the TTS programs {missing_engines()} are missing; install espeak-ng and flite")
        return 1
    data = SpeechCorpusDataModule(preset=args.preset, root=args.root, batch_size=args.batch_size)
    data.setup("fit")
    data.setup("test")
    ood = None
    if not args.no_ood:
        try:
            ood = SpeechDataset(pocketsphinx_entries(), data.vocab, data.languages, preload=True)
        except ValueError as err:
            print(f"note: out-of-domain set unavailable ({err})")
    num_test = len(data.dataset("test"))
    print(
        f"corpus {data.spec.name}: train {len(data.dataset('train'))}, test {num_test} utterances "
        f"(held-out voices); skipped {data.skipped() or 'none'}; model moe_conformer_{args.size}, {args.steps} steps "
        f"x batch {args.batch_size}, seeds {args.seeds}, {args.threads} thread(s)",
        flush=True,
    )
    dataset = (
        f"generated spoken numbers {data.spec.name} (languages {', '.join(data.languages)}, monolingual and "
        f"code-switched), CER on the {num_test} utterances of the held-out test voices"
    )
    done = {(variant, r.get("seed")) for variant, runs in results.items() for r in runs}
    for variant in args.variants:
        for seed in args.seeds:
            if (variant, seed) in done:
                continue
            start = time.perf_counter()
            res = run_one(variant, seed, args, data, ood)
            res["wall_s"] = time.perf_counter() - start
            results[variant].append(res)
            print(
                f"  {variant:7s} seed {seed}: CER {100 * res['test_cer']:.1f}% (mono "
                f"{100 * res.get('test_cer_mono', math.nan):.1f}, cs {100 * res.get('test_cer_cs', math.nan):.1f}), "
                f"WER {100 * res['test_wer']:.1f}%, {res['train_s']:.0f} s",
                flush=True,
            )
            if args.json:
                write_record(args.json, settings, results, dataset)
    if args.json and results and done >= {(v, s) for v in args.variants for s in args.seeds}:
        write_record(args.json, settings, results, dataset)  # all resumed: the file in this format all the same
    print_table(results)
    return 0


def print_table(results: dict[str, list[dict[str, float]]]) -> None:
    """Markdown table, mean +- std over seeds, and each variant's WER relative to Switch."""
    header = "| variant | params total / active | " + " | ".join(c[1] for c in COLUMNS) + " |"
    print("\n" + header)
    print("|" + "---|" * (len(COLUMNS) + 2))
    for variant, runs in results.items():
        params = f"{runs[0]['params_total'] / 1e6:.2f}M / {runs[0]['params_active'] / 1e6:.2f}M"
        cells = [_fmt([r.get(key, math.nan) for r in runs], pct) for key, _, pct in COLUMNS]
        print(f"| {variant} | {params} | " + " | ".join(cells) + " |")
    base = {k: statistics.fmean(r["test_wer"] for r in runs) for k, runs in results.items()}
    if "switch" in base and base["switch"] > 0:
        rel = ", ".join(f"{k} {100 * (v / base['switch'] - 1):+.1f}%" for k, v in base.items() if k != "switch")
        print(f"\nWER relative to Switch (mean over seeds): {rel}")


def load_record(path: str) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """``(run settings, {variant: runs})`` of a ``--json`` file, every run with its ``seed`` (files written before
    runs carried one list them in the order of their settings' seeds)."""
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict) or not isinstance(record.get("results"), dict):
        raise ValueError(f"{path} has no 'results' object; pass files written by `moezoo bench speech --json`")
    settings = record.get("args", record.get("settings"))
    if not isinstance(settings, dict):
        raise ValueError(f"{path} has no run settings ('args', or 'settings' in files of the earlier format)")
    seeds = list(settings.get("seeds", []))
    results: dict[str, list[dict[str, Any]]] = {}
    for variant, runs in record["results"].items():
        results[variant] = [
            run if "seed" in run else {**run, "seed": seeds[i] if len(runs) == len(seeds) else None}
            for i, run in enumerate(runs)
        ]
    return settings, results


def _mean(values: Iterable[Any]) -> float | None:
    """Mean of the known values (not None, not NaN); None when there is none."""
    known = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.fmean(known) if known else None


def _std(values: Iterable[Any]) -> float | None:
    known = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.stdev(known) if len(known) > 1 else (0.0 if known else None)


EXTRA_KEYS = (
    "test_wer", "test_cer_mono", "test_cer_cs", "test_wer_mono", "test_wer_cs", "lid_acc", "agree_raw",
    "agree_matched", "ood_cer", "ood_wer", "train_s",
)  # fmt: skip


def table_rows(results: dict[str, list[dict[str, Any]]], size: str) -> list[Any]:
    """One :class:`~moezoo.bench.tables.BenchRow` per variant: test CER, mean over seeds; the other numbers in
    ``extra`` (mean and ``_std``, ``test_`` dropped from the names). Load CV and dropped fraction are means over
    seeds; the expert load and specialisation are those of the lowest seed (expert indices of different seeds are
    unrelated)."""
    from moezoo.bench.tables import BenchRow

    rows = []
    for variant, runs in results.items():
        if not runs:
            continue
        dense = bool(VARIANTS[variant].get("dense", False))
        extra: dict[str, Any] = {"cer_std": _std(r["test_cer"] for r in runs)}
        for key in EXTRA_KEYS:
            name = key.removeprefix("test_")
            extra[name] = _mean(r.get(key) for r in runs)
            extra[f"{name}_std"] = _std(r.get(key) for r in runs)
        seeds = [r.get("seed") for r in runs]
        extra["seeds"] = sorted(s for s in seeds if s is not None)
        routed = None
        if not dense:
            with_load = [r for r in runs if r.get("expert_load")]
            routed = min(with_load, key=lambda r: r.get("seed") or 0) if with_load else None
        if routed is not None:
            extra["routing_seed"] = routed.get("seed")
        rows.append(
            BenchRow(
                model=f"moe_conformer_{size}",
                router="dense" if dense else str(VARIANTS[variant]["router"]),
                metric=statistics.fmean(r["test_cer"] for r in runs),
                active_params=int(runs[0]["params_active"]),
                total_params=int(runs[0]["params_total"]),
                train_throughput=_mean(r.get("utt_per_s") for r in runs),
                infer_throughput=_mean(r.get("infer_utt_per_s") for r in runs),
                expert_load_cv=None if dense else _mean(r.get("load_cv") for r in runs),
                dropped_frac=None if dense else _mean(r.get("dropped_frac") for r in runs),
                expert_load=routed["expert_load"] if routed is not None else None,
                specialisation=routed["specialisation"] if routed is not None else None,
                extra=extra,
            )
        )
    return rows


def write_record(
    path: str, settings: dict[str, Any], results: dict[str, list[dict[str, Any]]], dataset: str, mode: str = ""
) -> None:
    """The ``moezoo bench tables`` object plus the raw ``args`` and ``results`` and, when every run recorded its
    wall time, ``runtime_s`` (their sum), written atomically by :func:`~moezoo.bench.tables.write_domain_json`."""
    from moezoo.bench.tables import write_domain_json

    runs = [r for variant_runs in results.values() for r in variant_runs]
    extra: dict[str, Any] = {"args": settings, "results": results}
    if all("wall_s" in r for r in runs):
        extra["runtime_s"] = round(sum(r["wall_s"] for r in runs), 1)
    rows = table_rows(results, str(settings["size"]))
    settings_name = mode or ("quick" if settings.get("quick") else "full")
    write_domain_json(path, "speech", settings_name, dataset, "cer", False, "utterances/s", rows, extra=extra)


def merge(paths: list[str], out: str | None = None) -> int:
    """Tabulate the ``--json`` files of runs made separately (e.g. one process per variant/seed); with ``out``,
    write them as one file of the same format. The files must share the training settings."""
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    first: dict[str, Any] | None = None
    datasets, modes = [], set()
    for path in paths:
        try:
            settings, kept = load_record(path)
        except (OSError, ValueError) as err:
            print(f"moezoo bench speech: --merge: {err}")
            return 2
        print(f"{path}: {settings}")
        if first is None:
            first = settings
        differ = [
            f"{k}={settings.get(k)!r} vs {first.get(k)!r}" for k in TRAINING_KEYS if settings.get(k) != first.get(k)
        ]
        if differ:
            print(f"moezoo bench speech: --merge: {path} differs from {paths[0]} in {', '.join(differ)}")
            return 2
        with open(path) as f:
            datasets.append(json.load(f).get("dataset"))
        modes.add("quick" if settings.get("quick") else "full")
        for variant, runs in kept.items():
            seen = {r["seed"] for r in results[variant] if r["seed"] is not None}
            clash = [r["seed"] for r in runs if r["seed"] in seen]
            if clash:
                print(f"moezoo bench speech: --merge: {variant} seed(s) {clash} appear twice (again in {path})")
                return 2
            results[variant].extend(runs)
    print_table(results)
    if out and first is not None:
        seeds = sorted({r["seed"] for runs in results.values() for r in runs if r["seed"] is not None})
        dataset = next((d for d in datasets if d), f"generated spoken numbers (preset {first.get('preset')})")
        mode = modes.pop() if len(modes) == 1 else "mixed"
        write_record(out, {**first, "seeds": seeds, "merged_from": list(paths)}, results, dataset, mode)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
