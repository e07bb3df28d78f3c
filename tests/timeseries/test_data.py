"""The forecasting data protocol: split borders, a scaler fitted on train only, no future value in an input window,
clear errors for bad CSVs; ETTh1 itself when the shared copy is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moezoo.tasks.timeseries import CSVForecastDataModule, ElecDemandDataModule, split_borders

ETTH1 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ett" / "ETTh1.csv"


def write_csv(path: Path, num_rows: int, columns=("a", "b", "OT"), freq="h", values=None, date=True) -> Path:
    """A dated CSV whose every value encodes its row index (row r of column c holds r + 0.1 * c)."""
    import pandas as pd

    rows = np.arange(num_rows, dtype=np.float64)[:, None]
    data = rows + 0.1 * np.arange(len(columns))[None, :] if values is None else values
    frame = pd.DataFrame(data, columns=list(columns))
    if date:
        frame.insert(0, "date", pd.date_range("2016-07-01", periods=num_rows, freq=freq))
    frame.to_csv(path, index=False)
    return path


def test_ett_hour_borders_follow_the_protocol():
    borders = split_borders(17420, 336, "ett_hour")
    assert borders == {"train": (0, 8640), "val": (8640 - 336, 11520), "test": (11520 - 336, 14400)}
    assert split_borders(69680, 96, "ett_minute")["test"] == (4 * 11520 - 96, 4 * 14400)


def test_ratio_borders_are_70_10_20():
    borders = split_borders(1000, 24, "ratio")
    assert borders == {"train": (0, 700), "val": (700 - 24, 800), "test": (800 - 24, 1000)}


@pytest.mark.parametrize("name,kind", [("ETTh2.csv", 14400), ("ETTm1.csv", 57600), ("weather.csv", None)])
def test_split_kind_by_file_name(tmp_path, name, kind):
    num_rows = kind or 2000
    data = CSVForecastDataModule(str(write_csv(tmp_path / name, num_rows)), seq_len=48, pred_len=24, scale=False)
    data.setup()
    if kind == 14400:
        assert data.borders["test"] == (11520 - 48, 14400)
    elif kind == 57600:
        assert data.borders["test"] == (4 * 11520 - 48, 4 * 14400)
    else:
        assert data.borders["test"] == (1600 - 48, 2000)


def test_windows_never_see_the_future_and_targets_stay_in_their_split(tmp_path):
    seq_len, pred_len = 24, 12
    data = CSVForecastDataModule(
        str(write_csv(tmp_path / "series.csv", 500)), seq_len=seq_len, pred_len=pred_len, scale=False
    )
    data.setup()
    assert data.columns == ["a", "b", "OT"]  # the target is the last channel
    target_start = {"train": 0, "val": 350, "test": 400}
    for split, dataset in data.datasets.items():
        start, end = data.borders[split]
        assert len(dataset) == end - start - seq_len - pred_len + 1
        for i in range(len(dataset)):
            x, y = dataset[i]
            x_rows, y_rows = x[:, 0].round().long(), y[:, 0].round().long()  # column "a" holds the row index
            s = start + i
            assert torch.equal(x_rows, torch.arange(s, s + seq_len))
            assert torch.equal(y_rows, torch.arange(s + seq_len, s + seq_len + pred_len))
            assert int(x_rows.max()) < int(y_rows.min())  # every input row precedes every target row
            assert int(y_rows.min()) >= target_start[split] and int(y_rows.max()) < end
    # The test split's first target is the first test row; the look-back reaches back into validation only.
    assert int(data.datasets["test"][0][1][0, 0].round()) == 400


def test_scaler_is_fitted_on_the_training_rows_only(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(1000, 2))
    values[700:] += 100.0  # validation and test live far away: a scaler that saw them would be off
    path = write_csv(tmp_path / "series.csv", 1000, columns=("x", "OT"), values=values)
    data = CSVForecastDataModule(str(path), seq_len=24, pred_len=8)
    data.setup()
    np.testing.assert_allclose(data.scaler.mean, values[:700].mean(0))
    np.testing.assert_allclose(data.scaler.std, values[:700].std(0))
    x, _ = data.datasets["train"][0]
    np.testing.assert_allclose(x.numpy(), ((values[:24] - values[:700].mean(0)) / values[:700].std(0)), rtol=1e-5)
    assert float(data.datasets["test"][0][1].mean()) > 50  # test targets are far from the training scale


def test_univariate_setting_keeps_the_target_only(tmp_path):
    data = CSVForecastDataModule(str(write_csv(tmp_path / "s.csv", 300)), features="S", seq_len=16, pred_len=4)
    data.setup()
    x, y = data.datasets["train"][0]
    assert data.columns == ["OT"] and x.shape == (16, 1) and y.shape == (4, 1)


def test_strides_subsample_train_and_val_but_never_test(tmp_path):
    path = str(write_csv(tmp_path / "s.csv", 1000))
    full = CSVForecastDataModule(path, seq_len=24, pred_len=8, scale=False)
    sub = CSVForecastDataModule(path, seq_len=24, pred_len=8, scale=False, train_stride=4, val_stride=3)
    full.setup()
    sub.setup()
    assert len(sub.datasets["train"]) == (len(full.datasets["train"]) - 1) // 4 + 1
    assert len(sub.datasets["val"]) == (len(full.datasets["val"]) - 1) // 3 + 1
    assert len(sub.datasets["test"]) == len(full.datasets["test"])
    assert torch.equal(sub.datasets["train"][1][0], full.datasets["train"][4][0])


def test_csv_without_date_column_is_a_clear_error(tmp_path):
    path = write_csv(tmp_path / "nodate.csv", 300, date=False)
    with pytest.raises(ValueError, match=r"date_column='date' is not a column.*\['a', 'b', 'OT'\]"):
        CSVForecastDataModule(str(path), seq_len=16, pred_len=4).setup()


def test_nan_in_a_series_is_a_clear_error(tmp_path):
    values = np.arange(600, dtype=np.float64).reshape(300, 2)
    values[123, 1] = np.nan
    path = write_csv(tmp_path / "nan.csv", 300, columns=("x", "OT"), values=values)
    with pytest.raises(ValueError, match=r"column 'OT' has NaN values \(first at row 123\)"):
        CSVForecastDataModule(str(path), seq_len=16, pred_len=4).setup()


def test_missing_target_is_a_clear_error(tmp_path):
    path = write_csv(tmp_path / "s.csv", 300)
    with pytest.raises(ValueError, match=r"target='Temperature' is not a column.*\['a', 'b', 'OT'\]"):
        CSVForecastDataModule(str(path), target="Temperature", seq_len=16, pred_len=4).setup()


def test_lookback_plus_horizon_longer_than_a_split_is_a_clear_error(tmp_path):
    path = write_csv(tmp_path / "s.csv", 300)  # 70/10/20: val holds 30 rows + the look-back
    with pytest.raises(ValueError, match=r"seq_len \+ pred_len = 48 \+ 40 = 88 rows is longer than the val split"):
        CSVForecastDataModule(str(path), seq_len=48, pred_len=40).setup()


def test_other_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="path="):
        CSVForecastDataModule(str(tmp_path / "missing.csv")).setup()
    with pytest.raises(ValueError, match="features='MS'"):
        CSVForecastDataModule("x.csv", features="MS")
    with pytest.raises(ValueError, match="split='months'"):
        CSVForecastDataModule("x.csv", split="months")
    with pytest.raises(ValueError, match="needs at least 14400 rows"):
        CSVForecastDataModule(str(write_csv(tmp_path / "ETTh9.csv", 1000)), seq_len=16, pred_len=4).setup()
    import pandas as pd

    frame = pd.DataFrame({"date": pd.date_range("2020", periods=200, freq="h"), "OT": ["1.5"] * 199 + ["oops"]})
    frame.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'OT' has a non-numeric value 'oops' at row 199"):
        CSVForecastDataModule(str(tmp_path / "text.csv"), seq_len=16, pred_len=4).setup()


def test_embedded_elecdemand_default():
    data = ElecDemandDataModule(seq_len=96, pred_len=48)
    data.setup()
    assert data.columns == ["WorkDay", "Temperature", "Demand"]
    assert data.borders["train"] == (0, int(17520 * 0.7))
    x, y = data.datasets["test"][0]
    assert x.shape == (96, 3) and y.shape == (48, 3) and torch.isfinite(x).all()


@pytest.mark.skipif(not ETTH1.is_file(), reason=f"ETTh1.csv not found at {ETTH1} (the shared data folder)")
def test_etth1_standard_protocol():
    data = CSVForecastDataModule(str(ETTH1), seq_len=336, pred_len=96)
    data.setup()
    assert data.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert data.borders == {"train": (0, 8640), "val": (8304, 11520), "test": (11184, 14400)}
    assert {k: len(v) for k, v in data.datasets.items()} == {"train": 8209, "val": 2785, "test": 2785}
    train = data.datasets["train"].data[:8640]
    torch.testing.assert_close(train.mean(0), torch.zeros(7), atol=1e-4, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(7), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_infinite_value_is_a_clear_error_naming_file_and_column(tmp_path, bad):
    """Issue 18 item 4: +-inf used to pass the loader and fail deep in the model."""
    values = np.ones((300, 2))
    values[77, 0] = bad
    path = write_csv(tmp_path / "inf.csv", 300, columns=("x", "OT"), values=values)
    with pytest.raises(ValueError, match=r"inf.csv: column 'x' has an infinite value -?inf at row 77"):
        CSVForecastDataModule(str(path), seq_len=24, pred_len=12).setup()


def test_duplicate_timestamps_and_gaps_are_reported(tmp_path):
    """Issue 18 item 4: duplicate timestamps and time gaps used to pass silently."""
    import pandas as pd

    from moezoo.tasks.records import DataWarning
    from moezoo.tasks.timeseries.data import read_csv_series

    path = write_csv(tmp_path / "series.csv", 300, columns=("x", "OT"))
    frame = pd.read_csv(path)
    frame = frame.drop(index=range(200, 205))  # a 6-hour gap after row 199 (row 200 once row 50 is doubled)
    frame = pd.concat([frame.iloc[:51], frame.iloc[50:51], frame.iloc[51:]])  # a duplicate of row 50
    frame.to_csv(path, index=False)
    with pytest.warns(DataWarning) as record:
        read_csv_series(path, "OT")
    messages = [str(w.message) for w in record]
    assert any("series.csv: column 'date' has 1 duplicate timestamps (first at row 51" in m for m in messages)
    assert any("has 1 gaps longer than its usual step (first after row 200" in m for m in messages)
    assert any("the largest spans 6 steps" in m for m in messages)
    clean = write_csv(tmp_path / "clean.csv", 300, columns=("x", "OT"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        read_csv_series(clean, "OT")
