"""The routing heatmaps: expert load per MoE layer, and routing shares per group (specialisation).

One implementation for the routing-analytics callback (one model, every layer) and ``moezoo bench tables`` (one
panel per model of a domain). Every figure has a title, labelled axes with integer expert and layer ticks, and one
colour scale shared by all its panels (0 to the largest value of any panel), so that panels compare directly.
matplotlib (Agg backend) is imported when a figure is drawn.
"""

from __future__ import annotations

import io
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
    """A row of heatmaps with one shared colour scale and colour bar; returns the matplotlib ``Figure``."""
    if not panels:
        raise ValueError("heatmap_figure needs at least one panel")
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    arrays = []
    for panel in panels:
        rows = [list(r) for r in panel.values]
        width = max((len(r) for r in rows), default=0)
        arrays.append(np.array([r + [np.nan] * (width - len(r)) for r in rows], dtype=float).reshape(len(rows), width))
    vmax = max((float(np.nanmax(a)) for a in arrays if a.size and not np.isnan(a).all()), default=1.0) or 1.0
    widths = [max(3.2, 0.35 * a.shape[1] + 2.0) for a in arrays]
    height = max(2.8, 0.28 * max(a.shape[0] for a in arrays) + 1.8)
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 1.4, height), squeeze=False, layout="constrained")
    image = None
    for ax, panel, values in zip(axes[0], panels, arrays):
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
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
        ax.set(title=panel.title, xlabel="expert", ylabel=panel.ylabel)
        ax.title.set_fontsize(9)
    fig.suptitle(title)
    fig.colorbar(image, ax=list(axes[0]), label=colorbar_label, shrink=0.9)
    return fig


def expert_load_panel(
    expert_load_LE: Sequence[Sequence[float]], title: str, layers: Sequence[int] | None = None
) -> Panel:
    """Expert load per MoE layer (shares, drawn as % of the layer's routed pairs)."""
    labels = [str(i) for i in layers] if layers is not None else None
    return Panel([[100.0 * v for v in row] for row in expert_load_LE], title, "MoE layer", labels)


def specialisation_panel(share_GE: Sequence[Sequence[float]], groups: Sequence[str], by: str, title: str) -> Panel:
    """Each group's routing shares over the experts (% of the group's routed pairs)."""
    return Panel([[100.0 * v for v in row] for row in share_GE], title, by, list(groups))


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (:mod:`moezoo.io`) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


LOAD_LABEL = "% of the layer's routed pairs"


def share_label(by: str) -> str:
    return f"% of a {by}'s routed pairs"
