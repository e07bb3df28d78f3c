"""Routers from speech MoE papers: a router shared by every layer (Omni-router), a language router driven by
language-ID posteriors (LR-MoE) and a router that also sees a global utterance embedding (SpeechMoE2).

Legend: T tokens (frames), D model dim, E experts, K experts per token, N routed pairs, G global-embedding dim,
L MoE layers.

- ``"omni"`` (:class:`OmniRouter`): Switch top-1 whose *one instance* is passed to every MoE layer of a model
  (Gu et al. 2025, Omni-Router). Its weights are shared; each layer applies it to its own hidden states, and the
  statistics (load, balance loss) stay per layer because each layer gets its own :class:`RoutingResult`.
- ``"language"`` (:class:`LanguageRouter`): experts are languages. The model computes frame-level language
  posteriors once (an LID head trained with a language-ID loss, LR-MoE, Wang et al. 2023) and passes them as the
  per-token side input ``lid_probs``; every MoE layer routes each frame to its top-k languages with the
  posteriors as gates. It owns no weights: the LID head is the shared pre-router.
- ``"global_embedding"`` (:class:`GlobalEmbeddingRouter`): softmax top-k over ``W [x_t; g]`` where ``g`` is a
  per-utterance embedding given as the per-sample side input ``global_embedding`` (SpeechMoE2, You et al. 2022).

:func:`cross_layer_agreement` measures how often consecutive MoE layers send a frame to the same expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from moezoo.layers.routers import (
    RoutingResult,
    Side,
    SparseRouter,
    TopKRouter,
    check_bool,
    check_int,
    check_top_k,
    flat_pairs,
    register_router,
)


class OmniRouter(TopKRouter):
    """Switch-style top-1 router meant to be built once and shared by all MoE layers (Omni-Router).

    Same arguments as :class:`TopKRouter` (``top_k`` defaults to 1). Sharing is done by passing the instance as
    ``router=`` to every :class:`~moezoo.layers.MoE`; :meth:`update_state` is then applied once per step.
    """

    shared_across_layers: ClassVar[bool] = True  # models build one instance and pass it to every MoE layer

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, balance_coef: float = 0.01, **kwargs: object):
        super().__init__(dim, num_experts, top_k=top_k, balance_coef=balance_coef, **kwargs)  # type: ignore[arg-type]


class LanguageRouter(SparseRouter):
    """LR-MoE: route each frame to its top-k languages by the LID posteriors in ``side["lid_probs"]`` (T, E).

    Gates are the selected posteriors (renormalised when ``top_k > 1``), so the ASR loss also trains the LID
    head. No weights and no balance loss: languages are unbalanced on purpose.
    """

    needs_side: ClassVar[tuple[str, ...]] = ("lid_probs",)
    side_feature_dims: ClassVar[Mapping[str, int]] = {"lid_probs": 1}
    shared_across_layers: ClassVar[bool] = True  # one (weightless) instance: the LID head is the shared pre-router

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, normalize: bool | None = None) -> None:
        LanguageRouter.check_options(num_experts, dict(top_k=top_k, normalize=normalize))
        super().__init__(dim, num_experts, balance_coef=0.0, z_loss_coef=0.0)
        del self.gate  # the LID head of the model is the (shared) router
        self.top_k = top_k
        self.normalize = top_k > 1 if normalize is None else normalize

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_bool("normalize", options["normalize"], allow_none=True)

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        if not side or "lid_probs" not in side:
            raise ValueError(
                "LanguageRouter needs the per-token side input 'lid_probs' (language posteriors, shape (..., E)); "
                f"got side keys {sorted(side or {})}"
            )
        probs_TE = side["lid_probs"].float()
        if probs_TE.shape != (x_TD.shape[0], self.num_experts):
            raise ValueError(
                f"lid_probs must have shape (tokens={x_TD.shape[0]}, num_experts={self.num_experts}) after expansion, "
                f"got {tuple(probs_TE.shape)}"
            )
        top_p_TK, top_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize:
            top_p_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, top_p_TK)
        return RoutingResult(token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach())


class GlobalEmbeddingRouter(TopKRouter):
    """SpeechMoE2: top-k softmax routing on the frame concatenated with a global utterance embedding.

    Args:
        dim: model width D (the frames).
        num_experts: E.
        embed_dim: G, width of ``side["global_embedding"]`` (per sample ``(B, G)`` or per token).
        top_k, balance_coef, ...: as in :class:`TopKRouter` (``top_k`` defaults to 1).
    """

    needs_side: ClassVar[tuple[str, ...]] = ("global_embedding",)
    side_feature_dims: ClassVar[Mapping[str, int]] = {"global_embedding": 1}

    def __init__(
        self, dim: int, num_experts: int, embed_dim: int = 32, top_k: int = 1, balance_coef: float = 0.01, **kwargs
    ) -> None:
        check_int("embed_dim", embed_dim, 1)
        check_int("dim", dim, 1)
        super().__init__(dim + embed_dim, num_experts, top_k=top_k, balance_coef=balance_coef, **kwargs)
        self.dim = dim
        self.embed_dim = embed_dim

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_int("embed_dim", options["embed_dim"], 1)

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        if not side or "global_embedding" not in side:
            raise ValueError(
                "GlobalEmbeddingRouter needs the side input 'global_embedding' (per sample (B, G) or per token); "
                f"got side keys {sorted(side or {})}"
            )
        g_TG = side["global_embedding"]
        if g_TG.shape != (x_TD.shape[0], self.embed_dim):
            raise ValueError(
                f"global_embedding must have shape (tokens={x_TD.shape[0]}, embed_dim={self.embed_dim}) after "
                f"expansion, got {tuple(g_TG.shape)}"
            )
        return super().forward(torch.cat([x_TD, g_TG.to(x_TD.dtype)], dim=-1))


register_router("omni", OmniRouter)
register_router("language", LanguageRouter)
register_router("global_embedding", GlobalEmbeddingRouter)


def top1_assignment(routing: RoutingResult) -> Tensor:
    """Per token, the expert of its highest-gate pair, or -1 for a token routed nowhere. Shape (T,)."""
    expert_T = torch.full((routing.num_tokens,), -1, dtype=torch.long, device=routing.expert_idx_N.device)
    if routing.token_idx_N.numel() == 0:
        return expert_T
    gate_N = routing.gate_N.detach().float()
    order = torch.argsort(gate_N, stable=True)  # ascending: the last write per token is its largest gate
    expert_T[routing.token_idx_N[order]] = routing.expert_idx_N[order]
    return expert_T


def _matched_agreement(a_T: Tensor, b_T: Tensor, num_experts: int) -> float:
    """Agreement after relabelling b's experts by the best one-to-one matching (Hungarian) with a's."""
    from scipy.optimize import linear_sum_assignment

    valid = (a_T >= 0) & (b_T >= 0)
    if not bool(valid.any()):
        return float("nan")
    joint_EE = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    joint_EE.index_put_((a_T[valid].cpu(), b_T[valid].cpu()), torch.ones(int(valid.sum()), dtype=torch.float64), True)
    rows, cols = linear_sum_assignment(joint_EE.numpy(), maximize=True)
    return float(joint_EE[rows, cols].sum() / a_T.numel())


def cross_layer_agreement(routings: Sequence[RoutingResult], matched: bool = False) -> float:
    """Mean over consecutive MoE layers of the fraction of tokens sent to the same top-1 expert.

    All layers must route the same tokens (same T). ``matched=True`` first relabels each layer's experts by the
    best one-to-one matching with the previous layer's, which removes the arbitrary expert numbering of
    independent per-layer routers. ``nan`` with fewer than two layers.
    """
    if len(routings) < 2:
        return float("nan")
    assignments = [top1_assignment(r) for r in routings]
    sizes = {a.numel() for a in assignments}
    if len(sizes) != 1:
        raise ValueError(f"every layer must route the same tokens; got token counts {sorted(sizes)}")
    if sizes == {0}:
        return float("nan")
    scores = []
    for prev, cur, routing in zip(assignments[:-1], assignments[1:], routings[1:]):
        if matched:
            scores.append(_matched_agreement(prev, cur, routing.num_experts))
        else:
            scores.append(float(((prev == cur) & (prev >= 0)).float().mean()))
    return sum(scores) / len(scores)
