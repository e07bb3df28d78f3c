"""The routing heatmaps: expert load per MoE layer, and routing shares per group (specialisation).

One implementation for the routing-analytics callback (one model, every layer) and ``moezoo bench tables`` (one
panel per model of a domain). Every figure has a title, labelled axes with integer expert and layer ticks, and one
colour scale shared by all its panels (0 to the largest value of any panel), so that panels compare directly.
matplotlib (Agg backend) is imported when a figure is drawn.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moezoo.io import write_bytes_atomic

MAX_TICKS = 32  # label every integer up to this many experts/layers; beyond, let matplotlib pick integer ticks


@dataclass
class Panel:
    """One heatmap: ``values`` rows x columns (experts along the columns), in percent."""

    values: Sequence[Sequence[float]]
    title: str
    ylabel: str
    row_labels: Sequence[str] | None = None  # None: the rows are numbered 0, 1, ...


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap_figure(panels: Sequence[Panel], title: str, colorbar_label: str, cmap: str = "viridis") -> Any:
    """A row of heatmaps with one shared colour scale and colour bar; returns the matplotlib ``Figure``.

    The layout is fixed in inches (no layout solver: a figure is drawn at every validation of every run).
    """
    if not panels:
        raise ValueError("heatmap_figure needs at least one panel")
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    arrays = []
    for panel in panels:
        lists = [list(r) for r in panel.values]
        width = max((len(r) for r in lists), default=0)
        padded = [r + [np.nan] * (width - len(r)) for r in lists]
        arrays.append(np.array(padded, dtype=float).reshape(len(lists), width))
    vmax = max((float(np.nanmax(a)) for a in arrays if a.size and not np.isnan(a).all()), default=1.0) or 1.0
    label_width = max((max(map(len, p.row_labels), default=1) for p in panels if p.row_labels), default=2)
    left, gap, right, bottom, top = 0.45 + 0.055 * label_width, 0.35 + 0.055 * label_width, 1.1, 0.55, 0.75
    axis_widths = [max(2.0, 0.32 * a.shape[1]) for a in arrays]
    axis_height = max(1.3, 0.24 * max(a.shape[0] for a in arrays))
    fig_w = left + sum(axis_widths) + gap * (len(panels) - 1) + right
    fig_h = bottom + axis_height + top
    fig = plt.figure(figsize=(fig_w, fig_h))
    colours = plt.get_cmap(cmap).with_extremes(bad="#d0d0d0")  # missing cells (no data) in light grey
    x = left
    image = None
    for panel, values, axis_width in zip(panels, arrays, axis_widths):
        ax = fig.add_axes((x / fig_w, bottom / fig_h, axis_width / fig_w, axis_height / fig_h))
        x += axis_width + gap
        image = ax.imshow(values, aspect="auto", cmap=colours, vmin=0.0, vmax=vmax, interpolation="nearest")
        rows, cols = values.shape
        if cols <= MAX_TICKS:
            ax.set_xticks(range(cols))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        labels = list(panel.row_labels) if panel.row_labels is not None else [str(i) for i in range(rows)]
        if rows <= MAX_TICKS or panel.row_labels is not None:
            ax.set_yticks(range(rows), labels, fontsize=7 if panel.row_labels is not None else None)
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel.title, fontsize=9)
        ax.set(xlabel="expert", ylabel=panel.ylabel)
    cax = fig.add_axes(((x - gap + 0.15) / fig_w, bottom / fig_h, 0.12 / fig_w, axis_height / fig_h))
    fig.colorbar(image, cax=cax, label=colorbar_label)
    fig.suptitle(title, y=1 - 0.12 / fig_h, va="top", fontsize=11)
    return fig


def expert_load_panel(
    expert_load_LE: Sequence[Sequence[float]], title: str, layers: Sequence[int] | None = None
) -> Panel:
    """Expert load per MoE layer (shares, drawn as % of the layer's routed pairs)."""
    labels = [str(i) for i in layers] if layers is not None else None
    return Panel([[100.0 * v for v in row] for row in expert_load_LE], title, "MoE layer", labels)


def specialisation_panel(share_GE: Sequence[Sequence[float]], groups: Sequence[str], by: str, title: str) -> Panel:
    """Each group's routing shares over the experts (% of the group's routed pairs). A group with no routed pairs
    (none of its samples in the split) is drawn blank and labelled ``"<group> (none)"``, not as 0 % everywhere."""
    rows, labels = [], []
    for row, group in zip(share_GE, groups):
        empty = not any(row)
        rows.append([math.nan if empty else 100.0 * v for v in row])
        labels.append(f"{group} (none)" if empty else str(group))
    return Panel(rows, title, by, labels)


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """``fig`` drawn once as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    return buffer.getvalue()


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (:mod:`moezoo.io`) and close it."""
    return write_bytes_atomic(path, png_bytes(fig, dpi))


LOAD_LABEL = "% of the layer's routed pairs"


def share_label(by: str) -> str:
    return f"% of a {by}'s routed pairs"
