"""The papers a release cites: by its model family and by its router (``moezoo zoo release`` adds them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Papers the methods come from, added to a release's citations by its family and router.
FAMILY_CITATIONS = {
    "moe_vit": [
        "Riquelme et al., Scaling Vision with Sparse Mixture of Experts (V-MoE), NeurIPS 2021, arXiv:2106.05974",
        "Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale, ICLR 2021, "
        "arXiv:2010.11929",
    ],
    "moe_conformer": [
        "Gulati et al., Conformer: Convolution-augmented Transformer for Speech Recognition, Interspeech 2020, "
        "arXiv:2005.08100",
        "Graves et al., Connectionist Temporal Classification: Labelling Unsegmented Sequence Data with Recurrent "
        "Neural Networks, ICML 2006",
    ],
    "moe_patchtst": [
        "Nie et al., A Time Series is Worth 64 Words: Long-term Forecasting with Transformers (PatchTST), ICLR 2023, "
        "arXiv:2211.14730",
        "Kim et al., Reversible Instance Normalization for Accurate Time-Series Forecasting against Distribution "
        "Shift (RevIN), ICLR 2022",
    ],
    "moe_tsfm": [
        "Shi et al., Time-MoE: Billion-Scale Time Series Foundation Models with Mixture of Experts, ICLR 2025, "
        "arXiv:2409.16040",
        "Liu et al., Moirai-MoE: Empowering Time Series Foundation Models with Sparse Mixture of Experts, "
        "arXiv:2410.10469",
        "Das et al., A decoder-only foundation model for time-series forecasting (TimesFM), ICML 2024, "
        "arXiv:2310.10688",
        "Nie et al., A Time Series is Worth 64 Words: Long-term Forecasting with Transformers (PatchTST), ICLR 2023, "
        "arXiv:2211.14730",
        "Kim et al., Reversible Instance Normalization for Accurate Time-Series Forecasting against Distribution "
        "Shift (RevIN), ICLR 2022",
        "Su et al., RoFormer: Enhanced Transformer with Rotary Position Embedding, arXiv:2104.09864",
        "Hyndman and Koehler, Another look at measures of forecast accuracy (MASE), IJF 2006",
    ],
    "moe_dit": ["Peebles and Xie, Scalable Diffusion Models with Transformers (DiT), ICCV 2023, arXiv:2212.09748"],
    "moe_yolo": [
        "Redmon et al., You Only Look Once: Unified, Real-Time Object Detection, CVPR 2016",
        "Li et al., Generalized Focal Loss (distribution focal loss), NeurIPS 2020, arXiv:2006.04388",
        "Feng et al., TOOD: Task-aligned One-stage Object Detection, ICCV 2021, arXiv:2108.07755",
        "Meiraz, Shalev and Weizman, YOLO Meets Mixture-of-Experts: Adaptive Expert Routing for Robust Object "
        "Detection, 2025, arXiv:2511.13344",
    ],
}
ROUTER_CITATIONS = {
    "topk": [
        "Shazeer et al., Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer, ICLR 2017, "
        "arXiv:1701.06538",
        "Lepikhin et al., GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding, ICLR 2021, "
        "arXiv:2006.16668",
        "Fedus et al., Switch Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity, "
        "JMLR 2022, arXiv:2101.03961",
    ],
    "expert_choice": ["Zhou et al., Mixture-of-Experts with Expert Choice Routing, NeurIPS 2022, arXiv:2202.09368"],
    "sinkhorn": [
        "Lewis et al., BASE Layers: Simplifying Training of Large, Sparse Models, ICML 2021, arXiv:2103.16716",
        "Clark et al., Unified Scaling Laws for Routed Language Models, ICML 2022, arXiv:2202.01169",
    ],
    "relu": [
        "Wang et al., ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing, ICLR 2025, arXiv:2412.14711"
    ],
    "sigmoid_lossfree": [
        "Wang et al., Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts, arXiv:2408.15664 (2024)",
        "DeepSeek-AI, DeepSeek-V3 Technical Report, arXiv:2412.19437 (2024)",
    ],
    "soft": ["Puigcerver et al., From Sparse to Soft Mixtures of Experts, ICLR 2024, arXiv:2308.00951"],
    "omni": ["Gu et al., Omni-Router: sharing one router across the MoE layers of a speech recogniser, 2025"],
    "language": [
        "Wang et al., Language-Routing Mixture of Experts for Multilingual and Code-Switching Speech Recognition "
        "(LR-MoE), Interspeech 2023"
    ],
    "global_embedding": ["You et al., SpeechMoE2: Mixture-of-Experts Model with Improved Routing, ICASSP 2022"],
    "segment": ["Ortigossa and Segal, Seg-MoE: segment-wise routing for time-series forecasting, 2026"],
    "promoe": ["Wei et al., ProMoE: prototypical routing for diffusion transformers, 2025"],
}


def citations_for(model_name: str, router: Any, has_moe_layers: bool, extra: Sequence[str] = ()) -> list[str]:
    """The citations of a release of ``model_name`` (``<family>_<size>``): its family's papers, its router's when
    the model has core MoE layers (YOLO-MoE's whole-model blending has none), then ``extra`` ones not yet listed."""
    citations = list(FAMILY_CITATIONS.get(model_name.rsplit("_", 1)[0], []))
    if has_moe_layers:
        citations += ROUTER_CITATIONS.get(router if isinstance(router, str) else "", [])
    citations += [c for c in extra if c not in citations]
    return citations
