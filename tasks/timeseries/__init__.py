"""Time-series tasks: long-term forecasting with ``moe_patchtst`` (Seg-MoE routing) on ETT-style CSVs."""

from moezoo.extras import require

require("timeseries", __name__)  # before the imports it guards

from moezoo.tasks.timeseries.data import (
    RDATASETS_SERIES,
    CSVForecastDataModule,
    ElecDemandDataModule,
    ForecastDataModule,
    RDatasetsForecastDataModule,
    RDatasetsSeries,
    StandardScaler,
    WindowDataset,
    read_csv_series,
    split_borders,
)
from moezoo.tasks.timeseries.forecasting import BestValWeights, ForecastingTask, plot_forecasts
from moezoo.tasks.timeseries.pretrain import TSFMPretrainDataModule, TSFMPretrainTask, build_mixture, load_mixture

__all__ = [
    "BestValWeights",
    "CSVForecastDataModule",
    "ElecDemandDataModule",
    "ForecastDataModule",
    "ForecastingTask",
    "RDATASETS_SERIES",
    "RDatasetsForecastDataModule",
    "RDatasetsSeries",
    "StandardScaler",
    "TSFMPretrainDataModule",
    "TSFMPretrainTask",
    "WindowDataset",
    "build_mixture",
    "load_mixture",
    "plot_forecasts",
    "read_csv_series",
    "split_borders",
]
