"""``moezoo compare``: is MoE worth it on my problem? A config against its dense twin (and other configs), over seeds.

``moezoo compare --config CFG [--config CFG2 ...] [--seeds 0,1,2] [--dense-twin] [--out DIR] [--fresh]
[--threads N] [FIT OVERRIDES ...]``

- Every run is ``moezoo fit --config <config> --seed_everything <seed> <overrides>`` in this process, through the
  domain benchmarks' runner (:func:`moezoo.tasks.bench.runner.execute`: fit, then the test of the best checkpoint),
  which collects the test metrics, the routing statistics of the test split, the training throughput and the
  parameter counts. Its files go to ``--out/<variant>/seed<seed>`` (default ``--out``: ``runs/compare/<first
  config's name>``), its logs wherever the config's logger puts them, as with ``moezoo fit``.
- ``--dense-twin`` adds the first config's equal-active-compute dense twin: the same config with
  ``model_kwargs.moe.dense: true`` (:class:`moezoo.models.spec.MoESpec`; ``neck_moe`` for YOLO-MoE): each MoE
  slot becomes a dense FFN as wide as the MoE's active experts per token. A config whose model takes no MoE spec,
  or is already the dense twin, is refused before anything trains.
- Any ``--trainer.*``, ``--model.*`` or ``--data.*`` argument is passed on to every ``fit`` (e.g. a budget:
  ``--trainer.max_steps 300 --trainer.max_epochs -1``).
- Rows: one per config (and the twin), each value the mean ± std over seeds (the benchmarks' aggregation,
  :func:`moezoo.tasks.bench.suite.bench_rows`): the task's test metrics (the ``test/*`` metrics every run logged,
  but the routing statistics and the routers' auxiliary loss), training throughput (samples per second of
  optimiser-step wall time, and per CPU second), active / total parameters (:func:`moezoo.stats.count_parameters`),
  and the routing statistics of the test split: expert load CV, dropped fraction, router entropy
  (:meth:`moezoo.stats.RoutingStats.summary`, layer means).
- Verdicts: every other row against the baseline (the dense twin with ``--dense-twin``, else the first config), per
  metric. **Rule**: a difference is *within the seed spread* when ``|mean_a - mean_b| <= max(std_a, std_b)`` (the
  sample standard deviations over seeds), i.e. when it is no larger than how much one of the two moves from seed to
  seed; then the seeds do not tell the two apart. Otherwise it is *outside the seed spread*, and the verdict says
  which is higher and, for metrics whose direction is known from their name (accuracy up; loss, error rates, MSE,
  FID down), which is better. With one seed per row there is no spread and no verdict. The rule is a plain
  screen, not a significance test: at three seeds a difference just outside the spread is suggestive only; add
  seeds before trusting it.
- Output: the table and the verdicts on stdout, and atomically in ``--out``: ``compare.md``, ``compare.csv`` (one row
  per variant, ``<name>`` and ``<name>_std`` columns) and ``compare.json`` (the benchmarks' tables format,
  :mod:`moezoo.tasks.bench.schema`, plus ``metrics``, ``baseline``, ``verdicts``, ``args`` and the raw ``runs``),
  rewritten after every run.
- Resuming: the runs already in ``--out/compare.json`` (same variant, seed, config and overrides) are reused, so a
  killed compare picks up where it stopped when the same command is run again (runs of the file that the command does
  not ask for, e.g. of a seed left out, stay in the file as ``other_runs``); runs of the same variant and seed made
  with other overrides or another config are an error (use another ``--out`` or ``--fresh``, which sets the earlier
  file aside as ``compare.replaced-<UTC time>.json`` and starts again).

Why one long file: argument checking, the dense-twin override, resume bookkeeping and the verdict table are one
command; the runs and aggregation themselves are :mod:`moezoo.tasks.bench.runner` and
:mod:`~moezoo.tasks.bench.suite`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moezoo.io import write_text_atomic
from moezoo.tasks.bench.runner import ROOT, ROUTING_KEYS, RunSpec, merge_overrides
from moezoo.tasks.bench.schema import BenchRow, write_domain_json
from moezoo.tasks.bench.suite import FIT_PREFIXES, BenchSpec, Budget, Variant, bench_rows, resume_clash, run_pending

JSON_NAME, MD_NAME, CSV_NAME = "compare.json", "compare.md", "compare.csv"
TWIN_SUFFIX = "-dense"
THROUGHPUT_UNIT = "samples/s"
#: the routing statistics of a row (mean and std over seeds), shown apart from the task's metrics
ROUTING_STATS = ("expert_load_cv", "dropped_frac", "router_entropy")
#: name fragments of metrics where lower is better (tested first, on the metric's last part: mape is no map)
LOWER_BETTER = ("loss", "err", "cer", "wer", "mse", "mae", "rmse", "mape", "fid", "fd_", "nll", "ppl", "perplexity")
HIGHER_BETTER = ("acc", "top", "map", "f1", "auc", "precision", "recall", "r2", "purity", "iou")


# -- input -----------------------------------------------------------------------------------------------------------
def parse_seeds(values: Sequence[str]) -> tuple[int, ...]:
    """``["0,1,2"]`` or ``["0", "1", "2"]`` -> ``(0, 1, 2)``; distinct integers in ``[0, 2**32 - 1]`` (Lightning's
    seed range)."""
    tokens = [t.strip() for value in values for t in value.split(",") if t.strip()]
    if not tokens:
        raise ValueError(f"--seeds: got {list(values)!r}; give at least one integer, e.g. --seeds 0,1,2")
    try:
        seeds = tuple(int(t) for t in tokens)
    except ValueError:
        raise ValueError(f"--seeds must be integers separated by commas or spaces, got {' '.join(values)!r}") from None
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise ValueError(f"--seeds must lie in [0, 2**32 - 1], got {bad}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"--seeds lists {twice} more than once; each seed is one run")
    return seeds


def config_path(config: str) -> str:
    """A config as a run names it: relative to the checkout when it lies inside it (as the benchmarks name theirs),
    else absolute (the runner resolves relative names against the checkout, not the current folder)."""
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"--config {config!r}: no such file (looked for {path})")
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def variant_names(configs: Sequence[str], dense_twin: bool) -> list[str]:
    """One name per config (its file name without ``.yaml``, made unique with ``-2``, ``-3`` ...), then the first
    config's dense twin (``<name>-dense``) when asked."""
    names: list[str] = []
    for config in configs:
        stem = Path(config).stem
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    if dense_twin:
        twin, n = names[0] + TWIN_SUFFIX, 1
        while twin in names:
            n += 1
            twin = f"{names[0]}{TWIN_SUFFIX}-{n}"
        names.append(twin)
    return names


