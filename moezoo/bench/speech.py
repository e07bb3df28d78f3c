"""``moezoo bench speech``: dense vs Switch vs Omni-router vs LR-MoE vs global-embedding routing on the generated
multilingual / code-switched corpus, at equal active parameters, over several seeds.

Each (variant, seed) trains ``moe_conformer_<size>`` for a fixed number of optimiser steps (AdamW, warmup +
cosine, SpecAugment) on the training voices and is evaluated on the held-out test voices. Reported, mean +- std
over seeds: CER and WER (monolingual and code-switched utterances separately), LID frame accuracy (LR-MoE),
training throughput (utterances/s, wall clock, this process only), expert-load CV (test set, mean over layers),
cross-layer agreement of top-1 routing decisions (raw, and after the best one-to-one relabelling of experts
between consecutive layers), and the out-of-domain CER/WER on the 10 recordings of ``pocketsphinx-testdata``.

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
from typing import Any

import torch

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"router": "topk", "dense": True},
    "switch": {"router": "topk"},
    "omni": {"router": "omni"},
    "lrmoe": {"router": "language", "lid_layer": 1},
    "global": {"router": "global_embedding"},
}


def _params(model: torch.nn.Module) -> tuple[int, int]:
    """(total parameters, active parameters per frame): each MoE layer counts its router + top-k experts."""
    from moezoo.layers import MoE

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = (m.experts.w_in.numel() + m.experts.w_out.numel()) // m.num_experts
            inactive += per_expert * (m.num_experts - m.top_k)
    return total, total - inactive


def run_one(variant: str, seed: int, args: argparse.Namespace, data: Any, ood: Any) -> dict[str, float]:
    from moezoo.layers import update_router_states
    from moezoo.layers.speech_routers import cross_layer_agreement
    from moezoo.models.conformer import lengths_to_mask, subsampled_lengths
    from moezoo.tasks.base import param_groups, warmup_cosine
    from moezoo.tasks.speech import SpeechRecognitionTask
    from moezoo.tasks.speech.asr import encoder_frame_labels

    torch.manual_seed(seed)
    kwargs = {"num_experts": 4, "top_k": 1, **VARIANTS[variant]}
    task = SpeechRecognitionTask(f"moe_conformer_{args.size}", kwargs, lr=args.lr, lid_coef=0.3, spec_augment=True)
    total, active = _params(task.model)
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
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(data.dataset("test"), batch_size=32, collate_fn=_collate()):
            _, auxes, metrics, _ = task.compute_loss(batch, "test")
            if "lid_acc" in metrics:  # weight by the labelled encoder frames of the batch, as the metric counts
                lengths = subsampled_lengths(batch["lengths"])
                labels = encoder_frame_labels(batch["lid"], int(lengths.max()))
                valid = int(((labels >= 0) & lengths_to_mask(lengths, labels.shape[1])).sum())
                lid_hits += float(metrics["lid_acc"]) * valid
                lid_frames += valid
            for i, a in enumerate(auxes):
                load[i] = load.get(i, torch.zeros_like(a.tokens_per_expert_E)) + a.tokens_per_expert_E
            routings = [a.routing for a in auxes if a.routing is not None]
            if len(routings) >= 2:
                tokens = routings[0].num_tokens
                agree["raw"].append(cross_layer_agreement(routings) * tokens)
                agree["matched"].append(cross_layer_agreement(routings, matched=True) * tokens)
                agree["tokens"].append(tokens)
        result = {f"test_{k}": v for k, v in task.error_rates().items()}
        task.errors.clear()
        if ood is not None:
            for batch in torch.utils.data.DataLoader(ood, batch_size=10, collate_fn=_collate()):
                task.compute_loss(batch, "test")
            result.update({f"ood_{k}": v for k, v in task.error_rates().items() if k in ("cer", "wer")})
            task.errors.clear()
    cvs = [float(v.std(unbiased=False) / v.mean().clamp_min(1e-12)) for v in load.values()]
    tokens = sum(agree["tokens"])
    result.update(
        {
            "lid_acc": lid_hits / lid_frames if lid_frames else math.nan,
            "utt_per_s": utterances / train_s,
            "train_s": train_s,
            "load_cv": sum(cvs) / len(cvs) if cvs else math.nan,
            "agree_raw": sum(agree["raw"]) / tokens if tokens else math.nan,
            "agree_matched": sum(agree["matched"]) / tokens if tokens else math.nan,
            "params_total": float(total),
            "params_active": float(active),
        }
    )
    return result


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
    parser.add_argument("--quick", action="store_true", help="the small corpus preset, fewer steps (minutes)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 1500, quick 120)")
    parser.add_argument("--size", default="tiny", choices=("debug", "tiny", "small"))
    parser.add_argument("--batch-size", type=int, default=None, help="default 16, quick 8")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--preset", default=None, help="corpus preset (default 'default', quick 'quick')")
    parser.add_argument("--root", default=None, help="corpus cache root")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--no-ood", action="store_true", help="skip the pocketsphinx-testdata recordings")
    parser.add_argument("--json", default=None, help="also write the per-run results to this JSON file")
    parser.add_argument("--merge", nargs="+", default=None, help="only print one table from earlier --json files")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge)
    args.steps = args.steps or (120 if args.quick else 1500)
    args.preset = args.preset or ("quick" if args.quick else "default")
    args.batch_size = args.batch_size or (8 if args.quick else 16)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
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
    print(
        f"corpus {data.spec.name}: train {len(data.dataset('train'))}, test {len(data.dataset('test'))} utterances "
        f"(held-out voices); skipped {data.skipped() or 'none'}; model moe_conformer_{args.size}, {args.steps} steps "
        f"x batch {args.batch_size}, seeds {args.seeds}, {args.threads} thread(s)",
        flush=True,
    )
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    for variant in args.variants:
        for seed in args.seeds:
            res = run_one(variant, seed, args, data, ood)
            results[variant].append(res)
            print(
                f"  {variant:7s} seed {seed}: CER {100 * res['test_cer']:.1f}% (mono "
                f"{100 * res.get('test_cer_mono', math.nan):.1f}, cs {100 * res.get('test_cer_cs', math.nan):.1f}), "
                f"WER {100 * res['test_wer']:.1f}%, {res['train_s']:.0f} s",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "merge"}, "results": results}, f)
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


def merge(paths: list[str]) -> int:
    """Print one table from the ``--json`` files of runs made separately (e.g. one process per variant/seed)."""
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        print(f"{path}: {record['settings']}")
        for variant, runs in record["results"].items():
            results[variant].extend(runs)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
