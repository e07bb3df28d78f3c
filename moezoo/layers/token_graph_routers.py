"""Routers that tie a token's expert choice to other tokens or to a fixed assignment: similarity-aware and
attention-aware routing (graphs of tokens) and MaskMoE's routing masks.

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
- ``"attention_graph"`` (:class:`AttentionGraphRouter`, the same paper's Attention-Aware SMoE). The graph of tokens
  is the attention matrix of the attention layer of the same block, the one right before the MoE feed-forward:
  ``p~_i = sum_j A_ij softmax(W_g x_j)`` over the tokens j of i's sample, top-k of ``p~_i`` and the selected ``p~``
  as gates (renormalised for K > 1), as above. Our reading: ``A`` is that layer's softmax(Q K^T / sqrt(d_head))
  *averaged over its heads* (one graph per block; the paper writes a single-head attention matrix), before the
  attention dropout, and it carries gradients (the routing trains the attention's query and key projections too).
  The model passes ``A`` as the side input :data:`~moezoo.layers.routers.ATTENTION_PROBS`, ``(B, L, L)``: a block
  whose MoE router needs it computes its attention explicitly from the attention module's own projections
  (``moezoo.models.blocks.attention_and_probs``, the fused output to fp32 rounding) and every other block keeps
  the fused kernel; ``moe_vit`` and ``moe_patchtst`` do, the other families refuse the router. Tokens that the
  MoE layer masks take no weight and each row is renormalised over the sample's kept tokens (a no-op without a
  mask: attention rows sum to 1); ViT's class token is routed and attended like any other token. The router
  mixes within each sample only (the layer passes :data:`SAMPLE_SLOTS`): it is batch-independent in training and
  at evaluation, and it has no parameter besides the gate.
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
    ATTENTION_PROBS,
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


def _grid(slots_BL: Tensor, num_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(valid_BL, place_BL, where_T)`` of a sample grid: which places hold a token, the token at each place (T, an
    extra zero row, at masked places) and the flat place of each token."""
    valid_BL = slots_BL >= 0
    place_BL = torch.where(valid_BL, slots_BL, num_tokens)  # masked places read an extra zero row
    # where each token sits in the grid (masked places all write to the extra entry T, which nobody reads)
    flat_L = place_BL.reshape(-1)
    where_T = torch.zeros(num_tokens + 1, dtype=torch.int64, device=slots_BL.device)
    where_T = where_T.scatter(0, flat_L, torch.arange(flat_L.shape[0], device=slots_BL.device))
    return valid_BL, place_BL, where_T[:num_tokens]


def _pad_rows(rows_TX: Tensor) -> Tensor:
    return torch.cat([rows_TX, rows_TX.new_zeros(1, rows_TX.shape[1])])


def _mixed_routing(router: Any, logits_TE: Tensor, mixed_TE: Tensor, num_tokens: int) -> RoutingResult:
    """Top-k of a token-graph router's mixed distribution ``p~``, its selected values the gates (renormalised when
    ``router.normalize``), and the router's common losses on ``p~`` and the pairs."""
    top_p_TK, top_idx_TK = mixed_TE.topk(router.top_k, dim=-1)
    if router.normalize:
        top_p_TK = _renormalise(top_p_TK)
    losses = router.common_losses(logits_TE, mixed_TE, top_idx_TK.reshape(-1), router.top_k)
    token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, top_p_TK)
    return RoutingResult(token_idx_N, expert_idx_N, gate_N, num_tokens, router.num_experts, mixed_TE.detach(), losses)


def graph_mix(h_TR: Tensor, probs_TE: Tensor, slots_BL: Tensor, scale: float) -> Tensor:
    """``p~_i = sum_j S_ij p_j`` with ``S_ij = softmax_j(scale <h_i, h_j>)`` over the tokens j of i's sample.

    ``slots_BL`` lays the T tokens out by sample (token index, -1 for a masked place); each token appears once.
    Padded places take no weight; a sample without tokens gives finite rows that no token reads, so no NaN reaches
    the gradients.
    """
    num_tokens, num_experts = probs_TE.shape
    valid_BL, place_BL, where_T = _grid(slots_BL, num_tokens)
    h_BLR, p_BLE = _pad_rows(h_TR)[place_BL], _pad_rows(probs_TE)[place_BL]
    scores_BLL = torch.matmul(h_BLR, h_BLR.transpose(1, 2)) * scale
    scores_BLL = scores_BLL.masked_fill(~valid_BL.unsqueeze(1), torch.finfo(scores_BLL.dtype).min)
    mixed_BLE = torch.matmul(torch.softmax(scores_BLL, dim=-1), p_BLE)
    return mixed_BLE.reshape(-1, num_experts).index_select(0, where_T)


