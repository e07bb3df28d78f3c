"""``moezoo bench vision``: the ViT router study on Fashion-MNIST, run as ``moezoo fit`` of its configs.

Rows (``configs/vision/fmnist_vit_<router>.yaml``, equal active compute per token): top-k token choice, V-MoE
batch-prioritized routing, expert choice, Sinkhorn, sigmoid with loss-free balancing, Soft MoE and the dense twin.
The routers of ``moezoo.layers.routers_extra`` and ``moezoo.layers.expert_routers`` (``EXTRA_ROUTERS``: top-p,
X-MoE, M6-T prototypes, HyperRouter, attention router, mixture of routers, GMM, Expert Race, VQ, StableMoE, GW-MoE,
SMILE bi-level, Rectify fill-in, THOR, MoEC, Autonomy-of-Experts, top-k with the ERC loss, CompeteSMoE, SMEAR), the
layerwise recurrent router (``moezoo.layers.recurrent``), the Graph-of-Tokens (similarity- and attention-aware) and
MaskMoE routers (``moezoo.layers.token_graph_routers``), ReLU routing (ReMoE) and the Omni-router (one router shared
by both MoE blocks) have configs of their
own and join the study by name, e.g. ``--variants topk,xmoe,top_p``; they are not in the default budgets (each row
is CPU hours at ``--full``). All run at top-2's active compute except SMEAR (one merged expert: half of it, with
the same parameters) and ReLU routing (a varying number of experts per token, steered to 2 on average).
The registered routers that are not rows (Seg-MoE, ProMoE, LR-MoE's language router, SpeechMoE2's global-embedding
router) are in ``NOT_IN_STUDY`` with the reason, which ``--variants <name>`` prints.
The MoE layer options (``EXTRA_LAYERS``: Chain-of-Experts, S2MoE, CartesianMoE) join the same way, at top-2's active
compute; S2MoE trains with a clean and a noisy pass (2 x top-2's expert compute) and evaluates with one.
Metric: test accuracy (10,000 test images; quick: the first 1,024), with training throughput, inference
throughput (512 test images), expert-load CV and dropped fraction on the test split, and routing shares per
class. The DiT generation table is ``moezoo bench generation``.

- ``--full``: the configs as they are (8 epochs of 128, the best validation-accuracy checkpoint tested),
  seeds 0 and 1: ``moezoo fit --config configs/vision/fmnist_vit_<router>.yaml --seed_everything <seed>``.
- ``--quick``: 100 steps of 64, no validation, the final weights tested on 1,024 images, seeds 0 and 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from moezoo.tasks.bench.runner import leading_forward, leading_size, test_set_throughput
from moezoo.tasks.bench.suite import BenchSpec, Budget, Variant
from moezoo.tasks.bench.suite import main as run_main

DOMAIN = "vision"
ROUTERS = ("topk", "bpr", "expert_choice", "sinkhorn", "sigmoid_lossfree", "soft", "dense")
EXTRA_ROUTERS: tuple[str, ...] = (
    "top_p",
    "xmoe",
    "prototype",
    "hyper",
    "attention",
    "mixture_of_routers",
    "gmm",
    "expert_race",
    "vq",
    "stablemoe",
    "gw",
    "bilevel",
    "rectify",
    "thor",
    "moec",
    "aoe",
    "erc",
    "compete",
    "smear",
    "recurrent",
)
# Layer options that are not routers (the router is top-k): Chain-of-Experts, 2 passes of top-1 (moe.num_iterations);
# S2MoE (moe.layer: s2moe: clean + noisy pass in training, one pass at evaluation) and CartesianMoE (moe.layer:
# cartesian: two top-2 sub-layers of half-width experts)
EXTRA_LAYERS = ("chain", "s2moe", "cartesian")
# the similarity- and attention-aware (Graph of Tokens) and MaskMoE routers of moezoo.layers.token_graph_routers
EXTRA_ROUTERS += ("similarity", "attention_graph", "maskmoe")
# ReLU routing (ReMoE: top-2's compute on average, not per token) and the Omni-router (one top-2 router shared by
# both MoE blocks)
EXTRA_ROUTERS += ("relu", "omni")
# The registered routers (moezoo.layers.ROUTERS) that are *not* rows of this study, and why (docs/routers.md, "The
# vision router study"). Rows are listed by hand above, each with its config; every registered router is either a
# row or here (tests/vision/test_router_study.py checks both), and `--variants <name>` names the reason.
NOT_IN_STUDY: dict[str, str] = {
    "segment": "Seg-MoE at segment size 1 is token-wise top-k (the topk row); larger segments would run across the "
    "class token and the rows of patches, with w times the expert parameters",
    "promoe": "it needs the DiT's classifier-free-guidance side input cfg_dropped (moezoo bench generation)",
    "language": "it needs the Conformer's language posteriors lid_probs (speech only)",
    "global_embedding": "it needs the Conformer's utterance embedding global_embedding (speech only)",
}
VARIANTS = tuple(Variant(r, f"configs/vision/fmnist_vit_{r}.yaml", r) for r in ROUTERS + EXTRA_ROUTERS + EXTRA_LAYERS)
INFER_IMAGES = 512


SPEC = BenchSpec(
    domain=DOMAIN,
    description=__doc__ or "",
    dataset="Fashion-MNIST (IDX files), 28x28, 10 classes; test accuracy on the test split",
    metric="acc",
    metric_key="test/acc",
    higher_is_better=True,
    throughput_unit="images/CPU-s",
    variants=VARIANTS,
    quick=Budget(
        seeds=(0, 1),
        variants=ROUTERS,
        overrides=(
            "--trainer.max_steps",
            "100",
            "--trainer.max_epochs",
            "-1",
            "--data.init_args.batch_size",
            "64",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.limit_test_batches",
            "16",
        ),
    ),  # fmt: skip
    full=Budget(seeds=(0, 1), variants=ROUTERS),
    infer=test_set_throughput(INFER_IMAGES, leading_forward, leading_size),
    not_variants=tuple(NOT_IN_STUDY.items()),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
