"""MoE surgery: upcycle dense models into MoEs, and prune or merge the experts of an MoE.

- :func:`upcycle` finds the FFN blocks of any ``nn.Module`` (moezoo, timm, torchaudio, ``nn.Sequential`` runs, a
  predicate or named modules) and replaces them by ``moezoo.MoE`` layers whose experts copy the dense weights;
- :func:`calibrate` collects per-expert routing statistics over a data loader (frequency, REAP's router-weighted
  output norm, co-activation);
- :func:`prune_experts` drops experts by REAP or frequency; :func:`merge_experts` merges groups of experts.
"""

from moezoo.surgery.calibrate import ExpertStats, calibrate
from moezoo.surgery.dense import DenseFFN, is_ffn, read_ffn
from moezoo.surgery.prune import SurgeryReport, merge_experts, prune_experts
from moezoo.surgery.upcycle import (
    UpcycledMoE,
    UpcycleReport,
    find_ffns,
    load_dense_weights,
    moe_layers,
    upcycle,
    upcycle_from,
    upcycled_aux,
)

__all__ = [
    "DenseFFN",
    "ExpertStats",
    "SurgeryReport",
    "UpcycleReport",
    "UpcycledMoE",
    "calibrate",
    "find_ffns",
    "is_ffn",
    "load_dense_weights",
    "merge_experts",
    "moe_layers",
    "prune_experts",
    "read_ffn",
    "upcycle",
    "upcycle_from",
    "upcycled_aux",
]
