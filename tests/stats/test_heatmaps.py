"""The routing heatmaps: one colour scale for every panel of a figure, titles, labelled integer axes."""

from __future__ import annotations

from pathlib import Path

import pytest

from moezoo.stats.heatmaps import expert_load_panel, heatmap_figure, save_figure, specialisation_panel


def test_panels_share_one_colour_scale_and_label_their_axes(tmp_path: Path) -> None:
    load = expert_load_panel([[0.5, 0.5, 0.0], [0.2, 0.7, 0.1]], "model a")
    spec = specialisation_panel([[0.9, 0.1], [0.3, 0.7]], ["cat", "dog"], "class", "model b")
    fig = heatmap_figure([load, spec], "domain: routing", "% of pairs")
    axes = [ax for ax in fig.axes if ax.images]
    assert [ax.images[0].get_clim() for ax in axes] == [(0.0, 90.0)] * 2  # 0 to the largest value of any panel
    assert [ax.get_title() for ax in axes] == ["model a", "model b"] and fig.get_suptitle() == "domain: routing"
    assert [ax.get_xlabel() for ax in axes] == ["expert", "expert"]
    assert [ax.get_ylabel() for ax in axes] == ["MoE layer", "class"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["0", "1"]
    assert [t.get_text() for t in axes[1].get_yticklabels()] == ["cat", "dog"]
    colorbars = [ax for ax in fig.axes if not ax.images]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "% of pairs"
    path = save_figure(fig, tmp_path / "sub" / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(path.parent.glob(".*"))
    with pytest.raises(ValueError, match="at least one panel"):
        heatmap_figure([], "t", "c")


def test_a_group_with_no_routed_pairs_is_blank_and_says_so() -> None:
    """A validation split without any French utterance: the row is missing data (grey), not 0 % on every expert."""
    import numpy as np

    panel = specialisation_panel([[0.0, 1.0], [0.0, 0.0]], ["en", "fr"], "language", "MoE layer 0")
    assert panel.row_labels == ["en", "fr (none)"] and np.isnan(panel.values[1]).all()
    fig = heatmap_figure([panel], "t", "c")
    image = next(ax for ax in fig.axes if ax.images).images[0]
    assert image.get_clim() == (0.0, 100.0) and tuple(image.get_cmap().get_bad()) != tuple(image.get_cmap()(0.0))
