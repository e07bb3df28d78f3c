"""``moezoo bench tables``: run every domain's benchmark and write the cross-domain tables and plots.

Legend: E experts, G groups (classes, languages, domains), L MoE layers.

Discovery (at run time): a *domain benchmark* is a module ``moezoo/bench/<domain>.py`` whose ``<domain>`` is a
package of ``moezoo.tasks`` or which sets ``DOMAIN = "<domain>"``. Every task domain without one is listed as
"no benchmark yet"; other benchmarks (``layer``, kernels ...) are not quality benchmarks and are listed apart.

Contract of a domain benchmark: ``moezoo bench <domain> --quick --json PATH`` (its quick settings, minutes on a
2-core CPU) or ``moezoo bench <domain> --full --json PATH`` (its full settings) exits 0 and writes to PATH an
object with at least these keys (others, such as a benchmark's own raw runs, are kept and ignored)::

    {"domain": "vision", "settings": "quick", "dataset": "...", "metric": "acc", "higher_is_better": true,
     "throughput_unit": "images/s",
     "rows": [{"model": "moe_vit_tiny", "router": "topk", "metric": 0.97,
               "active_params": 1, "total_params": 2, "train_throughput": 3.0, "infer_throughput": 4.0,
               "expert_load_cv": 0.1, "dropped_frac": 0.0,
               "expert_load": [[share per expert] per MoE layer],
               "specialisation": {"by": "class", "layer": 3, "groups": ["0", ...], "share": [[G x E]]}}, ...]}

A row whose ``router`` is ``"dense"`` is the dense twin of the MoE rows with the same ``model``; their
"dense-twin delta" is ``metric - dense metric``. ``expert_load``, ``specialisation``, ``expert_load_cv`` and
``dropped_frac`` are ``null`` for dense rows. :func:`write_domain_json`, :func:`routing_stats` and
:func:`inference_throughput` help benchmarks produce these fields the same way.

Each benchmark runs in its own process (a crash or a timeout marks that domain and the others go on). Output in
``--out`` (default ``bench_results/tables``): ``tables.csv``, ``tables.md``, ``quality_vs_active.png``,
``expert_load_<domain>.png``, ``specialisation_<domain>.png``, ``runs.json``, one log per domain and each domain's
JSON in ``raw/<domain>.json``. A benchmark may record its own wall time as a top-level ``runtime_s``.

``--reuse`` keeps a domain's ``raw/<domain>.json`` instead of rerunning it when that file validates and has the
requested settings, so that long full benchmarks can run on their own (``moezoo bench timeseries --full --json
bench_results/tables/raw/timeseries.json``) and be assembled by ``moezoo bench tables --full --reuse``.
``--reuse-custom`` also keeps files whose settings are ``"custom"`` (a benchmark run with options of its own, e.g.
more steps); their status in the table says so. A raw file that is rerun is first renamed to
``raw/<domain>.replaced-<UTC time>.json``, so no earlier result is lost.
``--readme PATH`` puts the generated Markdown between the lines ``<!-- moezoo-bench-tables:begin -->`` and
``<!-- moezoo-bench-tables:end -->`` of PATH. The figures are linked from there only with ``--readme-figures DIR``,
which copies them to DIR (a tracked folder; ``--out`` is usually git-ignored).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import pkgutil
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moezoo.layers import MoEAux

REQUIRED_ROW_KEYS = (
    "model", "router", "metric", "active_params", "total_params", "train_throughput", "infer_throughput",
    "expert_load_cv", "dropped_frac",
)  # fmt: skip
CSV_COLUMNS = (
    "domain", "model", "router", "metric_name", "metric", "higher_is_better", "dense_delta", "active_params",
    "total_params", "train_throughput", "infer_throughput", "throughput_unit", "expert_load_cv", "dropped_frac",
    "settings",
)  # fmt: skip
NOT_DOMAIN_BENCHES = ("tables",)
README_BEGIN = "<!-- moezoo-bench-tables:begin -->"
README_END = "<!-- moezoo-bench-tables:end -->"


# -- helpers for domain benchmarks ------------------------------------------------------------------------------
@dataclass
class BenchRow:
    """One (model, router) result of a domain benchmark."""

    model: str
    router: str
    metric: float
    active_params: int
    total_params: int
    train_throughput: float | None
    infer_throughput: float | None
    expert_load_cv: float | None = None
    dropped_frac: float | None = None
    expert_load: list[list[float]] | None = None
    specialisation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def write_domain_json(
    path: str | Path,
    domain: str,
    settings: str,
    dataset: str,
    metric: str,
    higher_is_better: bool,
    throughput_unit: str,
    rows: Sequence[BenchRow],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a domain benchmark's result in the format ``moezoo bench tables`` reads (atomically).

    ``extra`` adds top-level keys (a benchmark's raw runs, ``runtime_s`` ...); they may not shadow the format's.
    """
    data: dict[str, Any] = {
        "domain": domain, "settings": settings, "dataset": dataset, "metric": metric,
        "higher_is_better": higher_is_better, "throughput_unit": throughput_unit, "rows": [asdict(r) for r in rows],
    }  # fmt: skip
    clash = sorted(set(extra or {}) & set(data))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite keys of the tables format")
    data.update(extra or {})
    write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def routing_stats(
    forward_with_aux: Callable[[Tensor], tuple[Tensor, list[MoEAux]]],
    batches: Iterable[tuple[Tensor, Tensor]],
    group_names: Sequence[str],
    group_by: str,
) -> dict[str, Any]:
    """Expert load per MoE layer, its CV, the dropped fraction and the group x expert routing shares.

    ``batches`` yields ``(x, group_B)`` with one group id (class, language, domain) per sample; every token of a
    sample counts for its group. Load CV is std/mean of each layer's summed expert counts, averaged over layers;
    the dropped fraction is token-weighted; specialisation is measured at the last sparse MoE layer.
    """
    counts_LE: list[Tensor] = []
    group_counts_GE: Tensor | None = None
    dropped = tokens = 0.0
    for x, group_B in batches:
        _, auxes = forward_with_aux(x)
        if not auxes:
            return {}
        if not counts_LE:
            counts_LE = [torch.zeros_like(a.tokens_per_expert_E, dtype=torch.float64) for a in auxes]
        for i, aux in enumerate(auxes):
            counts_LE[i] += aux.tokens_per_expert_E.double().cpu()
            dropped += float(aux.dropped_frac) * aux.num_tokens
            tokens += aux.num_tokens
        sparse = [a for a in auxes if a.routing is not None]
        if sparse:
            aux = sparse[-1]
            routing = aux.routing
            assert routing is not None
            per_sample = aux.num_tokens // x.shape[0]
            sample_N = routing.token_idx_N.cpu() // per_sample
            group_N = group_B.cpu()[sample_N]
            flat = group_N * routing.num_experts + routing.expert_idx_N.cpu()
            counts = torch.bincount(flat, minlength=len(group_names) * routing.num_experts).double()
            counts_GE = counts.reshape(len(group_names), routing.num_experts)
            group_counts_GE = counts_GE if group_counts_GE is None else group_counts_GE + counts_GE
    if not counts_LE:
        return {}
    shares = [(c / c.sum().clamp_min(1.0)).tolist() for c in counts_LE]
    cvs = [float(c.std(unbiased=False) / c.mean().clamp_min(1e-12)) for c in counts_LE]
    result: dict[str, Any] = {
        "expert_load": shares,
        "expert_load_cv": sum(cvs) / len(cvs),
        "dropped_frac": dropped / max(tokens, 1.0),
        "specialisation": None,
    }
    if group_counts_GE is not None:
        share_GE = group_counts_GE / group_counts_GE.sum(-1, keepdim=True).clamp_min(1.0)
        result["specialisation"] = {
            "by": group_by,
            "layer": len(counts_LE) - 1,
            "groups": list(group_names),
            "share": share_GE.tolist(),
        }
    return result


