"""``moezoo bench router-study``: the router study's table (issue 19) from the raw runs of the domain benchmarks.

``moezoo bench router-study RUNS.json [RUNS.json ...] [--reference VARIANT] [--out FILE.md] [--readme README.md]``

``--readme`` writes each domain's table into its own block, between ``<!-- moezoo-bench-router-study-<domain>:begin
-->`` and ``...:end -->`` (the vision table beside the vision section, the time-series one beside the time series);
``--out`` and the printout have every domain of the files.

The runs are the ``--json`` files of ``moezoo bench vision`` (``--variants topk,xmoe,...``) and ``moezoo bench
timeseries`` (``--variants moe_topk,moe_xmoe,...``); nothing is trained here. Files of the same domain are pooled (a
run set made in several processes); a (variant, seed, cell) twice, or one variant run at one cell with different
``moezoo fit`` overrides (two budgets), is refused. One table per domain, one row per variant, in the benchmark's order:

- **seed score**: a variant's metric for one seed, the mean over the cells (forecast horizons) of that seed's runs;
  a seed without a run in every cell of the variant does not count.
- **metric**: mean ± sample std over seeds of the seed scores (no std with one seed).
- **train ×top-k**: the variant's mean training throughput (items per CPU second, one torch thread) over its runs,
  divided by the reference's.
- **load CV**, **dropped**, **entropy**: means over runs of the test split's routing statistics
  (:meth:`moezoo.stats.RoutingStats.summary`): expert-load coefficient of variation, fraction of tokens no expert
  processed, and the mean per-token entropy (nats) of the router's distribution: over the E experts for the sparse
  routers and SMEAR (at most ln E), over the E x S slots for Soft MoE (at most ln(E S), so not comparable with the
  others). ``-`` for unrouted rows (dense twin, baselines).
- **vs top-k**: Δ = mean - the reference's mean, and the verdict: ``outside (better)`` / ``outside (worse)`` when
  both the variant and the reference have >= 2 seeds and ``|Δ| > max(std_variant, std_reference)``, the direction
  from the metric (higher accuracy, lower MSE is better); ``within`` when ``|Δ|`` is at most that; ``-`` when either
  side has fewer than 2 seeds (no spread to compare with) and on the reference row.

The reference is the domain's top-k row (:data:`REFERENCES`; ``--reference`` for another). Under each table:
the reference's seed std and the spread across routers (the sample std of the routed variants' means, the reference
included); the table discriminates when the first is smaller (the budget criterion of the study).
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moezoo.tasks.bench.render import publish_blocks, table_parser
from moezoo.tasks.bench.suite import BenchSpec

NAME = "router-study"
#: the top-k row each domain's routers are compared with
REFERENCES = {"vision": "topk", "timeseries": "moe_topk"}
#: the benchmark module of each domain whose runs the study reads (its ``SPEC``)
DOMAINS = {"vision": "moezoo.tasks.bench.vision", "timeseries": "moezoo.tasks.bench.timeseries"}


@dataclass(frozen=True)
class StudyRow:
    """One variant of a domain's router study (see the module docstring for each field)."""

    variant: str
    router: str
    routed: bool
    seeds: tuple[int, ...]
    mean: float | None
    std: float | None
    train_ratio: float | None
    load_cv: float | None
    dropped_frac: float | None
    entropy: float | None
    delta: float | None
    verdict: str


def _mean(values: Sequence[Any]) -> float | None:
    known = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.fmean(known) if known else None


def seed_scores(runs: Sequence[dict[str, Any]], metric_key: str) -> dict[int, float]:
    """Seed -> the mean over cells of that seed's metric, for the seeds with a finite metric in every cell."""
    cells = {r["cell"] for r in runs}
    scores = {}
    for seed in sorted({r["seed"] for r in runs}):
        values = [r["metrics"].get(metric_key) for r in runs if r["seed"] == seed]
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if len(finite) == len(values) and {r["cell"] for r in runs if r["seed"] == seed} == cells:
            scores[seed] = statistics.fmean(finite)
    return scores