def dense_twin_override(config: str, overrides: Sequence[str]) -> tuple[str, str]:
    """The ``moezoo fit`` override that turns ``config`` (with ``overrides``) into its dense twin:
    ``("--model.init_args.model_kwargs.<spec argument>", "<the model's MoE spec as JSON, with dense: true>")``.

    The config is instantiated (not trained) to read its model name and MoE settings in their current form.
    Raises ``ValueError`` when its model takes no MoE spec or already is a dense twin.
    """
    from moezoo.models.spec import MoESpec, spec_argument
    from moezoo.tasks.cli import cli_main

    with tempfile.TemporaryDirectory() as tmp:
        args = ["--config", str(ROOT / config), *overrides, "--trainer.default_root_dir", tmp]
        try:
            task = cli_main(args, run=False).model
        except SystemExit as exit_:  # the parser printed why
            raise ValueError(f"--config {config!r} does not load with these overrides (see above)") from exit_
    name, kwargs = getattr(task, "model_name", None), getattr(task, "model_kwargs", None)
    into = spec_argument(name) if isinstance(name, str) else None
    if into is None or not isinstance(kwargs, dict):
        raise ValueError(
            f"--dense-twin: the model of --config {config!r} ({name or type(task).__name__}) takes no MoE spec "
            "(model_kwargs.moe), so it has no dense twin; compare it with --config against a dense config instead"
        )
    spec = kwargs.get(into) or {}
    spec = spec.to_dict() if isinstance(spec, MoESpec) else dict(spec)
    if spec.get("dense"):
        raise ValueError(
            f"--dense-twin: --config {config!r} already is a dense twin (model_kwargs.{into}.dense: true); give the "
            "MoE config instead"
        )
    return f"--model.init_args.model_kwargs.{into}", json.dumps({**spec, "dense": True}, sort_keys=True)


# -- the verdict rule --------------------------------------------------------------------------------------------------
def higher_is_better(metric: str) -> bool | None:
    """Whether a larger value of ``metric`` (``test/acc``, ``test/cer``) is better, from its name; None if unknown."""
    name = metric.rsplit("/", 1)[-1].lower()
    if any(part in name for part in LOWER_BETTER):
        return False
    if any(part in name for part in HIGHER_BETTER):
        return True
    return None


