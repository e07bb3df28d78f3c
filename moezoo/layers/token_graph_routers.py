"""Routers that tie a token's expert choice to other tokens or to a fixed assignment: similarity-aware routing
(a graph of tokens) and MaskMoE's routing masks.

Legend: T tokens, D model dim, E experts, K experts per token, N pairs, R similarity dim, B samples, L tokens per
sample (the grid of :data:`~moezoo.layers.routers.SAMPLE_SLOTS`), U hash buckets, P hash bits.

- ``"similarity"`` (:class:`SimilarityRouter`, Nguyen et al. 2025, *Improving Routing in Sparse Mixture of Experts
  with Graph of Tokens*, Similarity-Aware SMoE). Plain softmax gating picks each token's experts independently of the
  other tokens. Here a token first picks a neighbour j of its own sequence with probability
  ``S_ij = softmax_j(<h_i, h_j> / (tau sqrt(R)))`` (the token-similarity graph, self included), then an expert from
  j's gating distribution, so its routing distribution is the mixture ``p~_i = sum_j S_ij softmax(W_g x_j)``; the
  top-k of ``p~_i`` are its experts and the selected ``p~`` its gates (renormalised for K > 1). The similarity
  features ``h`` are the router logits ``W_g x`` (``similarity_dim=None``, no extra parameter) or a trained
  projection ``W_s x`` of ``similarity_dim`` R. Mixing within a sequence makes a token's routing depend on its
  sequence-mates (not on the other samples of the batch): ``train_rule`` and ``eval_rule`` ``"item"`` (the defaults)
  mix within each sample (the layer passes :data:`SAMPLE_SLOTS`), ``"batch"`` over every token of the batch
  (a (T, T) graph: memory grows with the square of the batch's tokens).
  The paper's second variant, Attention-Aware SMoE, mixes with the attention matrix of the block's attention layer
  instead of ``S``; this library's blocks use a fused attention (timm's) that does not return its weights, so it is
  not implemented here.
- ``"maskmoe"`` (:class:`MaskMoERouter`, Su et al. 2024, *MaskMoE: Boosting Token-Level Learning via Routing Mask in
  Mixture-of-Experts*). Each vocabulary token gets, once before training, a fixed random set of visible experts (one
  for infrequent tokens, several for frequent ones); the router's softmax and top-k run over the visible experts
  only, so all occurrences of a rare token train the same expert. Images, audio and series have no vocabulary: the
  key of a token here is a locality-sensitive hash of its router input, the signs of ``P = hash_bits`` fixed random
  projections (a buffer), so that similar inputs share a bucket and its mask; the ``U = 2**P`` buckets each see
  ``num_visible`` random experts (a buffer saved with the model). The vocabulary frequency split has no counterpart
  before training (bucket frequencies are unknown) and every bucket sees the same number of experts.

The method cards are in ``docs/routers.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers.routers import (
    EVAL_RULES,
    SAMPLE_SLOTS,
    RoutingResult,
    Side,
    SparseRouter,
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_top_k,
    flat_pairs,
    register_router,
)


def _renormalise(top_p_TK: Tensor) -> Tensor:
    return top_p_TK / top_p_TK.sum(-1, keepdim=True).clamp_min(1e-20)


def graph_mix(h_TR: Tensor, probs_TE: Tensor, slots_BL: Tensor, scale: float) -> Tensor:
    """``p~_i = sum_j S_ij p_j`` with ``S_ij = softmax_j(scale <h_i, h_j>)`` over the tokens j of i's sample.

    ``slots_BL`` lays the T tokens out by sample (token index, -1 for a masked place); each token appears once.
    Padded places take no weight; a sample without tokens gives finite rows that no token reads, so no NaN reaches
    the gradients.
    """
    num_tokens, num_experts = probs_TE.shape
    valid_BL = slots_BL >= 0
    place_BL = torch.where(valid_BL, slots_BL, num_tokens)  # masked places read an extra zero row
    h_pad = torch.cat([h_TR, h_TR.new_zeros(1, h_TR.shape[1])])
    p_pad = torch.cat([probs_TE, probs_TE.new_zeros(1, num_experts)])
    h_BLR, p_BLE = h_pad[place_BL], p_pad[place_BL]
    scores_BLL = torch.matmul(h_BLR, h_BLR.transpose(1, 2)) * scale
    scores_BLL = scores_BLL.masked_fill(~valid_BL.unsqueeze(1), torch.finfo(scores_BLL.dtype).min)
    mixed_BLE = torch.matmul(torch.softmax(scores_BLL, dim=-1), p_BLE)
    # where each token sits in the grid (masked places all write to the extra entry T, which nobody reads)
    flat_L = place_BL.reshape(-1)
    where_T = torch.zeros(num_tokens + 1, dtype=torch.int64, device=probs_TE.device)
    where_T = where_T.scatter(0, flat_L, torch.arange(flat_L.shape[0], device=probs_TE.device))
    return mixed_BLE.reshape(-1, num_experts).index_select(0, where_T[:num_tokens])


class SimilarityRouter(SparseRouter):
    """Similarity-aware routing (Graph of Tokens): top-k of ``p~ = S softmax(W_g x)`` (see the module docstring).

    Args:
        top_k: K experts per token.
        similarity_dim: R of a trained similarity projection ``W_s`` (``sim_proj``, (R, D)); ``None``: the
            similarity is measured between the router logits (no extra parameter).
        temperature: ``tau`` of the similarity softmax (scores ``<h_i, h_j> / (tau sqrt(R))``).
        normalize: renormalise the K selected ``p~`` to sum to 1 (default for K > 1).
        eval_rule, train_rule: ``"item"`` mixes within each sample, ``"batch"`` over all tokens of the batch.
    Losses: Switch balance on ``p~`` and the pairs, optional z-loss of the logits.
    """

    batch_dependent: ClassVar[bool] = True  # mixes over a sample's tokens, or the batch's with a "batch" rule

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        similarity_dim: int | None = None,
        temperature: float = 1.0,
        normalize: bool | None = None,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        eval_rule: str = "item",
        train_rule: str = "item",
    ) -> None:
        SimilarityRouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                similarity_dim=similarity_dim,
                temperature=temperature,
                normalize=normalize,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
                eval_rule=eval_rule,
                train_rule=train_rule,
            ),
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.similarity_dim = similarity_dim
        self.temperature = temperature
        self.normalize = top_k > 1 if normalize is None else normalize
        self.eval_rule = eval_rule
        self.train_rule = train_rule
        self.sim_proj: nn.Linear | None = None
        if similarity_dim is not None:
            self.sim_proj = nn.Linear(dim, similarity_dim, bias=False)
            nn.init.normal_(self.sim_proj.weight, std=dim**-0.5)

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        if options["similarity_dim"] is not None:
            check_int("similarity_dim", options["similarity_dim"], 1)
        check_positive("temperature", options["temperature"])
        check_bool("normalize", options["normalize"], allow_none=True)
        check_choice("eval_rule", options["eval_rule"], EVAL_RULES)
        check_choice("train_rule", options["train_rule"], EVAL_RULES)

    def depends_on_batch(self, training: bool) -> bool:
        return (self.train_rule if training else self.eval_rule) == "batch"

    def similarity_features(self, x_TD: Tensor, logits_TE: Tensor) -> Tensor:
        """``h`` (T, R): the logits, or the trained projection ``W_s x``."""
        if self.sim_proj is None:
            return logits_TE
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.sim_proj.weight.float())

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        num_tokens = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        h_TR = self.similarity_features(x_TD, logits_TE)
        slots_BL = side.get(SAMPLE_SLOTS) if side and not self.depends_on_batch(self.training) else None
        if slots_BL is None:  # every token is one sample's (the batch rule, or called without the layer)
            slots_BL = torch.arange(num_tokens, device=x_TD.device).unsqueeze(0)
        scale = 1.0 / (self.temperature * math.sqrt(h_TR.shape[1]))
        mixed_TE = graph_mix(h_TR, probs_TE, slots_BL, scale)
        top_p_TK, top_idx_TK = mixed_TE.topk(self.top_k, dim=-1)
        if self.normalize:
            top_p_TK = _renormalise(top_p_TK)
        losses = self.common_losses(logits_TE, mixed_TE, top_idx_TK.reshape(-1), self.top_k)
        token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, top_p_TK)
        return RoutingResult(token_idx_N, expert_idx_N, gate_N, num_tokens, self.num_experts, mixed_TE.detach(), losses)


class MaskMoERouter(SparseRouter):
    """MaskMoE with hashed keys: softmax top-k over the experts visible to the token's bucket (module docstring).

    Args:
        top_k: K experts per token (at most ``num_visible``).
        num_visible: V experts visible to each bucket; ``None``: ``max(top_k, num_experts // 2)``.
        hash_bits: P, the bucket of a token is the sign pattern of P fixed random projections (U = 2**P buckets).
        normalize: renormalise the K selected probabilities to sum to 1 (default for K > 1).
    Buffers (fixed at construction by the global RNG, saved in the state dict): ``hash_planes`` (P, D) and
    ``visible`` (U, E) bool. Losses: Switch balance on the masked softmax, optional z-loss of the logits.
    """

    batch_dependent: ClassVar[bool] = False
    hash_planes: Tensor
    visible: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        num_visible: int | None = None,
        hash_bits: int = 6,
        normalize: bool | None = None,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        MaskMoERouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                num_visible=num_visible,
                hash_bits=hash_bits,
                normalize=normalize,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
            ),
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.num_visible = max(top_k, num_experts // 2) if num_visible is None else num_visible
        self.hash_bits = hash_bits
        self.normalize = top_k > 1 if normalize is None else normalize
        self.register_buffer("hash_planes", torch.randn(hash_bits, dim))
        order_UE = torch.rand(2**hash_bits, num_experts).argsort(dim=-1)
        visible = torch.zeros(2**hash_bits, num_experts, dtype=torch.bool)
        self.register_buffer("visible", visible.scatter_(-1, order_UE[:, : self.num_visible], True))

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_int("hash_bits", options["hash_bits"], 0)
        if options["hash_bits"] > 16:
            raise ValueError(f"hash_bits must be an integer in [0, 16], got {options['hash_bits']!r}")
        visible = options["num_visible"]
        if visible is not None:
            check_int("num_visible", visible, 1)
            if visible < options["top_k"] or (num_experts is not None and visible > num_experts):
                upper = "num_experts" if num_experts is None else f"num_experts={num_experts}"
                raise ValueError(
                    f"num_visible must be an integer in [top_k={options['top_k']}, {upper}], got {visible!r}"
                )
        check_bool("normalize", options["normalize"], allow_none=True)

    def bucket(self, x_TD: Tensor) -> Tensor:
        """``(T,)`` int64 in [0, U): bit b is set when the token's projection on ``hash_planes[b]`` is positive."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            bits_TP = F.linear(x_TD.detach().float(), self.hash_planes.float()) > 0
        weights_P = 2 ** torch.arange(self.hash_bits, device=x_TD.device)
        return (bits_TP.long() * weights_P).sum(-1)

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        visible_TE = self.visible[self.bucket(x_TD)]
        masked_TE = logits_TE.masked_fill(~visible_TE, float("-inf"))
        probs_TE = torch.softmax(masked_TE, dim=-1)
        # select on the masked logits: a visible expert whose probability underflows still beats every hidden one
        top_idx_TK = masked_TE.detach().topk(self.top_k, dim=-1).indices
        top_p_TK = probs_TE.gather(-1, top_idx_TK)
        if self.normalize:
            top_p_TK = _renormalise(top_p_TK)
        losses = self.common_losses(logits_TE, probs_TE, top_idx_TK.reshape(-1), self.top_k)
        token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, top_p_TK)
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )


TOKEN_GRAPH_ROUTERS: dict[str, type[SparseRouter]] = {
    "similarity": SimilarityRouter,
    "maskmoe": MaskMoERouter,
}

for _name, _cls in TOKEN_GRAPH_ROUTERS.items():
    register_router(_name, _cls)