def verdict(
    mean: float | None,
    std: float | None,
    ref_mean: float | None,
    ref_std: float | None,
    higher_is_better: bool,
) -> str:
    """``outside (better|worse)`` when ``|mean - ref_mean| > max(std, ref_std)``, ``within`` otherwise; ``-`` when
    either side has no seed spread (fewer than 2 seeds)."""
    if mean is None or ref_mean is None or std is None or ref_std is None:
        return "-"
    delta = mean - ref_mean
    if abs(delta) <= max(std, ref_std):
        return "within"
    return "outside (better)" if (delta > 0) == higher_is_better else "outside (worse)"


def study_rows(spec: BenchSpec, runs: Sequence[dict[str, Any]], reference: str) -> list[StudyRow]:
    """The rows of one domain's study, in the benchmark's variant order; raises ``ValueError`` when the reference
    has no runs."""
    by_variant = {v.name: [r for r in runs if r["variant"] == v.name] for v in spec.variants}
    if not by_variant.get(reference):
        present = sorted(name for name, rs in by_variant.items() if rs)
        raise ValueError(f"--reference: {spec.domain} has no runs of {reference!r}; variants with runs: {present}")
    stats = {}
    for name, vruns in by_variant.items():
        if vruns:
            scores = list(seed_scores(vruns, spec.metric_key).values())
            stats[name] = (
                statistics.fmean(scores) if scores else None,
                statistics.stdev(scores) if len(scores) > 1 else None,
                _mean([r.get("train_cpu_throughput") for r in vruns]),
            )
    ref_mean, ref_std, ref_rate = stats[reference]
    rows = []
    for variant in spec.variants:
        vruns = by_variant[variant.name]
        if not vruns:
            continue
        mean, std, rate = stats[variant.name]
        routing = [r["routing"] for r in vruns if r.get("routing")] if variant.routed else []
        is_ref = variant.name == reference
        rows.append(
            StudyRow(
                variant=variant.name,
                router=variant.router,
                routed=variant.routed,
                seeds=tuple(sorted(seed_scores(vruns, spec.metric_key))),
                mean=mean,
                std=std,
                train_ratio=rate / ref_rate if rate is not None and ref_rate else None,
                load_cv=_mean([r.get("expert_load_cv") for r in routing]),
                dropped_frac=_mean([r.get("dropped_frac") for r in routing]),
                entropy=_mean([r.get("router_entropy") for r in routing]),
                delta=None if is_ref or mean is None or ref_mean is None else mean - ref_mean,
                verdict="(reference)" if is_ref else verdict(mean, std, ref_mean, ref_std, spec.higher_is_better),
            )
        )
    return rows


