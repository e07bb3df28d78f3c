"""``moezoo bench timeseries``: settings, the summary table and a clear message for a missing data file."""

from __future__ import annotations

from moezoo.bench import timeseries as bench


def test_quick_and_full_settings():
    quick = bench._parse(["--quick"])
    assert quick.horizons == [96] and quick.seeds == [0, 1] and quick.train_stride == 4 and quick.epochs == 3
    full = bench._parse([])
    assert full.horizons == [96, 192, 336, 720] and full.seeds == [0, 1, 2] and full.train_stride == 1
    assert full.variants == ["dense", "moe", "segmoe"] and full.seq_len == 336


def test_summary_has_mean_and_spread_over_seeds():
    args = bench._parse(["--quick", "--variants", "dense", "segmoe"])
    runs = []
    for seed, (d, s) in enumerate([(0.40, 0.38), (0.42, 0.40)]):
        for variant, mse in (("dense", d), ("segmoe", s)):
            cv = float("nan") if variant == "dense" else 0.25
            runs.append(
                {"variant": variant, "horizon": 96, "seed": seed, "mse": mse, "mae": mse + 0.02, "load_cv": cv,
                 "train_s": 10.0, "epochs": 3.0, "best_epoch": 2.0, "params": 1000.0}
            )  # fmt: skip
    table = bench.summarize(runs, args)
    assert "| 96 | dense | 0.410 ± 0.014 | 0.430 ± 0.014 | 10 | 3 (3) | - | 1000 | 0.37 |" in table
    assert "| 96 | segmoe | 0.390 ± 0.014 |" in table and "| 0.250 |" in table
    assert "| segmoe | 0.390 | 0.410 |" in table


def test_missing_data_file_is_a_clear_message(tmp_path, capsys):
    assert bench.main(["--quick", "--data", str(tmp_path / "nope.csv")]) == 2
    assert "is not a file" in capsys.readouterr().out
