"""A domain benchmark as data (:class:`BenchSpec`: configs, budgets, what to read) and the command that runs it.

``moezoo bench <domain> [--quick|--full] [--seeds 0,1] [--variants a,b] [--json PATH] [--resume]
[--merge A.json B.json ...] [--threads N] [--out DIR] [FIT OVERRIDES ...]``

- ``--quick`` (the default) and ``--full`` choose the budget: seeds, default variants and the ``moezoo fit``
  overrides applied to every run (steps, batch size, evaluation size ...). ``--variants`` chooses rows by name or
  by the name of a group of them (:attr:`BenchSpec.groups`, e.g. an ablation).
- Any ``--trainer.*``, ``--model.*`` or ``--data.*`` argument is passed on to every ``fit`` after the budget's
  overrides; the result's settings are then ``"custom"``. Seeds and variants do not change the settings name.
- Each run is ``moezoo fit --config <variant's config> --seed_everything <seed> <overrides>`` (its ``command`` in
  the JSON). Its files go to ``--out/<variant>[/<cell>]/seed<seed>``.
- ``--json PATH`` is rewritten atomically after every run: the tables format (:mod:`moezoo.tasks.bench.schema`)
  plus ``args`` and the raw ``runs``; ``--resume`` keeps the runs already there (same overrides) and skips them;
  ``--merge`` tabulates runs made in separate processes (and writes ``--json`` if given).
- ``--readme PATH`` writes the table, how it was made and one ``moezoo fit`` command per row between the lines
  ``<!-- moezoo-bench-<domain>:begin -->`` and ``<!-- moezoo-bench-<domain>:end -->`` of PATH (after the runs, or
  from the ``--merge`` files without running anything): the README's domain tables are this output.

A row aggregates one variant's runs: the metric is the mean over cells (e.g. forecast horizons) of the mean over
seeds; ``extra`` holds its std over seeds, the benchmark's extra test metrics (mean and ``_std`` over runs), the
seeds and the commands, the training and inference throughputs (wall and CPU, with their std over runs) and the
routing statistics (load CV, dropped fraction, router entropy) with their std over runs. The row's own
``train_throughput`` / ``infer_throughput`` are the CPU figures (items per CPU second of the process): a benchmark
runs at one torch thread, where they are steadier than wall time on a shared machine. Load CV and dropped
fraction are means over runs; the expert load and specialisation are those of one run (the first cell, lowest
seed): expert indices of different runs are unrelated. Dense twins and baselines (:data:`UNROUTED`) have no
routing statistics, and a model without parameters (a naive forecast) no training throughput; the Markdown marks
baselines ``(baseline)``.

Why one long file: the spec, its argument parsing, the row aggregation, the JSON/README writers, ``--merge`` and
``--resume`` are one contract that every domain benchmark module (a :class:`BenchSpec` and nothing else) relies
on; split, each piece would import the others' private layout of a run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moezoo.io import write_text_atomic
from moezoo.tasks.bench.render import readme_markers, replace_readme_block
from moezoo.tasks.bench.runner import Extras, Infer, RunSpec, execute, merge_overrides
from moezoo.tasks.bench.schema import BASELINE, UNROUTED, BenchRow, write_domain_json

FIT_PREFIXES = ("--trainer.", "--model.", "--data.")


@dataclass(frozen=True)
class Variant:
    """A row of the benchmark: its ``--variants`` name, its config (relative to the checkout), its router label in
    the tables (``"dense"`` for the dense twin, ``"baseline"`` for a baseline), ``moezoo fit`` overrides of its
    own, applied after the budget's and the command line's (e.g. the single epoch of a model without parameters),
    and what it is when the name does not say (an ablation's one change)."""

    name: str
    config: str
    router: str
    overrides: tuple[str, ...] = ()
    description: str = ""

    @property
    def routed(self) -> bool:
        return self.router not in UNROUTED


@dataclass(frozen=True)
class Budget:
    """Seeds, default variants, ``moezoo fit`` overrides and cells (runs averaged within a row) of a setting."""

    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    cells: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class BenchSpec:
    """Everything domain-specific about a benchmark; :func:`main` does the rest."""

    domain: str
    dataset: str
    metric: str  # the tables' metric name ("acc")
    metric_key: str  # the test metric it is read from ("test/acc")
    higher_is_better: bool
    throughput_unit: str
    variants: tuple[Variant, ...]
    quick: Budget
    full: Budget
    extra_metrics: tuple[str, ...] = ()  # test metrics kept in a row's extra (mean and _std over runs)
    infer: Infer | None = None
    extras: Extras | None = None  # numbers of a finished run beyond its test metrics
    cell_option: str | None = None  # the flag naming cells (e.g. "horizons")
    cell_overrides: Callable[[str], tuple[str, ...]] | None = None
    # (cell, variant) -> fit overrides applied *before* the budget's and the command line's, which may replace
    # them (a series' own look-back, horizon or season); ``cell_overrides`` come after and always hold
    cell_defaults: Callable[[str, str], tuple[str, ...]] | None = None
    # runs -> Markdown appended to the README block (a benchmark's own per-cell table or verdicts)
    readme_extra: Callable[[Sequence[dict[str, Any]]], str] | None = None
    notes: str = ""
    description: str = ""  # the benchmark module's docstring (its --help)
    # (name, why) of names one might expect as variants that are not (a registered router outside the study):
    # ``--variants <name>`` says why instead of only listing the variants
    not_variants: tuple[tuple[str, str], ...] = ()
    # (name, variants) of named sets of variants (an ablation): ``--variants <name>`` selects them all
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def _list(values: Sequence[str] | None) -> list[str]:
    """``["0,1"]`` or ``["0", "1"]`` -> ``["0", "1"]``."""
    return [v for value in values or () for v in value.split(",") if v]


def parse_args(spec: BenchSpec, argv: Sequence[str]) -> tuple[argparse.Namespace, Budget, str]:
    """The arguments, the budget they select (fit overrides appended) and its name (quick, full or custom)."""
    budgets = "\n".join(
        f"--{name}: seeds {list(b.seeds)}, variants {list(b.variants)}"
        + (f", {spec.cell_option} {list(b.cells)}" if spec.cell_option else "")
        + f"\n  fit overrides: {' '.join(b.overrides) or '(none: the configs as they are)'}"
        for name, b in (("quick", spec.quick), ("full", spec.full))
    )
    p = argparse.ArgumentParser(
        prog=f"moezoo bench {spec.domain}",
        description=spec.description or (__doc__ or "").split("\n\n")[0],
        epilog=f"{budgets}\n\nAny --trainer.*, --model.* or --data.* argument is passed on to every moezoo fit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick budget (the default)")
    mode.add_argument("--full", action="store_true", help="the full budget")
    names = [v.name for v in spec.variants]
    groups = dict(spec.groups)
    named = "".join(f"; {group!r} selects {list(members)}" for group, members in groups.items())
    p.add_argument("--variants", nargs="+", default=None, help=f"comma or space separated, from {names}{named}")
    p.add_argument("--seeds", nargs="+", default=None, help="comma or space separated seeds")
    if spec.cell_option:
        p.add_argument(f"--{spec.cell_option}", nargs="+", default=None, help="comma or space separated")
    p.add_argument("--json", default=None, help="write the tables format and the raw runs here (after every run)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --json and skip them")
    p.add_argument("--merge", nargs="+", default=None, help="only tabulate these --json files (write --json if given)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--out", default=f"bench_results/runs/{spec.domain}", help="folder of the runs' files")
    begin, end = readme_markers(spec.domain)
    p.add_argument("--readme", default=None, help=f"write the table and its commands between {begin} and {end} of it")
    args, rest = p.parse_known_args(list(argv))
    unknown = [a for a in rest if a.startswith("--") and not a.startswith(FIT_PREFIXES)]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (fit overrides start with {', '.join(FIT_PREFIXES)})")
    base = spec.full if args.full else spec.quick
    chosen = [v for name in _list(args.variants) for v in groups.get(name, (name,))]
    args.variants = list(dict.fromkeys(chosen)) or list(base.variants)
    bad = [v for v in args.variants if v not in names]
    if bad:
        why = dict(spec.not_variants)
        reasons = "".join(f"; {v!r} is left out on purpose: {why[v]}" for v in bad if v in why)
        also = f" or the groups {list(groups)}" if groups else ""
        p.error(f"--variants: {bad} are not variants of this benchmark{reasons}; choose from {names}{also}")
    try:
        seeds = tuple(int(s) for s in _list(args.seeds)) or base.seeds
    except ValueError:
        p.error(f"--seeds must be integers, got {args.seeds}")
    cells = tuple(_list(getattr(args, spec.cell_option))) if spec.cell_option else ()
    try:
        overrides = merge_overrides(base.overrides, rest)
    except ValueError as err:
        p.error(str(err))
    budget = Budget(seeds, tuple(args.variants), overrides, cells or base.cells)
    custom = bool(rest) or budget.cells != base.cells
    return args, budget, "custom" if custom else ("full" if args.full else "quick")


def run_specs(spec: BenchSpec, budget: Budget) -> list[RunSpec]:
    runs = []
    for cell in budget.cells:
        cell_args = spec.cell_overrides(cell) if spec.cell_overrides is not None and cell else ()
        for seed in budget.seeds:
            for name in budget.variants:
                defaults = spec.cell_defaults(cell, name) if spec.cell_defaults is not None and cell else ()
                overrides = merge_overrides(defaults, budget.overrides, cell_args, spec.variant(name).overrides)
                runs.append(RunSpec(name, seed, spec.variant(name).config, overrides, cell))
    return runs


# -- rows -----------------------------------------------------------------------------------------------------
def _mean(values: Sequence[Any]) -> float | None:
    known = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.fmean(known) if known else None


def _std(values: Sequence[Any]) -> float | None:
    known = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.stdev(known) if len(known) > 1 else None


def _seeds_std(vruns: Sequence[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> float | None:
    """The spread of a multi-cell row: over the seeds that ran every cell of the row, the std of each seed's mean
    over the cells (so that the row's "mean ± std" is over seeds, as its table says, not over cells)."""
    cells = {r["cell"] for r in vruns}
    seeds = sorted({r["seed"] for r in vruns})
    complete = [s for s in seeds if cells <= {r["cell"] for r in vruns if r["seed"] == s}]
    return _std([_mean([get(r) for r in vruns if r["seed"] == s]) for s in complete])


def bench_rows(spec: BenchSpec, runs: Sequence[dict[str, Any]]) -> list[BenchRow]:
    """One row per variant (in the benchmark's order) from its runs (see the module docstring)."""
    rows = []
    for variant in spec.variants:
        vruns = [r for r in runs if r["variant"] == variant.name]
        if not vruns:
            continue
        cells = list(dict.fromkeys(r["cell"] for r in vruns))
        first = min(vruns, key=lambda r: (cells.index(r["cell"]), r["seed"]))
        per_cell = {}
        for cell in cells:
            values = [r["metrics"].get(spec.metric_key) for r in vruns if r["cell"] == cell]
            per_cell[cell] = {"metric": _mean(values), "metric_std": _std(values),
                              "seeds": sorted(r["seed"] for r in vruns if r["cell"] == cell)}  # fmt: skip
        metric = _mean([c["metric"] for c in per_cell.values()])
        # A model without parameters trains nothing: its "training" pass is no training throughput.
        trained = int(first["params"]["total"]) > 0
        extra: dict[str, Any] = {"variant": variant.name, "seeds": sorted({r["seed"] for r in vruns}),
                                 "commands": [r["command"] for r in vruns]}  # fmt: skip
        if len(cells) == 1:
            extra[f"{spec.metric}_std"] = per_cell[cells[0]]["metric_std"]
        else:
            extra[f"{spec.metric}_std"] = _seeds_std(vruns, lambda r: r["metrics"].get(spec.metric_key))
        if cells != [""]:
            extra["cells"] = per_cell
        for key in spec.extra_metrics:
            name = key.removeprefix("test/")

            def value(r: dict[str, Any], key: str = key) -> Any:
                return r["metrics"].get(key, r["extra"].get(key))

            extra[name] = _mean([_mean([value(r) for r in vruns if r["cell"] == c]) for c in cells])
            extra[f"{name}_std"] = _seeds_std(vruns, value)
        for key in ("train_throughput", "train_cpu_throughput", "infer_throughput", "infer_cpu_throughput"):
            values = [r.get(key) for r in vruns] if trained or key.startswith("infer") else []
            extra[key], extra[f"{key}_std"] = _mean(values), _std(values)
        routed = [r["routing"] for r in vruns if r["routing"]]
        moe = variant.routed
        for key in ("expert_load_cv", "dropped_frac", "router_entropy"):
            values = [r.get(key) for r in routed] if moe else []
            extra[key], extra[f"{key}_std"] = _mean(values), _std(values)
        rows.append(
            BenchRow(
                model=first["model"],
                router=variant.router,
                metric=math.nan if metric is None else metric,
                active_params=int(first["params"]["active"]),
                total_params=int(first["params"]["total"]),
                train_throughput=extra["train_cpu_throughput"],
                infer_throughput=extra["infer_cpu_throughput"],
                expert_load_cv=_mean([r["expert_load_cv"] for r in routed]) if moe else None,
                dropped_frac=_mean([r["dropped_frac"] for r in routed]) if moe else None,
                expert_load=first["routing"]["expert_load"] if moe and first["routing"] else None,
                specialisation=first["routing"]["specialisation"] if moe and first["routing"] else None,
                extra=extra,
            )
        )
    return rows


def write_json(spec: BenchSpec, path: str | Path, runs: list[dict[str, Any]], settings: str, args: dict) -> None:
    extra: dict[str, Any] = {"args": args, "runs": runs}
    if spec.notes:
        extra["notes"] = spec.notes
    if runs and all("wall_s" in r for r in runs):
        extra["runtime_s"] = round(sum(r["wall_s"] for r in runs), 1)
    write_domain_json(path, spec.domain, settings, spec.dataset, spec.metric, spec.higher_is_better,
                      spec.throughput_unit, bench_rows(spec, runs), extra)  # fmt: skip


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(spec: BenchSpec, rows: Sequence[BenchRow]) -> str:
    """The rows as a Markdown table: metric mean ± std, the extra metrics, sizes, throughputs and routing."""
    extras = [k.removeprefix("test/") for k in spec.extra_metrics]
    head = ["variant", f"{spec.metric} {'↑' if spec.higher_is_better else '↓'}", *extras, "active / total params",
            f"train {spec.throughput_unit}", f"infer {spec.throughput_unit}", "load CV", "dropped"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    every_cell = {c for row in rows for c in row.extra.get("cells", {})}
    for row in rows:
        std = row.extra.get(f"{spec.metric}_std")
        own = row.extra.get("cells", {})
        # a row that has not run every cell of the table averages fewer cells: say which
        partial = f" ({spec.cell_option} {', '.join(own)} only)" if own and set(own) != every_cell else ""
        cells = [
            str(row.extra.get("variant", row.router)) + (f" ({BASELINE})" if row.router == BASELINE else "") + partial,
            f"{row.metric:.4f}" + (f" ± {std:.4f}" if std is not None else ""),
        ]
        for name in extras:
            mean, spread = row.extra.get(name), row.extra.get(f"{name}_std")
            cells.append(_num(mean, ".4f") + (f" ± {spread:.4f}" if spread is not None else ""))
        cells += [f"{row.active_params / 1e6:.3f}M / {row.total_params / 1e6:.3f}M",
                  _num(row.train_throughput, ".1f"), _num(row.infer_throughput, ".1f"),
                  _num(row.expert_load_cv, ".3f"), _num(row.dropped_frac, ".3f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def cells_markdown(
    spec: BenchSpec,
    runs: Sequence[dict[str, Any]],
    order: Sequence[str],
    label: Callable[[str], str] = str,
    columns: Sequence[tuple[str, Callable[[str], str]]] = (),
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The metric (mean ± std over seeds) per variant and cell (``order`` first, then any other cell) as a Markdown
    table, ``columns`` added as rows of their own (a name and its text per cell: published figures); also each
    variant's cells (:func:`bench_rows`' ``extra["cells"]``)."""
    present = {r["cell"] for r in runs}
    cells = [c for c in order if c in present] + sorted(present - set(order))
    head = ["variant", *map(label, cells)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_variant: dict[str, dict[str, Any]] = {}
    for row in bench_rows(spec, runs):
        name = row.extra["variant"]
        by_variant[name] = own = row.extra.get("cells", {})
        values = [_pm(own.get(c, {}).get("metric"), own.get(c, {}).get("metric_std")) for c in cells]
        lines.append("| " + " | ".join([name + (f" ({BASELINE})" if row.router == BASELINE else ""), *values]) + " |")
    for name, text in columns:
        lines.append("| " + " | ".join([name, *(text(c) for c in cells)]) + " |")
    return "\n".join(lines), by_variant


def cell_verdicts(
    spec: BenchSpec, by_variant: dict[str, dict[str, Any]], subject: str, others: Sequence[str], cells: Sequence[str]
) -> list[str]:
    """One line per cell: ``subject`` against each of ``others`` by the seed-spread rule of ``moezoo compare``
    (within the spread iff ``|mean diff| <= the larger std over seeds``; :func:`moezoo.tasks.compare.verdict`); a row
    without a value of the metric in a cell (no such utterance there) is left out of that cell's line."""
    from moezoo.tasks.compare import verdict  # compare builds on this module

    lines = []
    for cell in cells:
        mine = by_variant.get(subject, {}).get(cell)
        if mine is None or mine["metric"] is None:  # not run there, or the metric is not defined there
            continue
        parts = []
        for other in others:
            theirs = by_variant.get(other, {}).get(cell)
            if theirs is None or theirs["metric"] is None:
                continue
            v = verdict(spec.metric_key, subject, (mine["metric"], mine["metric_std"]), other,
                        (theirs["metric"], theirs["metric_std"]))  # fmt: skip
            if v.within is None or v.diff is None:
                parts.append(f"{other}: no verdict (one seed)")
            elif v.within:
                parts.append(f"{other}: within the spread ({v.diff:+.4f})")
            else:
                better = (v.diff > 0) == spec.higher_is_better
                parts.append(f"{other}: {'better' if better else 'worse'} by {abs(v.diff):.4f}")
        if parts:
            lines.append(f"- {cell}: " + "; ".join(parts))
    return lines


def readme_block(spec: BenchSpec, runs: Sequence[dict[str, Any]], settings: str) -> str:
    """The README's block for this benchmark: how the table was made, the table, and one run's ``moezoo fit``
    command per row (the lowest seed; every run's command is in the ``--json`` file's ``runs[].command``)."""
    rows = bench_rows(spec, runs)
    seeds = sorted({r["seed"] for r in runs})
    flag = {"full": " --full", "quick": " --quick"}.get(settings, "")
    how = f"`moezoo bench {spec.domain}{flag}`" + ("" if flag else " with options of its own")
    cells = sorted({r["cell"] for r in runs if r["cell"]}, key=lambda c: (len(c), c))
    lines = [
        f"Generated by {how} ({len(runs)} runs through `moezoo fit`, seeds {', '.join(map(str, seeds))}"
        + (f", {spec.cell_option} {', '.join(cells)}" if cells else "")
        + f"); {spec.dataset}; {spec.metric} is the mean ± std over seeds"
        + (f" of the mean over {spec.cell_option}" if cells else "")
        + f"; throughput in {spec.throughput_unit} (one torch thread).",
        "",
        markdown(spec, rows),
        "",
        "One command per row (the lowest seed" + (f", the first of the {spec.cell_option}" if cells else "") + "):",
        "",
    ]
    for row in rows:
        name = row.extra.get("variant", row.router)
        first = min((r for r in runs if r["variant"] == name), key=lambda r: (r["seed"], len(r["cell"]), r["cell"]))
        lines.append(f"- {name}: `{first['command']}`")
    if spec.readme_extra is not None:
        lines += ["", spec.readme_extra(runs)]
    return "\n".join(lines)


def write_readme(spec: BenchSpec, path: str, runs: Sequence[dict[str, Any]], settings: str) -> None:
    text = Path(path).read_text()
    write_text_atomic(path, replace_readme_block(text, readme_block(spec, runs, settings), readme_markers(spec.domain)))
    print(f"replaced the {spec.domain} table of {path}")


# -- the command ----------------------------------------------------------------------------------------------
def _load_runs(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} has no 'runs' list: pass files written by `moezoo bench ... --json`")
    return data, data["runs"]


PLAN_KEYS = ("variants", "seeds", "cells")


def union_plan(*plans: Any) -> dict[str, list[Any]]:
    """The union, in first-seen order, of the ``variants``, ``seeds`` and ``cells`` of several runs' ``args`` (a
    file's plan; anything that is not a dict counts as an empty plan): what a resumed or merged file planned."""
    union: dict[str, list[Any]] = {key: [] for key in PLAN_KEYS}
    for plan in plans:
        if isinstance(plan, dict):
            for key in PLAN_KEYS:
                union[key] += [v for v in plan.get(key) or [] if v not in union[key]]
    return union


def merge(spec: BenchSpec, paths: Sequence[str], out: str | None, readme: str | None = None) -> int:
    runs: list[dict[str, Any]] = []
    settings = set()
    plans: list[Any] = []
    for path in paths:
        try:
            data, file_runs = _load_runs(path)
        except (OSError, ValueError) as err:
            print(f"moezoo bench {spec.domain}: --merge: {err}", file=sys.stderr)
            return 2
        if data.get("domain") != spec.domain:
            print(f"moezoo bench {spec.domain}: --merge: {path} is for domain {data.get('domain')!r}", file=sys.stderr)
            return 2
        settings.add(data.get("settings"))
        plans.append(data.get("args"))
        seen = {(r["variant"], r["seed"], r["cell"]) for r in runs}
        clash = [
            (r["variant"], r["seed"], r["cell"]) for r in file_runs if (r["variant"], r["seed"], r["cell"]) in seen
        ]
        if clash:
            print(f"moezoo bench {spec.domain}: --merge: runs {clash} appear twice (again in {path})", file=sys.stderr)
            return 2
        runs += file_runs
    print(markdown(spec, bench_rows(spec, runs)))
    name = str(settings.pop()) if len(settings) == 1 else "mixed"
    if out:
        write_json(spec, out, runs, name, {"merged_from": list(paths), **union_plan(*plans)})
        print(f"wrote {out}")
    if readme:
        write_readme(spec, readme, runs, name)
    return 0


def resume_clash(todo: Sequence[RunSpec], runs: Sequence[dict[str, Any]]) -> str:
    """Why the finished ``runs`` cannot stand for the runs ``todo`` with the same key (empty when they can): a kept
    run made with other ``moezoo fit`` overrides or another config."""
    done = {(r["variant"], r["seed"], r["cell"]): r for r in runs}
    for run in todo:
        kept = done.get(run.key)
        if kept is not None and kept["overrides"] != list(run.overrides):
            return f"ran {run.key} with other overrides: {kept['overrides']} (now {list(run.overrides)})"
        if kept is not None and kept["config"] != run.config:
            return f"ran {run.key} with another config: {kept['config']} (now {run.config})"
    return ""


def run_pending(
    todo: Sequence[RunSpec],
    runs: list[dict[str, Any]],
    out: Path,
    tag: str,
    show: Callable[[dict[str, Any]], str],
    infer: Infer | None = None,
    extras: Extras | None = None,
    save: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Execute the runs of ``todo`` whose key is not among the finished ``runs`` (files in
    ``out/<variant>[/<cell>]/seed<seed>``), appending each record to ``runs``; before each run its command, after
    it ``show(record)`` and ``save(runs)`` (so that an interrupted series keeps what it finished)."""
    done = {(r["variant"], r["seed"], r["cell"]) for r in runs}
    pending = [run for run in todo if run.key not in done]
    for i, run in enumerate(pending, 1):
        folder = out / run.variant / (run.cell or ".") / f"seed{run.seed}"
        print(f"[{tag}] run {i}/{len(pending)}: {run.command()}", flush=True)
        start = time.perf_counter()
        record = execute(run, folder.resolve(), infer, extras)
        runs.append(record)
        took = time.perf_counter() - start
        cell = f" {run.cell}" if run.cell else ""
        print(f"[{tag}] {run.variant} seed {run.seed}{cell}: {show(record)} ({took:.0f} s)", flush=True)
        if save is not None:
            save(runs)
    return runs


def main(spec: BenchSpec, argv: Sequence[str] | None = None) -> int:
    args, budget, settings = parse_args(spec, list(sys.argv[1:] if argv is None else argv))
    if args.readme:  # fail before hours of runs, not after
        try:
            replace_readme_block(Path(args.readme).read_text(), "", readme_markers(spec.domain))
        except (OSError, ValueError) as err:
            print(f"moezoo bench {spec.domain}: {err}", file=sys.stderr)
            return 2
    if args.merge:
        return merge(spec, args.merge, args.json, args.readme)
    if args.resume and not args.json:
        print(f"moezoo bench {spec.domain}: --resume needs --json FILE (the runs to keep)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    runs: list[dict[str, Any]] = []
    kept_plan: Any = None
    if args.resume and Path(args.json).is_file():
        kept, runs = _load_runs(args.json)
        kept_plan = kept.get("args")
    record_args = {"settings": settings, "seeds": list(budget.seeds), "variants": list(budget.variants),
                   "cells": list(budget.cells), "overrides": list(budget.overrides),
                   "threads": args.threads}  # fmt: skip
    if kept_plan is not None:  # a resumed file plans what it planned before and what this call adds
        record_args.update(union_plan(kept_plan, record_args))
    todo = run_specs(spec, budget)
    clash = resume_clash(todo, runs)
    if clash:
        print(f"moezoo bench {spec.domain}: --resume: {args.json} {clash}", file=sys.stderr)
        return 2
    print(f"moezoo bench {spec.domain} ({settings}): {len(todo)} runs, {len(runs)} kept", flush=True)

    def show(record: dict[str, Any]) -> str:
        return f"{spec.metric_key} {record['metrics'].get(spec.metric_key)}"

    def save(done: list[dict[str, Any]]) -> None:
        if args.json:  # after every run, so that an interrupted benchmark keeps what it finished
            write_json(spec, args.json, done, settings, record_args)

    run_pending(todo, runs, Path(args.out), spec.domain, show, spec.infer, spec.extras, save)
    if args.json and runs:
        write_json(spec, args.json, runs, settings, record_args)
    print(markdown(spec, bench_rows(spec, runs)))
    if args.readme and runs:
        write_readme(spec, args.readme, runs, settings)
    return 0