@dataclass(frozen=True)
class Verdict:
    """One metric of one variant against the baseline; ``within`` is None when either side has no spread."""

    metric: str
    variant: str
    baseline: str
    mean: float | None
    std: float | None
    baseline_mean: float | None
    baseline_std: float | None
    diff: float | None  # mean - baseline_mean
    spread: float | None  # max(std, baseline_std)
    within: bool | None
    better: str | None  # the better variant's name when outside the spread and the direction is known

    @property
    def text(self) -> str:
        head = f"{self.variant} vs {self.baseline}, {self.metric}: "
        if self.diff is None or self.mean is None or self.baseline_mean is None:
            return head + "no verdict (a value is missing)"
        values = f"{self.mean:.4g} ± {_fmt(self.std)} vs {self.baseline_mean:.4g} ± {_fmt(self.baseline_std)}"
        if self.within is None:
            return head + f"{values}: no verdict, one seed gives no spread (run --seeds with at least 2)"
        if self.within:
            return head + f"{values}: within the seed spread (|diff| {abs(self.diff):.3g} <= {self.spread:.3g})"
        side = f"{self.variant} {'higher' if self.diff > 0 else 'lower'}"
        better = f", {self.better} better" if self.better else ""
        return head + f"{values}: outside the seed spread, {side} by {abs(self.diff):.3g} > {self.spread:.3g}{better}"


def verdict(
    metric: str, variant: str, mean_std: tuple[float | None, float | None], baseline: str,
    baseline_mean_std: tuple[float | None, float | None],
) -> Verdict:  # fmt: skip
    """Apply the rule of the module docstring: within the seed spread iff ``|mean - baseline mean| <= max(stds)``."""
    (mean, std), (base_mean, base_std) = mean_std, baseline_mean_std
    diff = None if mean is None or base_mean is None else mean - base_mean
    spread = None if std is None or base_std is None else max(std, base_std)
    within = None if diff is None or spread is None else abs(diff) <= spread
    better = None
    direction = higher_is_better(metric)
    if within is False and direction is not None and diff is not None:
        better = variant if (diff > 0) == direction else baseline
    return Verdict(metric, variant, baseline, mean, std, base_mean, base_std, diff, spread, within, better)


