"""``moezoo bench timeseries``: ETTh1 long-term forecasting, dense vs token-wise MoE vs Seg-MoE (``moe_patchtst``)
beside the field's simple baselines, run as ``moezoo fit`` of ``configs/bench/timeseries/etth1_<variant>.yaml`` for
each horizon.

MoE rows (all ``moe_patchtst_tiny``, active FFN width 128): the dense twin, token-wise MoE (segment size 1) and
Seg-MoE (segments of [3, 5, 5] patches): every 4th training window, batch 64, at most 10 epochs with early stopping
after 3, the best validation-MSE checkpoint tested on every test window.
Baseline rows (router ``baseline`` in the tables; the models and recipes of ``configs/timeseries/etth1_<model>_336_96
.yaml`` on the same windows): last value and seasonal naive (period 24; no parameters: one epoch without an
optimisation step whatever the budget, no training throughput), NLinear and DLinear (Adam, lr 0.005, batch 32, at
most 10 epochs, patience 3) and PatchTST/42 (its published architecture and optimiser, at most 100 epochs with
patience 20: the costliest row, so not in ``--quick``).
Each (variant, horizon, seed) is one fit; the metric is the test MSE on the normalised scale, averaged over horizons
of the mean over seeds (each horizon's mean and std in ``extra.cells``), with MAE in ``extra``. Routing shares per
channel; inference throughput on 256 test windows. Parameters are those of the shortest horizon (the head grows
with H).

- ``--full``: every variant, horizons 96, 192, 336 and 720, seeds 0, 1 and 2.
- ``--quick``: every variant but PatchTST, horizon 96, seeds 0 and 1, at most 3 epochs of 32, every 4th validation
  window.

``--horizons 96,192`` chooses horizons (settings ``custom``); ``--data.init_args.path`` points at ETTh1.csv
(default ``../shared/data/ett/ETTh1.csv``, relative to where the command runs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from moezoo.tasks.bench.runner import leading_forward, leading_size, test_set_throughput
from moezoo.tasks.bench.schema import BASELINE
from moezoo.tasks.bench.suite import BenchSpec, Budget, Variant
from moezoo.tasks.bench.suite import main as run_main

DOMAIN = "timeseries"
MOE_VARIANTS = (
    Variant("dense", "configs/bench/timeseries/etth1_dense.yaml", "dense"),
    Variant("moe", "configs/bench/timeseries/etth1_moe.yaml", "topk"),
    Variant("segmoe", "configs/bench/timeseries/etth1_segmoe.yaml", "segment"),
)
#: models without parameters: nothing to train, so one epoch (the validation pass) whatever the budget
PARAMETER_FREE = ("last_value", "seasonal_naive")
#: the baselines that cost seconds to minutes per run (in ``--quick``); PatchTST trains for up to 100 epochs
CHEAP_BASELINES = (*PARAMETER_FREE, "nlinear", "dlinear")
BASELINES = (*CHEAP_BASELINES, "patchtst")
BASELINE_VARIANTS = tuple(
    Variant(name, f"configs/bench/timeseries/etth1_{name}.yaml", BASELINE,
            ("--trainer.max_epochs", "1") if name in PARAMETER_FREE else ())
    for name in BASELINES
)  # fmt: skip
VARIANTS = MOE_VARIANTS + BASELINE_VARIANTS
NAMES = tuple(v.name for v in VARIANTS)
QUICK_NAMES = tuple(v.name for v in MOE_VARIANTS) + CHEAP_BASELINES
INFER_WINDOWS = 256


def horizon_overrides(horizon: str) -> tuple[str, ...]:
    """The data's and the model's forecast horizon."""
    return ("--data.init_args.pred_len", horizon)  # the model's pred_len follows the data's


SPEC = BenchSpec(
    domain=DOMAIN,
    description=__doc__ or "",
    dataset="ETTh1, multivariate, look-back 336, test MSE on the normalised scale (mean over horizons of the mean "
    "over seeds); baselines: last value, seasonal naive, NLinear, DLinear, PatchTST/42",
    metric="mse",
    metric_key="test/mse",
    higher_is_better=False,
    throughput_unit="windows/CPU-s",
    variants=VARIANTS,
    quick=Budget(
        seeds=(0, 1),
        variants=QUICK_NAMES,
        overrides=(
            "--trainer.max_epochs",
            "3",
            "--data.init_args.batch_size",
            "32",
            "--data.init_args.val_stride",
            "4",
        ),
        cells=("96",),
    ),
    full=Budget(seeds=(0, 1, 2), variants=NAMES, cells=("96", "192", "336", "720")),
    extra_metrics=("test/mae",),
    infer=test_set_throughput(INFER_WINDOWS, leading_forward, leading_size),
    cell_option="horizons",
    cell_overrides=horizon_overrides,
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