@torch.no_grad()
def inference_throughput(model: nn.Module, x: Tensor, batch_size: int = 256, repeats: int = 5) -> float:
    """Median samples per second of ``model(x)`` in eval mode over ``repeats`` passes (after one warm-up pass)."""
    was_training = model.training
    model.eval()
    rates = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for chunk in x.split(batch_size):
            model(chunk)
        if i:
            rates.append(x.shape[0] / (time.perf_counter() - start))
    model.train(was_training)
    return statistics.median(rates)


# -- discovery and running --------------------------------------------------------------------------------------
def task_domains() -> list[str]:
    import moezoo.tasks

    return sorted(i.name for i in pkgutil.iter_modules(moezoo.tasks.__path__) if i.ispkg)


def discover(domains: Sequence[str] | None = None) -> tuple[dict[str, str], list[str], list[str]]:
    """``({domain: bench module name}, domains without a benchmark, other benchmarks)``, found at run time."""
    import moezoo.bench

    tasks = task_domains()
    benches: dict[str, str] = {}
    others = []
    for info in pkgutil.iter_modules(moezoo.bench.__path__):
        name = info.name
        if name.startswith("_") or name in NOT_DOMAIN_BENCHES:
            continue
        declared = None
        if name not in tasks:
            try:
                declared = getattr(importlib.import_module(f"moezoo.bench.{name}"), "DOMAIN", None)
            except Exception:  # noqa: BLE001 - a broken module is simply not a declared domain benchmark
                declared = None
        if name in tasks or isinstance(declared, str):
            benches[declared or name] = name
        else:
            others.append(name)
    wanted = set(tasks) | set(benches)
    if domains:
        unknown = set(domains) - wanted
        if unknown:
            raise ValueError(f"--domains {sorted(unknown)} are not domains; known: {sorted(wanted)}")
        wanted = set(domains)
    missing = sorted(d for d in wanted if d not in benches)
    return {d: m for d, m in sorted(benches.items()) if d in wanted}, missing, sorted(others)