# -- the table -------------------------------------------------------------------------------------------------------
def task_metrics(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The ``test/*`` metrics every run logged (in the first run's order), without the routing statistics (shown
    apart) and the routers' summed auxiliary loss; a router's own losses (``test/balance``, ``test/z_loss``) drop out
    as soon as a run without that router (the dense twin) is among ``runs``."""
    left_out = {f"test/{key}" for key in ROUTING_KEYS} | {"test/aux_loss"}
    if not runs:
        return []
    common = set.intersection(*(set(r["metrics"]) for r in runs))
    return [k for k in runs[0]["metrics"] if k.startswith("test/") and k in common and k not in left_out]


def bench_spec(variants: Sequence[Variant], metrics: Sequence[str]) -> BenchSpec:
    """The benchmark description :func:`~moezoo.tasks.bench.suite.bench_rows` aggregates a comparison's runs with."""
    first = metrics[0] if metrics else "test/loss"
    none = Budget(seeds=(), variants=())
    return BenchSpec(
        domain="compare", dataset="the configs' data", metric=first.removeprefix("test/"), metric_key=first,
        higher_is_better=bool(higher_is_better(first)), throughput_unit=THROUGHPUT_UNIT, variants=tuple(variants),
        quick=none, full=none, extra_metrics=tuple(metrics),
    )  # fmt: skip


def _mean_std(row: BenchRow, name: str) -> tuple[float | None, float | None]:
    return row.extra.get(name), row.extra.get(f"{name}_std")


def _fmt(value: float | None, fmt: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _pm(row: BenchRow, name: str, fmt: str = ".4g") -> str:
    mean, std = _mean_std(row, name)
    return _fmt(mean, fmt) + (f" ± {_fmt(std, fmt)}" if std is not None else "")


def verdicts(rows: Sequence[BenchRow], metrics: Sequence[str], baseline: str) -> list[Verdict]:
    by_name = {row.extra["variant"]: row for row in rows}
    if baseline not in by_name:
        return []
    base = by_name[baseline]
    out = []
    for name, row in by_name.items():
        if name == baseline:
            continue
        for metric in metrics:
            key = metric.removeprefix("test/")
            out.append(verdict(metric, name, _mean_std(row, key), baseline, _mean_std(base, key)))
    return out


def markdown(rows: Sequence[BenchRow], metrics: Sequence[str], found: Sequence[Verdict], baseline: str) -> str:
    """The table (mean ± std over seeds) and the verdicts as Markdown."""
    names = [m.removeprefix("test/") for m in metrics]
    head = ["variant", "seeds", *(f"{n} {_arrow(m)}".rstrip() for n, m in zip(names, metrics, strict=True)),
            f"train {THROUGHPUT_UNIT}", "train samples/CPU-s", "active / total params", "load CV", "dropped",
            "router entropy"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.extra["variant"]), ",".join(map(str, row.extra["seeds"]))]
        cells += [_pm(row, n) for n in names]
        cells += [_pm(row, "train_throughput", ".1f"), _pm(row, "train_cpu_throughput", ".1f"),
                  f"{row.active_params:,} / {row.total_params:,}"]  # fmt: skip
        cells += [_pm(row, key, ".3f") for key in ROUTING_STATS]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if found:
        text += f"\nAgainst {baseline} (within the seed spread: |mean diff| <= the larger std over seeds):\n\n"
        text += "\n".join(f"- {v.text}" for v in found) + "\n"
    return text


def _arrow(metric: str) -> str:
    direction = higher_is_better(metric)
    return "" if direction is None else ("↑" if direction else "↓")


def csv_text(rows: Sequence[BenchRow], metrics: Sequence[str], configs: dict[str, str]) -> str:
    names = [m.removeprefix("test/") for m in metrics]
    stats = [*names, "train_throughput", "train_cpu_throughput", *ROUTING_STATS]
    columns = ["variant", "config", "model", "seeds", *[c for n in stats for c in (n, f"{n}_std")], "active_params",
               "total_params"]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        name = row.extra["variant"]
        record: dict[str, Any] = {"variant": name, "config": configs.get(name, ""), "model": row.model,
                                  "seeds": " ".join(map(str, row.extra["seeds"])),
                                  "active_params": row.active_params, "total_params": row.total_params}  # fmt: skip
        for stat in stats:
            record[stat], record[f"{stat}_std"] = _mean_std(row, stat)
        writer.writerow(record)
    return buffer.getvalue()


@dataclass
class Comparison:
    """What one ``moezoo compare`` runs and writes: the variants and their fit overrides, the seeds, the output."""

    variants: list[Variant]
    overrides: dict[str, tuple[str, ...]]  # variant -> its fit overrides
    seeds: tuple[int, ...]
    baseline: str
    out: Path
    other_runs: list[dict[str, Any]] = field(default_factory=list)  # earlier runs not asked for now (kept in the JSON)

    def run_specs(self) -> list[RunSpec]:
        return [RunSpec(v.name, s, v.config, self.overrides[v.name]) for s in self.seeds for v in self.variants]

    def write(self, runs: list[dict[str, Any]], args: dict[str, Any]) -> str:
        """Aggregate ``runs`` and write ``compare.{json,md,csv}`` in ``out``; returns the Markdown."""
        metrics = task_metrics(runs)
        spec = bench_spec(self.variants, metrics)
        rows = bench_rows(spec, runs)
        found = verdicts(rows, metrics, self.baseline)
        text = markdown(rows, metrics, found, self.baseline)
        extra = {"metrics": metrics, "baseline": self.baseline, "verdicts": [asdict(v) | {"text": v.text}
                 for v in found], "args": args, "runs": runs, "other_runs": self.other_runs}  # fmt: skip
        if runs:
            extra["runtime_s"] = round(sum(r.get("wall_s", 0.0) for r in runs), 1)
        write_domain_json(self.out / JSON_NAME, spec.domain, "custom", spec.dataset, spec.metric,
                          spec.higher_is_better, spec.throughput_unit, rows, extra)  # fmt: skip
        write_text_atomic(self.out / MD_NAME, text)
        write_text_atomic(self.out / CSV_NAME, csv_text(rows, metrics, {v.name: v.config for v in self.variants}))
        return text


def load_runs(path: Path) -> list[dict[str, Any]]:
    """The finished runs of an earlier ``compare.json``, those of its table and those kept aside (none when there is
    no such file)."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a compare result ({err}); use another --out or --fresh") from None
    if not isinstance(data, dict) or data.get("domain") != "compare" or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a compare result (no 'runs' list); use another --out or --fresh")
    return [*data["runs"], *data.get("other_runs", [])]


# -- the command -------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="moezoo compare",
        description="Fit configs (and a config's dense twin) over seeds through moezoo fit; tabulate mean ± std and "
        "say when a difference is within the seed spread.",
        epilog="Any --trainer.*, --model.* or --data.* argument is passed on to every moezoo fit. A difference is "
        "within the seed spread when |mean difference| <= the larger std over seeds. Rerunning a stopped compare "
        "reuses its finished runs. "
        "Example: moezoo compare --config configs/smoke/vision_digits_moe_vit.yaml --seeds 0,1,2 --dense-twin",
    )
    p.add_argument("--config", action="append", required=True, help="a moezoo fit config (repeat to add configs)")
    p.add_argument("--seeds", nargs="+", default=["0,1,2"], help="comma or space separated (default 0,1,2)")
    p.add_argument("--dense-twin", action="store_true", help="add the first config's equal-active-compute dense twin")
    p.add_argument("--out", default=None, help="results folder (default runs/compare/<first config's name>)")
    p.add_argument("--fresh", action="store_true", help="set aside the results in --out and run everything again")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args, rest = p.parse_known_args(list(argv))
    unknown = [a for a in rest if a.startswith("--") and not a.startswith(FIT_PREFIXES)]
    if unknown or (rest and not rest[0].startswith("--")):
        p.error(f"unrecognized arguments: {' '.join(unknown or rest)} (fit overrides start with "
                f"{', '.join(FIT_PREFIXES)}; the seed is set by --seeds)")  # fmt: skip
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be a positive integer, got {args.threads}")
    return args, rest


def plan(args: argparse.Namespace, fit_args: Sequence[str]) -> Comparison:
    """The comparison the arguments ask for; ``ValueError`` for bad input (before anything trains)."""
    seeds = parse_seeds(args.seeds)
    overrides = merge_overrides(fit_args)
    configs = [config_path(c) for c in args.config]
    names = variant_names(configs, args.dense_twin)
    variants = [Variant(n, c, "config") for n, c in zip(names, configs, strict=False)]
    per_variant = {v.name: overrides for v in variants}
    if args.dense_twin:
        twin = Variant(names[-1], configs[0], "dense")
        variants.append(twin)
        per_variant[twin.name] = merge_overrides(overrides, dense_twin_override(configs[0], overrides))
    out = Path(args.out) if args.out else Path("runs") / "compare" / names[0]
    baseline = variants[-1].name if args.dense_twin else variants[0].name
    if len(variants) < 2:
        print("moezoo compare: one config and no --dense-twin: a table without verdicts", flush=True)
    return Comparison(variants, per_variant, seeds, baseline, out)


def main(argv: Sequence[str] | None = None) -> int:
    args, fit_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        comparison = plan(args, fit_args)
        path = comparison.out / JSON_NAME
        if args.fresh and path.is_file():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(path.stat().st_mtime))
            os.replace(path, path.with_name(f"compare.replaced-{stamp}.json"))
        todo = comparison.run_specs()
        earlier = load_runs(path)
        clash = resume_clash(todo, earlier)
        if clash:
            raise ValueError(f"{path} {clash}; use another --out, or --fresh to run again")
    except ValueError as err:
        print(f"moezoo compare: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    wanted = {run.key for run in todo}
    runs = [r for r in earlier if (r["variant"], r["seed"], r["cell"]) in wanted]
    comparison.other_runs = [r for r in earlier if (r["variant"], r["seed"], r["cell"]) not in wanted]
    record_args = {"configs": [v.config for v in comparison.variants if v.router != "dense"],
                   "seeds": list(comparison.seeds), "dense_twin": args.dense_twin, "overrides": fit_args,
                   "threads": args.threads}  # fmt: skip
    print(f"moezoo compare: {len(todo)} runs ({len(comparison.variants)} variants x {len(comparison.seeds)} seeds), "
          f"{len(runs)} reused from {path}", flush=True)  # fmt: skip

    def show(record: dict[str, Any]) -> str:
        return ", ".join(f"{k} {record['metrics'][k]:.4g}" for k in task_metrics([record]))

    run_pending(todo, runs, comparison.out, "compare", show, save=lambda done: comparison.write(done, record_args))
    text = comparison.write(runs, record_args)
    print(text)
    print(f"moezoo compare: wrote {', '.join(str(comparison.out / n) for n in (MD_NAME, CSV_NAME, JSON_NAME))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
