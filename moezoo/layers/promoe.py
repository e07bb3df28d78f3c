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

import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.layers.routers import Router, RoutingResult, Side, _check_positive, _check_top_k, register_router


def routing_contrastive_loss(
    x_TD: Tensor, prototypes_PD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, temperature: float
) -> Tensor:
    """InfoNCE between each used prototype and the normalised mean of the (normalised) tokens routed to it."""
    num_protos = prototypes_PD.shape[0]
    if token_idx_N.numel() == 0:
        return prototypes_PD.sum() * 0.0
    xn_ND = F.normalize(x_TD.float(), dim=-1).index_select(0, token_idx_N)
    sums_PD = xn_ND.new_zeros(num_protos, x_TD.shape[-1]).index_add(0, expert_idx_N, xn_ND)
    counts_P = torch.bincount(expert_idx_N, minlength=num_protos)
    used_A = (counts_P > 0).nonzero().squeeze(-1)
    centroids_AD = F.normalize(sums_PD.index_select(0, used_A) / counts_P[used_A, None].float(), dim=-1)
    protos_AD = F.normalize(prototypes_PD.float().index_select(0, used_A), dim=-1)
    logits_AA = protos_AD @ centroids_AD.t() / temperature
    target_A = torch.arange(used_A.numel(), device=x_TD.device)
    return F.cross_entropy(logits_AA, target_A)


class ProMoERouter(Router):
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
        if not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(
                f"num_experts must be an integer >= 2 for ProMoE (prototype experts + 1 unconditional), "
                f"got {num_experts!r}"
            )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        _check_top_k(top_k, num_experts - 1)
        _check_positive("temperature", temperature)
        if contrastive_coef < 0:
            raise ValueError(f"contrastive_coef must be >= 0, got {contrastive_coef}")
        self.top_k = top_k
        self.temperature = temperature
        self.contrastive_coef = contrastive_coef
        self.uncond_expert = num_experts - 1

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
        dropped_T = torch.zeros(num_tokens, dtype=torch.bool, device=device)
        if side and "cfg_dropped" in side:
            flag = side["cfg_dropped"]
            if flag.shape != (num_tokens,):
                raise ValueError(
                    f"side['cfg_dropped'] must hold one bool per sample or per token, got shape {tuple(flag.shape)} "
                    f"for {num_tokens} tokens"
                )
            dropped_T = flag.to(device=device, dtype=torch.bool)
        sim_TP = self.similarity(x_TD)
        cond_C = (~dropped_T).nonzero().squeeze(-1)
        uncond_U = dropped_T.nonzero().squeeze(-1)
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
        if cond_C.numel():
            cond_probs = torch.softmax(sim_TP.index_select(0, cond_C) / self.temperature, dim=-1)
            losses.update(self.common_losses(sim_TP.index_select(0, cond_C), cond_probs, cond_expert_N, self.top_k))
        return RoutingResult(token_idx_N, expert_idx_N, gate_N, num_tokens, self.num_experts, probs_TE, losses)


register_router("promoe", ProMoERouter)