def attention_mix(attn_TL: Tensor, probs_TE: Tensor, slots_BL: Tensor) -> Tensor:
    """``p~_i = sum_j A_ij p_j / sum_j A_ij`` over the kept tokens j of i's sample.

    ``attn_TL`` holds each token's attention row over the L places of its sample's grid ``slots_BL`` (as for
    :func:`graph_mix`); places of masked tokens take no weight, and a row whose kept weights sum to 0 mixes to 0.
    """
    num_tokens, num_experts = probs_TE.shape
    valid_BL, place_BL, where_T = _grid(slots_BL, num_tokens)
    attn_BLL = _pad_rows(attn_TL)[place_BL] * valid_BL.unsqueeze(1).to(attn_TL.dtype)  # rows: queries, cols: keys
    attn_BLL = attn_BLL / attn_BLL.sum(-1, keepdim=True).clamp_min(torch.finfo(attn_BLL.dtype).tiny)
    mixed_BLE = torch.matmul(attn_BLL, _pad_rows(probs_TE)[place_BL])
    return mixed_BLE.reshape(-1, num_experts).index_select(0, where_T)


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
        return _mixed_routing(self, logits_TE, mixed_TE, num_tokens)


class AttentionGraphRouter(SparseRouter):
    """Attention-aware routing (Graph of Tokens): top-k of ``p~ = A softmax(W_g x)`` with ``A`` the block's attention
    probabilities, averaged over heads (the side input :data:`~moezoo.layers.routers.ATTENTION_PROBS`; see the
    module docstring).

    Args:
        top_k: K experts per token.
        normalize: renormalise the K selected ``p~`` to sum to 1 (default for K > 1).
    Side input: ``attention_probs``, per token ``(..., L)`` with L the width of the layer's sample grid (the model
    passes ``(B, L, L)``); called without the layer's :data:`SAMPLE_SLOTS`, every token is one sample's and L = T.
    Losses: Switch balance on ``p~`` and the pairs, optional z-loss of the logits.
    """

    needs_side: ClassVar[tuple[str, ...]] = (ATTENTION_PROBS,)
    side_feature_dims: ClassVar[Mapping[str, int]] = {ATTENTION_PROBS: 1}
    batch_dependent: ClassVar[bool] = True  # it mixes over a sample's tokens: the layer passes the sample grid ...
    train_rule = "item"  # ... in training as at evaluation, and only within each sample

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        normalize: bool | None = None,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        AttentionGraphRouter.check_options(
            num_experts, dict(top_k=top_k, normalize=normalize, balance_coef=balance_coef, z_loss_coef=z_loss_coef)
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.normalize = top_k > 1 if normalize is None else normalize

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_bool("normalize", options["normalize"], allow_none=True)

    def depends_on_batch(self, training: bool) -> bool:
        return False  # the attention graph never crosses samples

    def _attention(self, side: Side | None, num_tokens: int | torch.SymInt, width: int | torch.SymInt | None) -> Tensor:
        """The attention rows ``(T, width)``, checked; ``width`` None (a batch of no samples) takes any width."""
        attn = side.get(ATTENTION_PROBS) if side else None
        if attn is None:
            raise ValueError(
                f"{type(self).__name__} needs the side input {ATTENTION_PROBS!r}: the attention probabilities of the "
                "block's attention layer, which a model block passes when its router needs them "
                "(moezoo.models.blocks.attend)"
            )
        if attn.dim() != 2 or attn.shape[0] != num_tokens or (width is not None and attn.shape[1] != width):
            places = "L" if width is None else width
            raise ValueError(
                f"side input {ATTENTION_PROBS!r} must hold one row per token over the tokens of its sample, "
                f"shape ({num_tokens}, {places}) here; got {tuple(attn.shape)}"
            )
        if not attn.is_floating_point():
            raise TypeError(f"side input {ATTENTION_PROBS!r} must be a floating-point tensor, got {attn.dtype}")
        if not torch.compiler.is_compiling() and attn.numel() and bool(attn.detach().amin() < 0):
            raise ValueError(f"side input {ATTENTION_PROBS!r} must hold attention probabilities (>= 0)")
        return attn.float()

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        num_tokens = x_TD.shape[0]
        slots_BL = side.get(SAMPLE_SLOTS) if side else None
        if slots_BL is None:  # every token is one sample's (called without the layer)
            slots_BL = torch.arange(num_tokens, device=x_TD.device).unsqueeze(0)
        if slots_BL.shape[0]:
            attn_TL = self._attention(side, num_tokens, slots_BL.shape[1])
        else:  # a batch of no samples (no token): its grid has no place
            attn_TL = self._attention(side, num_tokens, None)[:, :0]
        logits_TE = self.logits(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            mixed_TE = attention_mix(attn_TL, torch.softmax(logits_TE, dim=-1), slots_BL)
        return _mixed_routing(self, logits_TE, mixed_TE, num_tokens)


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
    "attention_graph": AttentionGraphRouter,
    "maskmoe": MaskMoERouter,
}

for _name, _cls in TOKEN_GRAPH_ROUTERS.items():
    register_router(_name, _cls)