def validate(data: Any, domain: str) -> list[str]:
    """Problems with a domain benchmark's JSON (empty when it follows the contract)."""
    if not isinstance(data, dict):
        return [f"top level is {type(data).__name__}, expected an object"]
    problems = [f"missing key {k!r}" for k in ("metric", "higher_is_better", "rows") if k not in data]
    for i, row in enumerate(data.get("rows") or []):
        missing = [k for k in REQUIRED_ROW_KEYS if k not in row]
        if missing:
            problems.append(f"row {i} misses {missing}")
        elif not isinstance(row["metric"], (int, float)) or not math.isfinite(row["metric"]):
            problems.append(f"row {i} metric {row['metric']!r} is not a finite number")
    if not data.get("rows"):
        problems.append("no rows")
    return problems


def run_domain(domain: str, module: str, full: bool, out: Path, timeout: float) -> dict[str, Any]:
    """Run one domain benchmark in a subprocess; returns its status, runtime and (valid) result."""
    json_path = out / "raw" / f"{domain}.json"
    log_path = out / "logs" / f"{domain}.log"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if json_path.exists():  # an earlier result (perhaps hours of work) is kept under another name, not deleted
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(json_path.stat().st_mtime))
        kept = json_path.with_name(f"{domain}.replaced-{stamp}.json")
        os.replace(json_path, kept)
        print(f"[tables] {domain}: kept the earlier {json_path.name} as {kept.name}", flush=True)
    settings_flag = "--full" if full else "--quick"
    command = [sys.executable, "-m", "moezoo.cli", "bench", module, settings_flag, "--json", str(json_path)]
    start = time.perf_counter()
    status = "ok"
    with open(log_path, "w") as log:
        # Its own session, so that a timeout also ends the worker processes a benchmark may have started.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc, status = None, f"timed out after {timeout:.0f} s"
    runtime = time.perf_counter() - start
    result: dict[str, Any] = {"domain": domain, "module": module, "command": " ".join(command[2:]), "data": None}
    if rc not in (0, None):
        log_text = log_path.read_text(errors="replace")
        unrecognized = [line for line in log_text.splitlines() if "unrecognized arguments" in line]
        if unrecognized:
            status = f"exists, but does not accept the tables arguments ({unrecognized[-1].split(': ')[-1]})"
        else:
            status = f"failed (exit {rc}, see logs/{domain}.log)"
    elif rc == 0 and not json_path.is_file():
        status = f"wrote no {json_path.name} (does `--json PATH` write the tables format?)"
    elif rc == 0:
        try:
            data = json.loads(json_path.read_text())
            problems = validate(data, domain)
        except json.JSONDecodeError as err:
            data, problems = None, [f"invalid JSON: {err}"]
        if problems:
            status = "its --json output is not in the tables format yet: " + "; ".join(problems[:3])
        else:
            result["data"] = data
    return {**result, "status": status, "runtime_s": round(runtime, 1)}


