"""``moezoo bench tables``: run every domain benchmark and write the cross-domain tables and plots.

The benchmarks are those of the ``moezoo bench`` table (:data:`moezoo.cli.BENCHMARKS`): a *domain benchmark* is a
module of :mod:`moezoo.tasks.bench` that sets ``DOMAIN = "<domain>"``. Every task domain
(:data:`moezoo.tasks.cli.DOMAINS`) without one is listed as "no benchmark yet"; the micro benchmarks of
``moezoo.bench`` (layer, kernels, parallel, routers) are not quality benchmarks and are listed apart.

Contract of a domain benchmark: ``moezoo bench <domain> --quick --json PATH`` (its quick settings, minutes on a
2-core CPU) or ``moezoo bench <domain> --full --json PATH`` (its full settings) exits 0 and writes to PATH the
tables format of :mod:`moezoo.tasks.bench.schema`.

Each benchmark runs in its own process (a crash or a timeout marks that domain and the others go on). Output in
``--out`` (default ``bench_results/tables``): ``tables.csv``, ``tables.md``, ``quality_vs_active.png``,
``expert_load_<domain>.png``, ``specialisation_<domain>.png`` (:mod:`moezoo.tasks.bench.plots`), ``runs.json``,
one log per domain and each domain's JSON in ``raw/<domain>.json``.

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
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moezoo.io import write_json_atomic, write_text_atomic
from moezoo.tasks.bench.plots import plot_all
from moezoo.tasks.bench.render import (
    markdown,
    readme_markdown,
    replace_readme_block,
    table_rows,
    write_csv,
    zoo_markdown,
    zoo_rows,
)
from moezoo.tasks.bench.schema import validate


def task_domains() -> list[str]:
    """The task domains: the last part of each package in :data:`moezoo.tasks.cli.DOMAINS`."""
    from moezoo.tasks.cli import DOMAINS

    return sorted(package.rsplit(".", 1)[-1] for package in DOMAINS)


def discover(domains: Sequence[str] | None = None) -> tuple[dict[str, str], list[str], list[str]]:
    """``({domain: bench name}, domains without a benchmark, other benchmarks)`` from the table of ``moezoo bench``
    commands (:data:`moezoo.cli.BENCHMARKS`): a domain benchmark is a module of :mod:`moezoo.tasks.bench` with a
    ``DOMAIN``; the micro benchmarks of :mod:`moezoo.bench` are the others."""
    from moezoo.cli import BENCHMARKS

    benches: dict[str, str] = {}
    for name, (module, _) in BENCHMARKS.items():
        if name == "tables" or not module.startswith("moezoo.tasks.bench."):
            continue
        try:
            declared = getattr(importlib.import_module(module), "DOMAIN", None)
        except Exception as err:  # noqa: BLE001 - a broken module is listed, not a crash of the whole table
            print(f"[tables] {module} does not import ({type(err).__name__}: {err})", flush=True)
            declared = None
        if isinstance(declared, str):
            benches[declared] = name
    others = sorted(name for name, (module, _) in BENCHMARKS.items() if module.startswith("moezoo.bench."))
    wanted = set(task_domains()) | set(benches)
    if domains:
        unknown = set(domains) - wanted
        if unknown:
            raise ValueError(f"--domains {sorted(unknown)} are not domains; known: {sorted(wanted)}")
        wanted = set(domains)
    missing = sorted(d for d in wanted if d not in benches)
    return {d: m for d, m in sorted(benches.items()) if d in wanted}, missing, others


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
    domains_flag = f" --domains {args.domains}" if args.domains else ""
    command = "moezoo bench tables" + (" --full" if args.full else "") + reuse_flag + domains_flag
    write_csv(rows, out / "tables.csv")
    text = markdown(rows, runs, missing, others, settings, command)
    if not args.no_zoo:
        try:
            released = zoo_rows()
            text += "\n" + zoo_markdown(released)
            write_json_atomic(out / "zoo.json", released, sort_keys=False)
        except Exception as err:  # noqa: BLE001 - the domain tables are still written
            text += f"\n### Released checkpoints\n\nCould not be re-evaluated: {type(err).__name__}: {err}\n"
    figures = plot_all(runs, rows, out)
    if figures:
        text += "\n" + "\n".join(f"![{f[:-4]}]({f})" for f in figures) + "\n"
    write_text_atomic(out / "tables.md", text)
    if readme is not None:
        figures_dir = Path(args.readme_figures) if args.readme_figures else None
        block = readme_markdown(text, figures, out, readme, figures_dir)
        write_text_atomic(readme, replace_readme_block(readme.read_text(), block))
        print(f"[tables] replaced the bench tables of {readme}")
    total = time.perf_counter() - start
    summary = {"settings": settings, "runtime_s": round(total, 1), "runs": runs, "missing": missing, "others": others}
    write_json_atomic(out / "runs.json", summary, sort_keys=False)
    print(text)
    print(f"[tables] wrote {out}/tables.md, tables.csv, runs.json and {len(figures)} figure(s) in {total:.1f} s")
    return 0 if all(r["data"] is not None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
