"""The cross-domain tables of ``moezoo bench tables`` as text: rows with the dense-twin delta, Markdown, CSV, the
README block, and the released checkpoints' table; the README blocks, arguments and output of the commands that
tabulate runs (``router-study``, ``segmoe-ablation``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moezoo.io import copy_file_atomic, write_text_atomic
from moezoo.tasks.bench.schema import DENSE, UNROUTED

CSV_COLUMNS = (
    "domain", "model", "router", "metric_name", "metric", "higher_is_better", "dense_delta", "active_params",
    "total_params", "train_throughput", "infer_throughput", "throughput_unit", "expert_load_cv", "dropped_frac",
    "settings",
)  # fmt: skip


def readme_markers(name: str = "tables") -> tuple[str, str]:
    """The README lines between which ``moezoo bench <name> --readme`` writes its block (``tables``: the
    cross-domain tables; a domain's name: that benchmark's own table)."""
    return f"<!-- moezoo-bench-{name}:begin -->", f"<!-- moezoo-bench-{name}:end -->"


README_BEGIN, README_END = readme_markers()


def replace_readme_block(text: str, block: str, markers: tuple[str, str] = (README_BEGIN, README_END)) -> str:
    """``text`` with the lines between the README ``markers`` (:func:`readme_markers`) replaced by ``block`` (the
    markers stay)."""
    start, stop = markers
    begin, end = text.find(start), text.find(stop)
    if begin < 0 or end < 0:
        absent = [m for m, i in ((start, begin), (stop, end)) if i < 0]
        raise ValueError(f"--readme: the marker line(s) {absent} are missing; add {start} and {stop}")
    if text.count(start) > 1 or text.count(stop) > 1 or end < begin:
        raise ValueError(f"--readme: expected one {start} followed by one {stop}")
    head = text[: begin + len(start)]
    return head + "\n\n" + block.strip("\n") + "\n\n" + text[end:]


def table_parser(name: str, doc: str, runs_help: str) -> argparse.ArgumentParser:
    """The arguments of a table command ``moezoo bench <name> RUNS.json ... [--out FILE.md] [--readme README.md]``
    that reads runs' ``--json`` files (its help: the module docstring ``doc``); the command adds its own options."""
    p = argparse.ArgumentParser(
        prog=f"moezoo bench {name}",
        description=doc.split("\n\n")[0],
        epilog="\n\n".join(doc.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help=runs_help)
    p.add_argument("--out", default=None, help="also write the Markdown here")
    begin, end = readme_markers(name)
    p.add_argument("--readme", default=None, help=f"write the tables between {begin} and {end} of it")
    return p


def publish(name: str, make: Callable[[], str], out: str | None, readme: str | None) -> int:
    """The end of a table command ``moezoo bench <name>``: make the Markdown, write it into ``readme``'s block
    (:func:`readme_markers`) and to ``out``, print it; 0, or 2 with the reason on stderr when the runs or a file
    cannot be read (``OSError`` / ``ValueError``)."""
    return publish_blocks(name, lambda: {name: make()}, out, readme)


def publish_blocks(name: str, make: Callable[[], dict[str, str]], out: str | None, readme: str | None) -> int:
    """:func:`publish` for a command whose tables go into several README blocks: ``make`` returns block name ->
    Markdown; every block is replaced in one write (a missing block is an error and nothing is written), and the
    tables are printed (and written to ``out``) one after another."""
    try:
        blocks = make()
        if readme:
            path = Path(readme)
            text = path.read_text()
            for block, table in blocks.items():
                text = replace_readme_block(text, table, readme_markers(block))
            write_text_atomic(path, text)
    except (OSError, ValueError) as err:
        print(f"moezoo bench {name}: {err}", file=sys.stderr)
        return 2
    text = "\n\n".join(blocks.values())
    print(text)
    if out:
        write_text_atomic(Path(out), text + "\n")
    return 0


def readme_markdown(text: str, figures: Sequence[str], out: Path, readme: Path, figures_dir: Path | None) -> str:
    """The tables' Markdown for the README: figures copied to ``figures_dir`` and linked relative to the README's
    folder, or, without ``figures_dir``, left out (``out`` is not meant to be committed)."""
    for name in figures:
        link = f"![{name[:-4]}]({name})"
        if figures_dir is None:
            text = text.replace(link + "\n", "").replace(link, "")
            continue
        copy_file_atomic(out / name, figures_dir / name)
        rel = os.path.relpath((figures_dir / name).resolve(), readme.resolve().parent)
        text = text.replace(f"]({name})", f"]({Path(rel).as_posix()})")
    return text


# -- tables -----------------------------------------------------------------------------------------------------
def table_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per (domain, model, router) with the dense-twin delta filled in."""
    rows = []
    for run in runs:
        data = run["data"]
        if data is None:
            continue
        dense: dict[str, float] = {}
        for r in data["rows"]:  # the first dense row of a model is its twin (an ablation's dense rows come later)
            if r["router"] == DENSE:
                dense.setdefault(r["model"], r["metric"])
        for r in data["rows"]:
            twin = dense.get(r["model"]) if r["router"] not in UNROUTED else None
            rows.append(
                {
                    "domain": run["domain"],
                    "model": r["model"],
                    "router": r["router"],
                    "metric_name": data["metric"],
                    "metric": r["metric"],
                    "higher_is_better": bool(data["higher_is_better"]),
                    "dense_delta": None if twin is None else r["metric"] - twin,
                    "active_params": r["active_params"],
                    "total_params": r["total_params"],
                    "train_throughput": r["train_throughput"],
                    "infer_throughput": r["infer_throughput"],
                    "throughput_unit": data.get("throughput_unit", "samples/s"),
                    "expert_load_cv": r["expert_load_cv"],
                    "dropped_frac": r["dropped_frac"],
                    "settings": data.get("settings", ""),
                }
            )
    return rows


def coverage(data: dict[str, Any] | None) -> str:
    """How much of the benchmark's plan a raw file holds: ``"14 of 14 runs"``, or for a partial file the count and
    the variants with no run at all (a domain benchmark records its plan in ``args``: variants, seeds, cells);
    ``"-"`` when the file has no plan or no runs."""
    if not data or not isinstance(data.get("args"), dict) or not isinstance(data.get("runs"), list):
        return "-"
    plan = data["args"]
    variants, seeds, cells = (list(plan.get(k) or []) for k in ("variants", "seeds", "cells"))
    if not variants or not seeds:
        return "-"
    planned = len(variants) * len(seeds) * max(1, len(cells))
    done = {(r.get("variant"), r.get("seed"), r.get("cell", "")) for r in data["runs"]}
    text = f"{len(done)} of {planned} runs"
    if len(done) >= planned:
        return text
    ran = {variant for variant, _, _ in done}
    seeds_run = sorted({seed for _, seed, _ in done}, key=str)
    text += f" (partial: seeds run {', '.join(map(str, seeds_run)) or 'none'} of {', '.join(map(str, seeds))}"
    not_run = [v for v in variants if v not in ran]
    return text + (f"; not run: {', '.join(not_run)})" if not_run else ")")


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], missing: Sequence[str],
             others: Sequence[str], settings: str, command: str) -> str:  # fmt: skip
    lines = [
        f"### Cross-domain benchmark ({settings} settings)",
        "",
        f"Generated by `{command}`; quality on each domain's test split (the arrow says which way is better), "
        "dense-twin delta = MoE metric - dense twin metric, parameters active per token / total, throughput "
        "in items per CPU second of the benchmark's process (one torch thread) on this machine, "
        "expert-load CV = std/mean of tokens per expert (mean over MoE layers), "
        "dropped = fraction of tokens routed to no expert; router `baseline`: one of the field's reference models "
        "(no experts, no dense twin) beside the MoE rows.",
        "",
        "| domain | model | router | quality | dense-twin delta | active / total params | train | inference "
        "| expert-load CV | dropped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        delta = "-" if r["dense_delta"] is None else f"{r['dense_delta']:+.4f}"
        unit = r["throughput_unit"]
        lines.append(
            f"| {r['domain']} | {r['model']} | {r['router']} | {r['metric_name']} {arrow} {r['metric']:.4f} "
            f"| {delta} | {r['active_params'] / 1e6:.3f}M / {r['total_params'] / 1e6:.3f}M "
            f"| {_num(r['train_throughput'], '.0f')} {unit} | {_num(r['infer_throughput'], '.0f')} {unit} "
            f"| {_num(r['expert_load_cv'], '.3f')} | {_num(r['dropped_frac'], '.3f')} |"
        )
    lines += [
        "",
        "| domain | benchmark | status | runtime (s) | runs | data and metric |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        runtime = "-" if run["runtime_s"] is None else run["runtime_s"]
        data = run.get("data") or {}
        lines.append(
            f"| {run['domain']} | `moezoo bench {run['module']}` | {run['status']} | {runtime} | {coverage(data)} "
            f"| {data.get('dataset') or '-'} |"
        )
    for domain in missing:
        lines.append(f"| {domain} | - | no benchmark yet (no moezoo/tasks/bench/{domain}.py) | - | - | - |")
    if others:
        lines += ["", f"Other benchmarks, not quality benchmarks: {', '.join(f'`moezoo bench {o}`' for o in others)}."]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})


# -- released checkpoints --------------------------------------------------------------------------------------
HEADLINE_METRICS = {  # test metric -> higher is better; the first one a release has is its quality column
    "test/acc": True, "test/map": True, "test/mAP": True, "test/map50": True, "test/cer": False, "test/wer": False,
    "test/mse": False, "test/mae": False, "test/fd": False, "test/fd_fmnist": False,
}  # fmt: skip


def zoo_rows(evaluate: bool = True) -> list[dict[str, Any]]:
    """One row per released checkpoint; ``evaluate`` reruns ``moezoo zoo eval`` and uses (and checks) its numbers."""
    from moezoo.models import get_pretrained_cfg, list_models
    from moezoo.tasks.zoo.evaluation import compare, run_evaluation

    rows = []
    for name in list_models(pretrained=True):
        cfg = get_pretrained_cfg(name)
        metrics, routing = dict(cfg.metrics), dict(cfg.routing)
        status = "registered"
        if evaluate:
            metrics, evaluated = run_evaluation(cfg)
            routing["layers"] = evaluated.get("layers", [])
            bad = [line.split()[0] for line in compare(cfg.metrics, metrics, cfg.tolerance) if line.endswith("FAIL")]
            status = f"eval differs from card: {bad}" if bad else "eval reproduces card"
        key = next((k for k in HEADLINE_METRICS if k in metrics), None)
        layers = routing.get("layers", [])
        row: dict[str, Any] = {
            "name": name, "domain": cfg.domain, "metric_name": key, "metric": metrics.get(key) if key else None,
            "higher_is_better": HEADLINE_METRICS.get(key or "", True), "dense_twin": cfg.dense_twin,
            "active_params": cfg.params.get("active"), "total_params": cfg.params.get("total"),
            "expert_load_cv": sum(x["load_cv"] for x in layers) / len(layers) if layers else None,
            "dropped_frac": metrics.get("test/dropped_frac") if layers else None, "status": status,
        }  # fmt: skip
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        twin = by_name.get(r["dense_twin"])
        ok = twin is not None and r["metric"] is not None and twin["metric_name"] == r["metric_name"]
        r["dense_delta"] = float(r["metric"]) - float(twin["metric"]) if ok and twin is not None else None
    return rows


def zoo_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "### Released checkpoints",
        "",
        "Rerun by `moezoo zoo eval NAME` inside this command (weights shipped in `moezoo/weights/`, cards in "
        "`model_cards/`).",
        "",
        "| release | domain | quality | dense-twin delta | active / total params | expert-load CV | dropped | eval |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        quality = "-" if r["metric"] is None else f"{r['metric_name'].split('/')[-1]} {arrow} {r['metric']:.4f}"
        delta = "-" if r["dense_delta"] is None else f"{r['dense_delta']:+.4f}"
        lines.append(
            f"| `{r['name']}` | {r['domain']} | {quality} | {delta} "
            f"| {r['active_params'] / 1e6:.3f}M / {r['total_params'] / 1e6:.3f}M | {_num(r['expert_load_cv'], '.3f')} "
            f"| {_num(r['dropped_frac'], '.3f')} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"