def spreads(rows: Sequence[StudyRow], reference: str) -> tuple[float | None, float | None]:
    """The reference's seed std and the sample std of the routed variants' means (None with fewer than 2)."""
    ref = next(r for r in rows if r.variant == reference)
    means = [r.mean for r in rows if r.routed and r.mean is not None]
    return ref.std, statistics.stdev(means) if len(means) > 1 else None


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(spec: BenchSpec, rows: Sequence[StudyRow], reference: str) -> str:
    """One domain's table and the line comparing the reference's seed spread with the spread across routers."""
    arrow = "↑" if spec.higher_is_better else "↓"
    head = ["variant", "router", "seeds", f"{spec.metric} {arrow} (mean ± std)", f"Δ vs {reference}",
            "vs top-k seed spread", "train ×top-k", "load CV", "dropped", "entropy (nats)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        metric = _num(row.mean, ".4f") + (f" ± {row.std:.4f}" if row.std is not None else "")
        cells = [row.variant, row.router, ",".join(map(str, row.seeds)) or "-", metric,
                 _num(row.delta, "+.4f"), row.verdict, _num(row.train_ratio, ".2f"), _num(row.load_cv, ".3f"),
                 _num(row.dropped_frac, ".3f"), _num(row.entropy, ".3f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    ref_std, across = spreads(rows, reference)
    routed = sum(r.routed for r in rows)
    if ref_std is None or across is None:
        judged = "not judged (it needs >= 2 seeds of the reference and >= 2 routed variants)"
    elif ref_std < across:
        judged = "the table discriminates"
    else:
        judged = "the table does NOT discriminate (more seeds or a longer budget)"
    lines += ["", f"{reference} seed std {_num(ref_std, '.4f')}; spread across the {routed} routed variants' means "
              f"{_num(across, '.4f')}: {judged}."]  # fmt: skip
    return "\n".join(lines)


def load(paths: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Domain -> its pooled runs from ``moezoo bench <domain> --json`` files; ``ValueError`` names a bad file, a
    run twice or a variant run with two sets of overrides at one cell (horizon)."""
    pooled: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise ValueError(f"{path} has no 'runs' list: pass files written by `moezoo bench <domain> --json`")
        domain = data.get("domain")
        if domain not in DOMAINS:
            raise ValueError(f"{path} is for domain {domain!r}; the router study reads {sorted(DOMAINS)}")
        runs = pooled.setdefault(domain, [])
        seen = {(r["variant"], r["seed"], r["cell"]): r for r in runs}
        for run in data["runs"]:
            key = (run["variant"], run["seed"], run["cell"])
            if key in seen:
                raise ValueError(f"{path}: run {key} appears twice")
            # the same cell: a horizon's own override differs from another horizon's
            other = next((r for r in runs if r["variant"] == run["variant"] and r["cell"] == run["cell"]), None)
            if other is not None and other["overrides"] != run["overrides"]:
                raise ValueError(
                    f"{path}: {run['variant']} was run with different moezoo fit overrides ({other['overrides']} and "
                    f"{run['overrides']}): one budget per variant and table"
                )
            runs.append(run)
            seen[key] = run
    return pooled


def spec_of(domain: str) -> BenchSpec:
    spec: BenchSpec = importlib.import_module(DOMAINS[domain]).SPEC
    return spec


def report(paths: Sequence[str], references: dict[str, str]) -> str:
    """The study's Markdown: one section per domain of the files."""
    return "\n\n".join(domain_reports(paths, references).values())


def domain_reports(paths: Sequence[str], references: dict[str, str]) -> dict[str, str]:
    """Each domain of the files and its section of the study's Markdown."""
    sections = {}
    for domain, runs in load(paths).items():
        spec, reference = spec_of(domain), references.get(domain, REFERENCES[domain])
        n_seeds = sorted({r["seed"] for r in runs})
        sections[domain] = (
            f"**{domain}** ({len(runs)} runs through `moezoo fit`, seeds {', '.join(map(str, n_seeds))}; test "
            f"{spec.metric} ({spec.dataset.split(',')[0]}), reference {reference}):\n\n"
            + markdown(spec, study_rows(spec, runs, reference), reference)
        )
    return sections


def publish_study(paths: Sequence[str], references: dict[str, str], out: str | None, readme: str | None) -> int:
    """Print the study (and write ``out``); with ``readme``, each domain's table into that domain's block. 0, or 2
    with the reason on stderr (runs or README unreadable, a block missing: nothing is written then)."""

    def blocks() -> dict[str, str]:
        return {f"{NAME}-{domain}": section for domain, section in domain_reports(paths, references).items()}

    return publish_blocks(NAME, blocks, out, readme)


def main(argv: Sequence[str] | None = None) -> int:
    p = table_parser(NAME, __doc__ or "", "--json files of moezoo bench vision / timeseries")
    p.add_argument("--reference", action="append", default=[], metavar="DOMAIN=VARIANT",
                   help=f"the row compared with (default {REFERENCES})")  # fmt: skip
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    references = dict(REFERENCES)
    for item in args.reference:
        domain, _, variant = item.partition("=")
        if domain not in DOMAINS or not variant:
            p.error(f"--reference must be DOMAIN=VARIANT with DOMAIN in {sorted(DOMAINS)}, got {item!r}")
        references[domain] = variant
    return publish_study(args.runs, references, args.out, args.readme)


if __name__ == "__main__":
    sys.exit(main())