def reuse_domain(
    domain: str, module: str, settings: str, out: Path, custom: bool = False
) -> tuple[dict[str, Any] | None, str]:
    """The run of an earlier ``raw/<domain>.json`` when it validates and has ``settings`` (or ``"custom"`` settings
    when ``custom``); else ``(None, why not)``."""
    json_path = out / "raw" / f"{domain}.json"
    if not json_path.is_file():
        return None, f"no {json_path}"
    try:
        data = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{json_path} is not valid JSON ({err})"
    problems = validate(data, domain)
    if problems:
        return None, f"{json_path} is not in the tables format: " + "; ".join(problems[:3])
    accepted = (settings, "custom") if custom else (settings,)
    if data.get("settings") not in accepted:
        hint = " (--reuse-custom accepts 'custom')" if data.get("settings") == "custom" else ""
        return None, f"{json_path} has settings {data.get('settings')!r}, not {settings!r}{hint}"
    if data.get("domain", domain) != domain:
        return None, f"{json_path} is for domain {data.get('domain')!r}, not {domain!r}"
    runtime = data.get("runtime_s")
    note = " (custom settings)" if data.get("settings") == "custom" else ""
    run = {
        "domain": domain, "module": module, "command": f"bench {module} --{settings} --json {json_path}",
        "data": data, "status": f"reused {json_path}{note}",
        "runtime_s": round(float(runtime), 1) if isinstance(runtime, (int, float)) else None,
    }  # fmt: skip
    return run, ""


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with the lines between the README markers replaced by ``block`` (the markers stay)."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < 0:
        absent = [m for m, i in ((README_BEGIN, begin), (README_END, end)) if i < 0]
        raise ValueError(f"--readme: the marker line(s) {absent} are missing; add {README_BEGIN} and {README_END}")
    if text.count(README_BEGIN) > 1 or text.count(README_END) > 1 or end < begin:
        raise ValueError(f"--readme: expected one {README_BEGIN} followed by one {README_END}")
    head = text[: begin + len(README_BEGIN)]
    return head + "\n\n" + block.strip("\n") + "\n\n" + text[end:]


