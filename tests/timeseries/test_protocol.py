"""The published long-term forecasting protocol, pinned: ETTh1's test-window counts and scaler statistics against
figures computed here independently of the data module (the stdlib csv reader, scikit-learn's ``StandardScaler`` as
the public code uses it, the window formula), and the task's test metric as the mean over every window and channel.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from moezoo.tasks.timeseries import CSVForecastDataModule, ForecastingTask

ETTH1 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ett" / "ETTh1.csv"
needs_etth1 = pytest.mark.skipif(not ETTH1.is_file(), reason=f"ETTh1.csv not found at {ETTH1} (the shared data folder)")

SEQ_LEN = 336
TRAIN_END, VAL_END, TEST_END = 12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24  # 12/4/4 months of hourly rows
# Test windows at look-back 336: (TEST_END - (VAL_END - 336)) - 336 - H + 1, every window, stride 1 ...
TEST_WINDOWS = {96: 2785, 192: 2689, 336: 2545, 720: 2161}
# ... and what the public PatchTST / LTSF-Linear scripts score with drop_last=True at batch 128.
TEST_WINDOWS_DROP_LAST_128 = {96: 2688, 192: 2688, 336: 2432, 720: 2048}


def read_raw(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    return header[1:], np.array([[float(v) for v in row[1:]] for row in body])


def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_window_formula_and_drop_last_counts():
    for horizon, count in TEST_WINDOWS.items():
        assert (TEST_END - (VAL_END - SEQ_LEN)) - SEQ_LEN - horizon + 1 == count
        assert TEST_WINDOWS_DROP_LAST_128[horizon] == count // 128 * 128


@needs_etth1
def test_etth1_scaler_is_scikit_learns_fitted_on_the_training_rows():
    from sklearn.preprocessing import StandardScaler

    columns, raw = read_raw(ETTH1)
    assert raw.shape == (17420, 7) and columns[-1] == "OT"
    reference = StandardScaler().fit(raw[:TRAIN_END])
    data = CSVForecastDataModule(str(ETTH1), seq_len=SEQ_LEN, pred_len=96)
    data.setup()
    assert data.columns == columns and data.scaler is not None
    np.testing.assert_allclose(data.scaler.mean, reference.mean_, rtol=1e-12)
    np.testing.assert_allclose(data.scaler.std, reference.scale_, rtol=1e-12)
    # The scaled series is the reference transform of the raw rows (float32 in the windows).
    scaled = reference.transform(raw).astype(np.float32)
    x, y = data.datasets["test"][0]
    np.testing.assert_allclose(x.numpy(), scaled[VAL_END - SEQ_LEN : VAL_END], rtol=0, atol=0)
    np.testing.assert_allclose(y.numpy(), scaled[VAL_END : VAL_END + 96], rtol=0, atol=0)
    x, y = data.datasets["test"][len(data.datasets["test"]) - 1]
    np.testing.assert_allclose(y.numpy(), scaled[TEST_END - 96 : TEST_END], rtol=0, atol=0)  # ends on row 14399


@needs_etth1
@pytest.mark.parametrize("horizon", sorted(TEST_WINDOWS))
def test_etth1_test_loader_scores_every_window(horizon):
    for drop_last, expected in ((False, TEST_WINDOWS), (True, TEST_WINDOWS_DROP_LAST_128)):
        data = CSVForecastDataModule(str(ETTH1), seq_len=SEQ_LEN, pred_len=horizon, test_drop_last=drop_last)
        data.setup()
        windows = sum(x.shape[0] for x, _ in data.test_dataloader())
        assert windows == expected[horizon], (horizon, drop_last)


@needs_etth1
def test_etth1_task_metric_is_the_mean_over_every_window_and_channel():
    """Last value at H=96: the task's test MSE/MAE equal a numpy mean over all 2785 x 96 x 7 predictions made from
    the independently scaled raw rows (and over the first 2688 windows with the scripts' drop_last)."""
    from sklearn.preprocessing import StandardScaler

    _, raw = read_raw(ETTH1)
    scaled = StandardScaler().fit(raw[:TRAIN_END]).transform(raw)
    starts = np.arange(VAL_END - SEQ_LEN, TEST_END - SEQ_LEN - 96 + 1)
    assert len(starts) == TEST_WINDOWS[96]
    futures = np.stack([scaled[s + SEQ_LEN : s + SEQ_LEN + 96] for s in starts])  # (W, H, C)
    errors = futures - scaled[starts + SEQ_LEN - 1][:, None, :]
    for drop_last, windows in ((False, TEST_WINDOWS[96]), (True, TEST_WINDOWS_DROP_LAST_128[96])):
        task = ForecastingTask("last_value_base", num_plot_windows=0)
        data = CSVForecastDataModule(str(ETTH1), seq_len=SEQ_LEN, pred_len=96, test_drop_last=drop_last)
        result = trainer().test(task, datamodule=data, verbose=False)[0]
        assert result["test/mse"] == pytest.approx(float(np.square(errors[:windows]).mean()), rel=1e-5)
        assert result["test/mae"] == pytest.approx(float(np.abs(errors[:windows]).mean()), rel=1e-5)


def test_task_metric_weights_windows_not_batches(tmp_path):
    """129 test windows in batches of 64: the last batch holds one window, the only one with an error (a spike in
    the last row). The logged MSE must be the mean over windows (1/129 of that window's error), not the mean of
    the three batch means (1/3 of it)."""
    import pandas as pd

    rows = 1000  # 70/10/20: test rows [800 - 24, 1000), 224 - 24 - 72 + 1 = 129 windows
    values = np.zeros((rows, 2))
    values[-1] = 100.0
    frame = pd.DataFrame(values, columns=["x", "OT"])
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=rows, freq="h"))
    frame.to_csv(tmp_path / "series.csv", index=False)
    data = CSVForecastDataModule(str(tmp_path / "series.csv"), seq_len=24, pred_len=72, batch_size=64, scale=False)
    data.setup()
    assert len(data.datasets["test"]) == 129
    errors = np.stack([(y - x[-1:]).numpy() for x, y in (data.datasets["test"][i] for i in range(129))])
    per_window = np.square(errors).mean(axis=(1, 2))
    assert np.count_nonzero(per_window) == 1 and per_window[-1] == pytest.approx(100.0**2 / 72)
    task = ForecastingTask("last_value_base", {"seq_len": 24, "pred_len": 72, "num_channels": 2}, num_plot_windows=0)
    result = trainer().test(task, datamodule=data, verbose=False)[0]
    assert result["test/mse"] == pytest.approx(float(per_window.mean()), rel=1e-5)
    assert result["test/mae"] == pytest.approx(float(np.abs(errors).mean()), rel=1e-5)


def test_test_drop_last_drops_only_the_last_incomplete_test_batch(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=1000, freq="h"), "OT": np.arange(1000.0)})
    frame.to_csv(tmp_path / "series.csv", index=False)
    kwargs = dict(seq_len=24, pred_len=72, batch_size=64, scale=False)
    full = CSVForecastDataModule(str(tmp_path / "series.csv"), **kwargs)
    dropped = CSVForecastDataModule(str(tmp_path / "series.csv"), test_drop_last=True, **kwargs)
    for data in (full, dropped):
        data.setup()
    assert [x.shape[0] for x, _ in full.test_dataloader()] == [64, 64, 1]
    assert [x.shape[0] for x, _ in dropped.test_dataloader()] == [64, 64]
    assert sum(1 for _ in dropped.train_dataloader()) == sum(1 for _ in full.train_dataloader())  # test only
