"""The forgetting experiment's manifests: new voices split without overlap, the original test voices, rehearsal."""

from __future__ import annotations

from pathlib import Path

import pytest

from moezoo.tasks.speech.forgetting import forgetting_sets, manifest_row


def _rows() -> list[dict]:
    rows = []
    for i in range(40):
        engine = ("festival", "espeak", "flite", "espeak")[i % 4]
        split = "test" if i % 5 == 0 else "train"
        rows.append({"id": str(i), "split": split, "engine": engine, "audio": f"{split}/{i}.wav", "text": str(i),
                     "language": "fr+de" if i % 7 == 0 else "en"})  # fmt: skip
    return rows


def test_sets_are_disjoint_and_drawn_from_the_right_engines():
    sets = forgetting_sets(_rows(), num_new_test=3, mix_fraction=0.5, seed=0)
    ids = {name: [r["id"] for r in rows] for name, rows in sets.items()}
    festival_train = [r["id"] for r in _rows() if r["split"] == "train" and r["engine"] == "festival"]
    assert sorted(ids["new_train"] + ids["new_test"]) == sorted(festival_train) and len(ids["new_test"]) == 3
    assert not set(ids["new_train"]) & set(ids["new_test"])
    assert all(r["engine"] in ("espeak", "flite") and r["split"] == "test" for r in sets["orig_test"])
    rehearsal = [r for r in sets["mix_train"] if r["engine"] != "festival"]
    assert len(rehearsal) == round(0.5 * len(ids["new_train"])) and all(r["split"] == "train" for r in rehearsal)
    assert sorted(r["id"] for r in sets["mix_train"] if r["engine"] == "festival") == sorted(ids["new_train"])
    assert forgetting_sets(_rows(), 3, 0.5, 0) == sets  # seeded


def test_rows_and_bad_arguments():
    row = manifest_row({"audio": "train/1.wav", "text": "un eins", "language": "fr+de"}, Path("/c"))
    assert row == {"audio": "/c/train/1.wav", "text": "un eins", "language": "fr"}
    with pytest.raises(ValueError, match="leaves no festival utterance"):
        forgetting_sets(_rows(), num_new_test=100)
    with pytest.raises(ValueError, match="mix_fraction must be in"):
        forgetting_sets(_rows(), 3, mix_fraction=2.0)