def readme_markdown(text: str, figures: Sequence[str], out: Path, readme: Path, figures_dir: Path | None) -> str:
    """The tables' Markdown for the README: figures copied to ``figures_dir`` and linked relative to the README's
    folder, or, without ``figures_dir``, left out (``out`` is not meant to be committed)."""
    for name in figures:
        link = f"![{name[:-4]}]({name})"
        if figures_dir is None:
            text = text.replace(link + "\n", "").replace(link, "")
            continue
        figures_dir.mkdir(parents=True, exist_ok=True)
        tmp = figures_dir / f".{name}.tmp"
        shutil.copyfile(out / name, tmp)
        os.replace(tmp, figures_dir / name)
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
        dense = {r["model"]: r["metric"] for r in data["rows"] if r["router"] == "dense"}
        for r in data["rows"]:
            twin = dense.get(r["model"]) if r["router"] != "dense" else None
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


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], missing: Sequence[str],
             others: Sequence[str], settings: str, command: str) -> str:  # fmt: skip
    lines = [
        f"### Cross-domain benchmark ({settings} settings)",
        "",
        f"Generated by `{command}`; quality on each domain's test split (the arrow says which way is better), "
        "dense-twin delta = MoE metric - dense twin metric, parameters active per token / total, throughput "
        "measured on this machine's CPU, expert-load CV = std/mean of tokens per expert (mean over MoE layers), "
        "dropped = fraction of tokens routed to no expert.",
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
    lines += ["", "| domain | benchmark | status | runtime (s) |", "| --- | --- | --- | --- |"]
    for run in runs:
        runtime = "-" if run["runtime_s"] is None else run["runtime_s"]
        lines.append(f"| {run['domain']} | `moezoo bench {run['module']}` | {run['status']} | {runtime} |")
    for domain in missing:
        lines.append(f"| {domain} | - | no benchmark yet (no moezoo/bench/{domain}.py) | - |")
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


# -- plots ------------------------------------------------------------------------------------------------------
def plot_all(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """Quality vs active parameters (one panel per domain), expert-load heatmaps and routing specialisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    written = []
    domains = sorted({r["domain"] for r in rows})
    if domains:
        fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False)
        for ax, domain in zip(axes[0], domains):
            for r in (r for r in rows if r["domain"] == domain):
                marker = "s" if r["router"] == "dense" else "o"
                ax.scatter(r["active_params"], r["metric"], marker=marker, label=f"{r['model']} {r['router']}")
            metric = next(r["metric_name"] for r in rows if r["domain"] == domain)
            active = [r["active_params"] for r in rows if r["domain"] == domain]
            # A log axis only when the sizes span a decade; millions on the ticks either way (no minor labels).
            scale = "log" if max(active) > 10 * max(1, min(active)) else "linear"
            ax.set(title=domain, xlabel="active parameters per token (millions)", ylabel=metric, xscale=scale)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.4g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", labelsize=7)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "quality_vs_active.png", dpi=120)
        plt.close(fig)
        written.append("quality_vs_active.png")
    for run in runs:
        data = run["data"]
        if data is None:
            continue
        moe_rows = [r for r in data["rows"] if r.get("expert_load")]
        if moe_rows:
            fig, axes = plt.subplots(1, len(moe_rows), figsize=(3.8 * len(moe_rows), 2.8), squeeze=False)
            for ax, r in zip(axes[0], moe_rows):
                load_LE = torch.tensor(r["expert_load"]) * 100
                image = ax.imshow(load_LE.numpy(), aspect="auto", cmap="viridis")
                if load_LE.shape[1] <= 16:
                    ax.set_xticks(range(load_LE.shape[1]))
                ax.set(title=f"{r['model']} {r['router']}", xlabel="expert", ylabel="MoE layer")
                fig.colorbar(image, ax=ax, label="% of routed pairs")
            fig.suptitle(f"{run['domain']}: expert load")
            fig.tight_layout()
            name = f"expert_load_{run['domain']}.png"
            fig.savefig(out / name, dpi=120)
            plt.close(fig)
            written.append(name)
        spec_rows = [r for r in data["rows"] if r.get("specialisation")]
        if spec_rows:
            fig, axes = plt.subplots(1, len(spec_rows), figsize=(3.8 * len(spec_rows), 3.4), squeeze=False)
            for ax, r in zip(axes[0], spec_rows):
                spec = r["specialisation"]
                share_GE = torch.tensor(spec["share"]) * 100
                image = ax.imshow(share_GE.numpy(), aspect="auto", cmap="magma")
                if share_GE.shape[1] <= 16:
                    ax.set_xticks(range(share_GE.shape[1]))
                ax.set_yticks(range(len(spec["groups"])), spec["groups"], fontsize=6)
                layer = f"layer {spec['layer']}" if isinstance(spec["layer"], int) else spec["layer"]
                ax.set(title=f"{r['router']} ({layer})", xlabel="expert", ylabel=spec["by"])
                fig.colorbar(image, ax=ax, label=f"% of a {spec['by']}'s pairs")
            fig.suptitle(f"{run['domain']}: routing specialisation per {spec_rows[0]['specialisation']['by']}")
            fig.tight_layout()
            name = f"specialisation_{run['domain']}.png"
            fig.savefig(out / name, dpi=120)
            plt.close(fig)
            written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moezoo bench tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full settings (default: quick)")
    parser.add_argument("--out", default="bench_results/tables", help="results folder")
    parser.add_argument("--domains", default="", help="comma-separated subset of domains (default: all)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per domain benchmark")
    parser.add_argument("--no-zoo", action="store_true", help="skip re-evaluating the released checkpoints")
    parser.add_argument(
        "--reuse", action="store_true", help="keep a domain's valid raw/<domain>.json of these settings, do not rerun"
    )
    parser.add_argument(
        "--reuse-custom", action="store_true", help="--reuse, also accepting raw files of 'custom' settings"
    )
    parser.add_argument("--readme", default=None, help="replace the text between the bench-table markers of this file")
    parser.add_argument(
        "--readme-figures", default=None, help="copy the figures to this folder and link them from --readme"
    )
    args = parser.parse_args(argv)
    if args.readme_figures and not args.readme:
        parser.error("--readme-figures needs --readme")
    args.reuse = args.reuse or args.reuse_custom
    out = Path(args.out)
    settings = "full" if args.full else "quick"
    start = time.perf_counter()
    readme = Path(args.readme) if args.readme else None
    try:
        benches, missing, others = discover([d for d in args.domains.split(",") if d])
        if readme is not None:  # fail before hours of benchmarks, not after
            replace_readme_block(readme.read_text(), "")
    except (ValueError, OSError) as err:
        print(f"moezoo bench tables: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for domain, module in benches.items():
        run = None
        if args.reuse:
            run, why_not = reuse_domain(domain, module, settings, out, custom=args.reuse_custom)
            if run is None:
                print(f"[tables] {domain}: not reused: {why_not}", flush=True)
        if run is None:
            print(f"[tables] {domain}: moezoo bench {module} ({settings}) ...", flush=True)
            run = run_domain(domain, module, args.full, out, args.timeout)
        took = "" if run["runtime_s"] is None else f" in {run['runtime_s']} s"
        print(f"[tables] {domain}: {run['status']}{took}", flush=True)
        runs.append(run)
    rows = table_rows(runs)
    reuse_flag = " --reuse-custom" if args.reuse_custom else " --reuse" if args.reuse else ""
    command = "moezoo bench tables" + (" --full" if args.full else "") + reuse_flag
    write_csv(rows, out / "tables.csv")
    text = markdown(rows, runs, missing, others, settings, command)
    if not args.no_zoo:
        try:
            released = zoo_rows()
            text += "\n" + zoo_markdown(released)
            (out / "zoo.json").write_text(json.dumps(released, indent=2) + "\n")
        except Exception as err:  # noqa: BLE001 - the domain tables are still written
            text += f"\n### Released checkpoints\n\nCould not be re-evaluated: {type(err).__name__}: {err}\n"
    figures = plot_all(runs, rows, out)
    if figures:
        text += "\n" + "\n".join(f"![{f[:-4]}]({f})" for f in figures) + "\n"
    (out / "tables.md").write_text(text)
    if readme is not None:
        figures_dir = Path(args.readme_figures) if args.readme_figures else None
        block = readme_markdown(text, figures, out, readme, figures_dir)
        write_text_atomic(readme, replace_readme_block(readme.read_text(), block))
        print(f"[tables] replaced the bench tables of {readme}")
    total = time.perf_counter() - start
    summary = {"settings": settings, "runtime_s": round(total, 1), "runs": runs, "missing": missing, "others": others}
    (out / "runs.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(text)
    print(f"[tables] wrote {out}/tables.md, tables.csv, runs.json and {len(figures)} figure(s) in {total:.1f} s")
    return 0 if all(r["data"] is not None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
