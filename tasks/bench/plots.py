"""The figures of ``moezoo bench tables``: quality against active parameters (one panel per domain), and per
domain the expert load and the routing specialisation of each MoE row, drawn by :mod:`moezoo.stats.heatmaps` (the
routing-analytics callback draws its heatmaps with the same functions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moezoo.stats.heatmaps import (
    LOAD_LABEL,
    expert_load_panel,
    heatmap_figure,
    save_figure,
    share_label,
    specialisation_panel,
)
from moezoo.tasks.bench.schema import BASELINE, DENSE


def quality_vs_active(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Each domain's metric against active parameters per token (squares: dense twins, triangles: baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    domains = sorted({r["domain"] for r in rows})
    if not domains:
        return None
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        mine = [r for r in rows if r["domain"] == domain]
        for r in mine:
            marker = {DENSE: "s", BASELINE: "^"}.get(r["router"], "o")
            ax.scatter(r["active_params"], r["metric"], marker=marker, label=f"{r['model']} {r['router']}")
        active = [r["active_params"] for r in mine]
        positive = [a for a in active if a > 0] or [1]
        ax.set(title=domain, xlabel="active parameters per token (millions)", ylabel=mine[0]["metric_name"])
        # A log axis only when the sizes span a decade (symlog, linear below the smallest model with parameters, when
        # a baseline has none); millions on the ticks either way (no minor labels).
        if max(positive) <= 10 * min(positive):
            ax.set_xscale("linear")
        elif min(active) > 0:
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.4g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def domain_heatmaps(domain: str, data: dict[str, Any], out: Path) -> list[Path]:
    """``expert_load_<domain>.png`` and ``specialisation_<domain>.png``: one panel per MoE row, one colour scale."""
    written = []
    loads = [r for r in data["rows"] if r.get("expert_load")]
    if loads:
        panels = [expert_load_panel(r["expert_load"], f"{r['model']} {r['router']}") for r in loads]
        fig = heatmap_figure(panels, f"{domain}: expert load (test split)", LOAD_LABEL)
        written.append(save_figure(fig, out / f"expert_load_{domain}.png", dpi=120))
    specs = [r for r in data["rows"] if r.get("specialisation")]
    if specs:
        by = specs[0]["specialisation"]["by"]
        panels = []
        for r in specs:
            spec = r["specialisation"]
            layer = f"layer {spec['layer']}" if isinstance(spec["layer"], int) else spec["layer"]
            panels.append(specialisation_panel(spec["share"], spec["groups"], spec["by"], f"{r['router']} ({layer})"))
        fig = heatmap_figure(panels, f"{domain}: routing per {by} (test split)", share_label(by), "magma")
        written.append(save_figure(fig, out / f"specialisation_{domain}.png", dpi=120))
    return written


def plot_all(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """Every figure of the tables; returns the file names written in ``out``."""
    written = []
    path = quality_vs_active(rows, out / "quality_vs_active.png")
    if path is not None:
        written.append(path.name)
    for run in runs:
        if run["data"] is not None:
            written += [p.name for p in domain_heatmaps(run["domain"], run["data"], out)]
    return written
