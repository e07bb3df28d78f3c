"""ProMoE routing for diffusion transformers (Wei et al. 2025): conditional + prototypical routing.

Legend: T tokens, D model dim, E experts (E - 1 prototype experts plus one unconditional expert), P = E - 1
prototypes, N routed pairs, A experts that received at least one token.

1. Conditional routing: tokens of samples whose class label was dropped for classifier-free guidance
   (side input ``cfg_dropped``, a per-sample or per-token bool) all go to the dedicated *unconditional* expert,
   the last one (index E - 1), with gate 1.
2. Prototypical routing for the other tokens: cosine similarity between the token and P learnable prototypes,
   top-1 (or top-k), the similarity itself as the gate.
3. The always-on shared expert is the layer's ``num_shared_experts`` (the ``MoE`` adds it; not in the pairs).
4. Routing contrastive loss: for each prototype ``p_e`` that received tokens, InfoNCE with the (normalised) mean
   of its tokens ``c_e`` as the positive and the other experts' means as negatives:
   ``-mean_e log softmax_j(cos(p_e, c_j) / temperature)[e]``, weighted by ``contrastive_coef``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.layers.routers import (
    RoutingResult,
    Side,
    SparseRouter,
    check_int,
    check_non_negative,
    check_positive,
    check_top_k,
    register_router,
)
from moezoo.ops import count_per_expert, true_indices


def routing_contrastive_loss(
    x_TD: Tensor, prototypes_PD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, temperature: float
) -> Tensor:
    """InfoNCE between each used prototype and the normalised mean of the (normalised) tokens routed to it.

    Computed over all P prototypes with the unused ones masked out (their columns get no probability, their rows
    no weight), which equals the loss over the used ones alone without a data-dependent selection; 0 when no
    token is routed.
    """
    num_protos = prototypes_PD.shape[0]
    xn_ND = F.normalize(x_TD.float(), dim=-1).index_select(0, token_idx_N)
    sums_PD = xn_ND.new_zeros(num_protos, x_TD.shape[-1]).index_add(0, expert_idx_N, xn_ND)
    counts_P = count_per_expert(expert_idx_N, num_protos)
    used_P = counts_P > 0
    centroids_PD = F.normalize(sums_PD / counts_P.clamp_min(1).unsqueeze(-1).float(), dim=-1)
    logits_PP = F.normalize(prototypes_PD.float(), dim=-1) @ centroids_PD.t() / temperature
    logits_PP = logits_PP.masked_fill(~used_P.unsqueeze(0), float("-inf"))
    logits_PP = torch.where(used_P.unsqueeze(-1), logits_PP, 0.0)  # unused rows: finite, then weighted 0
    loss_P = F.cross_entropy(logits_PP, torch.arange(num_protos, device=x_TD.device), reduction="none")
    return torch.where(used_P, loss_P, 0.0).sum() / used_P.sum().clamp_min(1)


class ProMoERouter(SparseRouter):
    """Conditional routing to an unconditional expert, then cosine-prototype top-k routing (ProMoE).

    Args:
        dim: model width D.
        num_experts: E, including the unconditional expert (so E - 1 prototypes); E >= 2.
        top_k: prototype experts per conditional token (ProMoE uses 1).
        temperature: of the routing contrastive loss (InfoNCE), ~0.07.
        contrastive_coef: weight of the contrastive loss (``losses["contrastive"]``).
        balance_coef, z_loss_coef: optional Switch balance / z-loss on the prototype distribution.
    """

    needs_side = ("cfg_dropped",)
    side_feature_dims: ClassVar[Mapping[str, int]] = {"cfg_dropped": 0}

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        temperature: float = 0.07,
        contrastive_coef: float = 0.01,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
    ) -> None:
        ProMoERouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                temperature=temperature,
                contrastive_coef=contrastive_coef,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
            ),
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.temperature = temperature
        self.contrastive_coef = contrastive_coef
        self.uncond_expert = num_experts - 1

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        if num_experts is not None:
            check_int("num_experts", num_experts, 2)  # prototype experts + 1 unconditional
        check_top_k(options["top_k"], None if num_experts is None else num_experts - 1, "num_experts - 1")
        check_positive("temperature", options["temperature"])
        check_non_negative("contrastive_coef", options["contrastive_coef"])

    @property
    def num_logits(self) -> int:
        return self.num_experts - 1  # the rows of ``gate.weight`` are the prototypes

    @property
    def prototypes(self) -> Tensor:
        return self.gate.weight

    def similarity(self, x_TD: Tensor) -> Tensor:
        """Cosine similarity of each token to each prototype, fp32, shape (T, P)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.normalize(x_TD.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).t()

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        num_tokens = x_TD.shape[0]
        device = x_TD.device
        if not side or "cfg_dropped" not in side:
            raise ValueError(
                "ProMoERouter needs the side input 'cfg_dropped' (one bool per sample or per token: True where the "
                f"class label was dropped for classifier-free guidance); got side keys {sorted(side or {})}"
            )
        flag = side["cfg_dropped"]
        if flag.shape != (num_tokens,):
            raise ValueError(
                f"side['cfg_dropped'] must hold one bool per sample or per token, got shape {tuple(flag.shape)} "
                f"for {num_tokens} tokens"
            )
        dropped_T = flag.to(device=device, dtype=torch.bool)
        sim_TP = self.similarity(x_TD)
        cond_C = true_indices(~dropped_T)
        uncond_U = true_indices(dropped_T)
        top_sim_CK, top_idx_CK = sim_TP.index_select(0, cond_C).topk(self.top_k, dim=-1)
        cond_token_N = cond_C.repeat_interleave(self.top_k)
        cond_expert_N = top_idx_CK.reshape(-1)
        token_idx_N = torch.cat([cond_token_N, uncond_U])
        expert_idx_N = torch.cat([cond_expert_N, torch.full_like(uncond_U, self.uncond_expert)])
        gate_N = torch.cat([top_sim_CK.reshape(-1), sim_TP.new_ones(uncond_U.numel())])
        # Routing distribution for statistics: a sharp softmax over prototypes, or one-hot on the uncond expert.
        probs_TE = torch.zeros(num_tokens, self.num_experts, device=device)
        probs_TE[:, : self.num_logits] = torch.softmax(sim_TP.detach() / self.temperature, dim=-1)
        probs_TE[uncond_U] = 0.0
        probs_TE[uncond_U, self.uncond_expert] = 1.0
        losses: dict[str, Tensor] = {}
        if self.contrastive_coef > 0:
            losses["contrastive"] = self.contrastive_coef * routing_contrastive_loss(
                x_TD, self.prototypes, cond_token_N, cond_expert_N, self.temperature
            )
        cond_sim_CP = sim_TP.index_select(0, cond_C)
        cond_probs_CP = torch.softmax(cond_sim_CP / self.temperature, dim=-1)
        losses.update(self.common_losses(cond_sim_CP, cond_probs_CP, cond_expert_N, self.top_k))
        return RoutingResult(token_idx_N, expert_idx_N, gate_N, num_tokens, self.num_experts, probs_TE, losses)


register_router("promoe", ProMoERouter)
